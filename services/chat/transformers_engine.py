"""A Hugging Face model folder (config.json + weights) on transformers: the
path for models that have no GGUF. Slower than llama.cpp on a CPU (see
`python -m bench chat_engines`), so GGUF files never come here."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.chat.config import ChatSettings
from services.chat.engine import (
    GenerationParams,
    GenerationRun,
    KeptStates,
    Prompt,
    common_prefix,
    token_loop,
)
from services.common.errors import PreconditionFailed

log = logging.getLogger("talker.chat.transformers")


def resolve_dtype(setting: str) -> str:
    if setting != "auto":
        return setting
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


class TransformersEngine:
    backend = "transformers"

    def __init__(self, settings: ChatSettings, folder: Path) -> None:
        self.settings = settings
        self.folder = folder
        self.model_id = folder.name
        self.model: Any = None
        self.tokenizer: Any = None
        self.eos_ids: set[int] = set()
        self.kept: KeptStates[Any] = KeptStates(settings.kv_cache_sessions)
        self.rng = np.random.default_rng()

    def load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
        torch.set_num_threads(self.settings.threads)
        dtype = getattr(torch, resolve_dtype(self.settings.dtype))
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        if not getattr(self.tokenizer, "chat_template", None):
            raise PreconditionFailed(
                f"The chat model {self.model_id} has no chat template: it is a base model, "
                "not an instruction-tuned one, and cannot hold a conversation."
            )
        self.model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=dtype)
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        prompt = self.prompt([{"role": "user", "content": "Hi"}])
        for _ in self.generate(
            prompt, GenerationParams(2, 1.0, 1.0, True), threading.Event(), GenerationRun(0)
        ):
            pass
        log.info("chat model loaded", extra={"model": self.model_id, "backend": self.backend})

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt(self, messages: list[dict[str, str]]) -> Prompt:
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        ids = list(encoded["input_ids"])
        return Prompt(messages, len(ids), ids)

    def forget(self, session_key: str) -> None:
        self.kept.drop(session_key)

    def generate(
        self,
        prompt: Prompt,
        params: GenerationParams,
        stop: threading.Event,
        run: GenerationRun,
        session_key: str | None = None,
    ) -> Iterator[str]:
        from transformers import DynamicCache

        ids = prompt.ids
        generated: list[int] = []
        started = time.perf_counter()
        run.finish_reason = "length"
        model = self.model

        def delta_of(_token: int) -> str:
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            # A multi-byte character split across tokens decodes to U+FFFD until complete.
            if text.endswith("\ufffd") or len(text) <= len(run.text):
                return ""
            return text[len(run.text) :]

        with torch.inference_mode():
            cache, reused = self._reusable_cache(session_key, ids)
            if cache is None:
                cache = DynamicCache(config=model.config)
            run.reused_tokens = reused
            output = model(
                input_ids=torch.tensor([ids[reused:]]),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )

            def feed(token: int) -> None:
                nonlocal output
                output = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)

            yield from token_loop(
                params,
                stop,
                run,
                self.rng,
                started,
                generated,
                next_logits=lambda: output.logits[0, -1, :].float().numpy().copy(),
                is_end=lambda token: token in self.eos_ids,
                delta_of=delta_of,
                feed=feed,
            )
        run.text = self.tokenizer.decode(generated, skip_special_tokens=True)
        fed = ids + generated
        if session_key is not None and cache.get_seq_length() == len(fed):
            self.kept.put(session_key, fed, cache)

    def _reusable_cache(self, session_key: str | None, ids: list[int]) -> tuple[Any, int]:
        entry = self.kept.take(session_key) if session_key else None
        if entry is None:
            return None, 0
        cached_ids, cache = entry
        keep = min(common_prefix(cached_ids, ids), len(ids) - 1)
        if keep <= 0:
            return None, 0
        held = cache.get_seq_length()
        if keep < held:
            cache.crop(keep - held)  # transformers crops by a negative count from the end
        return cache, keep
