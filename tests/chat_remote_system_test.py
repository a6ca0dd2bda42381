"""System ring for chat's remote backend: ChatService pointed at a real
OpenAI-compatible server process (llama.cpp's own, from llama-cpp-python[server],
serving the embedded GGUF), called through a real channel."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from services.chat.config import ChatSettings
from services.chat.models import embedded_path
from services.chat.server import build_program
from talker.v1 import chat_pb2, chat_pb2_grpc
from tests.processes import InProcessServer, free_port

GREEDY = chat_pb2.SamplingParams(greedy=True, max_new_tokens=40)


@pytest.fixture(scope="module")
def remote_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    model = embedded_path("qwen2.5-0.5b", ChatSettings().cache_dir)
    port = free_port()
    log = tmp_path_factory.mktemp("remote") / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host",
             "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/models", timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the llama.cpp server did not start"
            time.sleep(0.5)
        yield url, log
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def chat(remote_server, start_in_process):  # type: ignore[no-untyped-def]
    url, _ = remote_server
    server: InProcessServer = start_in_process(
        build_program, ChatSettings(port=0, metrics_port=0, remote_url=url, max_turns=2)
    )
    with grpc.insecure_channel(server.address) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


def ask(stub, session_id: str, text: str) -> list[chat_pb2.ChatResponse]:  # type: ignore[no-untyped-def]
    return list(
        stub.Chat(
            chat_pb2.ChatRequest(session_id=session_id, text=text, sampling=GREEDY), timeout=300
        )
    )


def test_remote_reply_streams_deltas_sentences_and_usage(chat) -> None:
    responses = ask(chat, "r1", "What is the capital of France?")
    deltas = [r.delta.text for r in responses if r.HasField("delta")]
    sentences = [r.sentence.text for r in responses if r.HasField("sentence")]
    finished = responses[-1].finished
    assert len(deltas) > 1  # streamed, not one block
    assert "Paris" in "".join(deltas)
    assert sentences and "Paris" in " ".join(sentences)
    assert finished.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert finished.usage.prompt_tokens > 10 and finished.usage.completion_tokens > 0


def test_remote_history_is_bounded_here(chat) -> None:
    for n in range(4):
        ask(chat, "r2", f"Remember the number {n}. Reply with one word.")
    session = chat.GetSession(chat_pb2.GetSessionRequest(session_id="r2")).session
    assert len(session.turns) == 4  # max_turns=2 exchanges, whatever the remote could hold
    assert "number 3" in session.turns[-2].text


def test_cancel_stops_the_remote_generation(chat, remote_server) -> None:
    _, log = remote_server
    call = chat.Chat(
        chat_pb2.ChatRequest(
            session_id="r3",
            text="Write a very long story about a dragon.",
            sampling=chat_pb2.SamplingParams(greedy=True, max_new_tokens=160),
        ),
        timeout=300,
    )
    received = 0
    for response in call:
        if response.HasField("delta"):
            received += 1
            if received == 3:
                call.cancel()
                break
    # The remote saw its client go away (and stops generating: llama.cpp's server
    # closes the completion on disconnect)...
    deadline = time.monotonic() + 60
    while "Disconnected from client" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
        time.sleep(0.2)
    # ...and the session kept what was said before the cancel, then goes on.
    session = chat.GetSession(chat_pb2.GetSessionRequest(session_id="r3")).session
    assert session.turns[-1].text and len(session.turns[-1].text.split()) < 40
    again = ask(chat, "r3", "What is two plus two?")
    assert again[-1].finished.finish_reason == chat_pb2.FINISH_REASON_STOP


def test_remote_down_gives_unavailable_naming_it(start_in_process) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(Exception, match="does not answer"):
        start_in_process(
            build_program,
            ChatSettings(port=0, metrics_port=0, remote_url=f"http://127.0.0.1:{free_port()}/v1"),
        )
