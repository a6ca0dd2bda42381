"""Chat: time to first token in a 3-turn session, decode tokens/s, cold start
(the embedded model joined from its packages) vs restart (process start to
SERVING), and the server's RSS after 100 turns vs after 1."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from bench.tables import percentile, print_table
from services.chat.config import ChatSettings
from services.chat.engine import ChatEngine, GenerationParams, GenerationRun, build_engine
from services.common.health_probe import probe
from talker.v1 import chat_pb2, chat_pb2_grpc
from tests.processes import REPO, free_port

QUESTIONS = [
    "Hello! Who are you?",
    "What is the capital of France?",
    "What is a good name for a cat?",
]


def decode_speed(model: ChatEngine, rounds: int) -> None:
    prompt = model.prompt(
        [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    )
    params = GenerationParams(64, 1.0, 1.0, True)
    rates, firsts = [], []
    for _ in range(rounds):
        run = GenerationRun(prompt_tokens=prompt.tokens)
        started = time.perf_counter()
        for _delta in model.generate(prompt, params, threading.Event(), run):
            pass
        elapsed = time.perf_counter() - started
        assert run.first_token_s is not None
        firsts.append(1000 * run.first_token_s)
        rates.append((run.completion_tokens - 1) / (elapsed - run.first_token_s))
    print_table(
        f"Generation speed ({model.backend}, {model.model_id}), "
        f"{params.max_new_tokens} tokens greedy, {rounds} rounds",
        ["tok/s p50", "tok/s p5", "prompt tokens", "first token ms p50"],
        [[percentile(rates, 50), percentile(rates, 5), prompt.tokens, percentile(firsts, 50)]],
    )
    print("target: >= 18 tok/s decode")


class ChatProcess:
    """The real chat program in a subprocess, on free ports, with its own cache dir."""

    def __init__(self, cache_dir: Path) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "TALKER_CHAT_PORT": str(self.port),
            "TALKER_CHAT_METRICS_PORT": "0",
            "TALKER_CACHE_DIR": str(cache_dir),
            "TALKER_CHAT_MAX_NEW_TOKENS": "48",
        }
        self.cpu_s_at_serving = float("nan")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.chat"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.address = f"127.0.0.1:{self.port}"

    def seconds_to_serving(self, timeout_s: float = 300) -> float:
        while probe(self.address, timeout_s=0.5) != "SERVING":
            if time.perf_counter() - self.started > timeout_s or self.process.poll() is not None:
                raise RuntimeError("chat did not become SERVING")
            time.sleep(0.05)
        elapsed = time.perf_counter() - self.started
        self.cpu_s_at_serving = self.cpu_s()
        return elapsed

    def cpu_s(self) -> float:
        """CPU time (user + system) the process has used: on a busy shared machine
        this moves far less than wall time does."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def first_token_s(stub: chat_pb2_grpc.ChatServiceStub, session_id: str, text: str) -> float:
    started = time.perf_counter()
    first = float("nan")
    for response in stub.Chat(
        chat_pb2.ChatRequest(
            session_id=session_id, text=text, sampling=chat_pb2.SamplingParams(greedy=True)
        ),
        timeout=120,
    ):
        if response.HasField("delta") and first != first:
            first = time.perf_counter() - started
    return first


def main() -> None:
    rounds = int(os.environ.get("BENCH_ROUNDS", "5"))
    with tempfile.TemporaryDirectory() as cache:
        cold = ChatProcess(Path(cache))
        cold_s = cold.seconds_to_serving()
        cold.stop()
        # A restart is measured several times (the p50 is the figure): one start
        # on a shared 2-core machine can be a second off.
        restarts = int(os.environ.get("BENCH_RESTARTS", "5"))
        restart_s, restart_cpu_s = [], []
        for _ in range(restarts - 1):
            again = ChatProcess(Path(cache))
            restart_s.append(again.seconds_to_serving())
            restart_cpu_s.append(again.cpu_s_at_serving)
            again.stop()
        warm = ChatProcess(Path(cache))
        restart_s.append(warm.seconds_to_serving())
        restart_cpu_s.append(warm.cpu_s_at_serving)
        print_table(
            "Chat program start to SERVING (process spawn to health SERVING)",
            ["start", "runs", "p50 s", "max s", "CPU s p50"],
            [
                [
                    "cold: embedded model assembled and checked",
                    1,
                    cold_s,
                    cold_s,
                    cold.cpu_s_at_serving,
                ],
                [
                    "restart: model already in the cache",
                    restarts,
                    percentile(restart_s, 50),
                    max(restart_s),
                    percentile(restart_cpu_s, 50),
                ],
            ],
        )
        print("target: restart < 3 s")
        try:
            with grpc.insecure_channel(warm.address) as channel:
                stub = chat_pb2_grpc.ChatServiceStub(channel)
                firsts, thirds = [], []
                for session in range(20):
                    for turn, question in enumerate(QUESTIONS):
                        ttft = first_token_s(stub, f"ttft{session}", question)
                        (firsts if turn == 0 else thirds if turn == 2 else []).append(1000 * ttft)
                print_table(
                    "Time to first token (client side, through gRPC), 20 sessions",
                    ["turn", "p50 ms", "p95 ms"],
                    [
                        [
                            "1st turn (empty history)",
                            percentile(firsts, 50),
                            percentile(firsts, 95),
                        ],
                        [
                            "3rd turn (2 exchanges of history)",
                            percentile(thirds, 50),
                            percentile(thirds, 95),
                        ],
                    ],
                )
                print("target: 3rd turn first token < 250 ms p50")
                first_token_s(stub, "rss", "Hello!")
                after_one = warm.rss_mb()
                for turn in range(99):
                    first_token_s(stub, "rss" if turn % 2 else f"rss{turn}", QUESTIONS[turn % 3])
                after_hundred = warm.rss_mb()
                print_table(
                    "Chat process RSS",
                    ["after", "RSS MB"],
                    [
                        ["1 turn", after_one],
                        ["100 turns", after_hundred],
                        ["growth", after_hundred - after_one],
                    ],
                )
                print("target: growth < 50 MB")
        finally:
            warm.stop()
    model = build_engine(ChatSettings())
    model.load()
    decode_speed(model, rounds)


if __name__ == "__main__":
    main()
