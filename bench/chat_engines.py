"""llama.cpp against the torch path (transformers) on the same models:
decode tokens/s and first token of a fresh prompt, each engine alone in its
own process (their thread pools spin while idle, so sharing a process slows
both), runs in A B B A order so a noisy machine hurts both alike. This is why
GGUF models run on llama.cpp. The torch side reads the GGUF dequantised into a
Hugging Face folder (written once into the cache).

    python -m bench chat_engines
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.tables import percentile, print_table
from services.chat.config import ChatSettings
from services.chat.engine import ChatEngine, GenerationParams, GenerationRun
from services.chat.llamacpp import LlamaCppEngine
from services.chat.models import EMBEDDED, embedded_path
from services.chat.transformers_engine import TransformersEngine


def hf_folder(gguf: Path, cache: Path) -> Path:
    target = cache / "chat" / f"{gguf.stem}-hf"
    if not (target / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    return target


def one_round(model: ChatEngine, question: str) -> tuple[float, float]:
    prompt = model.prompt([{"role": "user", "content": question}])
    run = GenerationRun(prompt.tokens)
    started = time.perf_counter()
    for _ in model.generate(prompt, GenerationParams(48, 1, 1, True), threading.Event(), run):
        pass
    elapsed = time.perf_counter() - started
    assert run.first_token_s is not None
    return (run.completion_tokens - 1) / (elapsed - run.first_token_s), 1000 * run.first_token_s


def child(backend: str, name: str, rounds: int, first_round: int) -> None:
    """One engine in a process of its own: the two libraries' thread pools spin
    while idle, so sharing a process (or running at once) slows both."""
    settings = ChatSettings()
    gguf = embedded_path(name, settings.cache_dir)
    engine: ChatEngine = (
        LlamaCppEngine(settings, gguf)
        if backend == "llama.cpp"
        else TransformersEngine(settings, hf_folder(gguf, settings.cache_dir))
    )
    engine.load()
    results = []
    for index in range(first_round, first_round + rounds):
        # A question the engine has not just read, so the prompt is read afresh.
        results.append(one_round(engine, f"Tell me a long story about lighthouse number {index}."))
    print(json.dumps(results))


def main() -> None:
    rounds = int(os.environ.get("BENCH_ROUNDS", "4"))
    rows = []
    backends = ["llama.cpp", "transformers"]
    for name in os.environ.get("BENCH_MODELS", ",".join(EMBEDDED)).split(","):
        speeds: dict[str, list[float]] = {b: [] for b in backends}
        firsts: dict[str, list[float]] = {b: [] for b in backends}
        # Two processes per engine, in A B B A order, half the rounds each.
        for part, backend in enumerate([*backends, *backends[::-1]]):
            output = subprocess.run(
                [sys.executable, "-m", "bench.chat_engines", "child", backend, name,
                 str(max(1, rounds // 2)), str(part * rounds)],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            for speed, first in json.loads(output.strip().splitlines()[-1]):
                speeds[backend].append(speed)
                firsts[backend].append(first)
        base = percentile(speeds["transformers"], 50)
        for backend in backends:
            rows.append(
                [
                    name,
                    backend,
                    percentile(speeds[backend], 50),
                    percentile(speeds[backend], 50) / base,
                    percentile(firsts[backend], 50),
                ]
            )
    print_table(
        f"Chat engines on the same models, 48 tokens greedy, {2 * max(1, rounds // 2)} rounds "
        "each (A B B A, each engine alone in its own process)",
        ["model", "engine", "tok/s p50", "x transformers", "first token ms p50"],
        rows,
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
