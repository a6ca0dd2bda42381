"""llama.cpp against the torch path (transformers) on the same models, in one
process, rounds alternating so a noisy machine hurts both alike: decode
tokens/s and first token of a fresh prompt. This is why GGUF models run on
llama.cpp. The torch side reads the GGUF dequantised into a Hugging Face
folder (written once into the cache).

    python -m bench chat_engines
"""

from __future__ import annotations

import os
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


def main() -> None:
    rounds = int(os.environ.get("BENCH_ROUNDS", "4"))
    settings = ChatSettings()
    rows = []
    for name in os.environ.get("BENCH_MODELS", ",".join(EMBEDDED)).split(","):
        gguf = embedded_path(name, settings.cache_dir)
        engines: list[ChatEngine] = [
            LlamaCppEngine(settings, gguf),
            TransformersEngine(settings, hf_folder(gguf, settings.cache_dir)),
        ]
        for engine in engines:
            engine.load()
        speeds: dict[str, list[float]] = {e.backend: [] for e in engines}
        firsts: dict[str, list[float]] = {e.backend: [] for e in engines}
        for index in range(rounds):
            # A question the engine has not just read, so the prompt is read afresh.
            question = f"Tell me a long story about lighthouse number {index}."
            for engine in engines if index % 2 == 0 else engines[::-1]:
                speed, first = one_round(engine, question)
                speeds[engine.backend].append(speed)
                firsts[engine.backend].append(first)
        base = percentile(speeds["transformers"], 50)
        for engine in engines:
            rows.append(
                [
                    name,
                    engine.backend,
                    percentile(speeds[engine.backend], 50),
                    percentile(speeds[engine.backend], 50) / base,
                    percentile(firsts[engine.backend], 50),
                ]
            )
        del engines
    print_table(
        f"Chat engines on the same models, 48 tokens greedy, {rounds} alternating rounds",
        ["model", "engine", "tok/s p50", "x transformers", "first token ms p50"],
        rows,
    )


if __name__ == "__main__":
    main()
