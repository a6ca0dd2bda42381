"""Any GGUF model on llama.cpp (`llama-cpp-python`), built with kernels for
the CPU it runs on: on this 2-core machine it generated 10-12x the tokens per
second of transformers on the same models (`python -m bench chat_engines`),
and 3x our former hand-written torch path with 4-bit packed weights on
SmolLM2 (20.7 vs 7.1 tok/s, measured the same hour).

llama.cpp keeps one KV cache (sequence 0). What it holds is tracked as token
ids, and reused for the longest prefix the next prompt shares with it. Other
sessions' caches are copied out after each turn (`llama_state_seq_get_data`,
~12 KB a token for the default model) and copied back in when their next turn
comes, so a session's turn reads only its new message whichever session
spoke last; a new session starts from the system prompt's keys and values,
computed once at load.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from services.chat.config import ChatSettings
from services.chat.engine import (
    GenerationParams,
    GenerationRun,
    KeptStates,
    Prompt,
    Utf8Deltas,
    common_prefix,
    to_numpy,
    token_loop,
)
from services.chat.models import EMBEDDED, embedded_path
from services.common.cache_files import PARTIAL_MARK, remove_stale_partials
from services.common.errors import PreconditionFailed

log = logging.getLogger("talker.chat.llamacpp")

# Tokens evaluated per llama_decode call while reading a prompt; the stop flag
# is checked between batches, so a long prompt can be cancelled too.
PROMPT_BATCH = 256


class LlamaCppEngine:
    backend = "llama.cpp"

    def __init__(self, settings: ChatSettings, path: Path | None) -> None:
        """`path` None: the embedded model named by the settings."""
        self.settings = settings
        self.path = path
        self.model_id = path.name if path else EMBEDDED[settings.model].file_name
        self.llm: Any = None
        self.formatter: Any = None
        self.add_bos = False
        self.kept: KeptStates[bytes] = KeptStates(settings.kv_cache_sessions)
        #: What every prompt starts with (a system prompt, one per language, and the
        #: template around it) as ids and their keys and values, computed once.
        self.openings: list[tuple[list[int], bytes]] = []
        self.rng = np.random.default_rng()
        self._n_vocab = 0
        self._piece_buffer = ctypes.create_string_buffer(64)

    # ---- loading -----------------------------------------------------------
    def load(self) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        started = time.perf_counter()
        if self.path is None:
            self.path = embedded_path(self.settings.model, self.settings.cache_dir)
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(self.path),
                # The whole budget plus room for the template around the last message.
                n_ctx=self.settings.token_budget + 64,
                n_batch=PROMPT_BATCH,
                n_ubatch=PROMPT_BATCH,
                n_threads=self.settings.decode_threads,
                n_threads_batch=self.settings.threads,
                verbose=False,
            )
        except (ValueError, RuntimeError) as error:
            raise PreconditionFailed(
                f"llama.cpp could not load the chat model {self.path}: {error}. Is it a "
                "complete GGUF file of an architecture llama.cpp supports?"
            ) from None
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise PreconditionFailed(
                f"The chat model {self.model_id} has no chat template: it is a base model, "
                "not an instruction-tuned one, and cannot hold a conversation."
            )
        self._n_vocab = self.llm.n_vocab()
        vocab = self.llm._model
        self.formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=vocab.token_get_text(vocab.token_eos()),
            bos_token=vocab.token_get_text(vocab.token_bos()) if vocab.token_bos() >= 0 else "",
        )
        self.add_bos = bool(vocab.add_bos_token())
        model_loaded = time.perf_counter()
        # What loading evaluates (the openings when not kept, the warm-up) runs on
        # one thread. llama.cpp's threads spin-wait for each other at every step of
        # a graph, so on a busy host 2 threads crawl whenever one of them is
        # descheduled; a restart usually meets a busy host. Measured on the 2-core
        # AMD EPYC at load average 10-15: the warm-up took 7.5-13 s on 2 threads
        # and 0.2-0.5 s on 1 (`python -m bench chaos`: 6.8-10.6 s of chat's 8-16 s
        # restarts was the warm-up). Generation afterwards uses the configured threads.
        self.llm._ctx.set_n_threads(1, 1)
        try:
            for system_prompt in self.settings.system_prompts:
                opening = self._opening(system_prompt)
                if opening is not None:
                    self.openings.append(opening)
            openings_read = time.perf_counter()
            self._warm_up()
        finally:
            self.llm._ctx.set_n_threads(self.settings.decode_threads, self.settings.threads)
        finished = time.perf_counter()
        log.info(
            "chat model loaded",
            extra={
                "model": self.model_id,
                "backend": self.backend,
                "seconds": round(finished - started, 2),
                # The parts, for `python -m bench chaos` (where a restart's time goes).
                "model_s": round(model_loaded - started, 3),
                "openings_s": round(openings_read - model_loaded, 3),
                "warm_up_s": round(finished - openings_read, 3),
                "opening_tokens": [len(ids) for ids, _ in self.openings],
            },
        )

    def _opening(self, system_prompt: str) -> tuple[list[int], bytes] | None:
        system = {"role": "system", "content": system_prompt}
        one = self.prompt([system, {"role": "user", "content": "a"}]).ids
        other = self.prompt([system, {"role": "user", "content": "b"}]).ids
        shared = one[: common_prefix(one, other)]
        if not shared:
            return None
        path = self._opening_path(shared)
        with contextlib.suppress(OSError):
            state = path.read_bytes()
            if self._load_state(shared, state):
                return shared, state
            log.warning("a kept opening does not load; reading it again", extra={"path": str(path)})
        self._read(shared, 0, threading.Event())
        state = self._state()
        with contextlib.suppress(OSError):  # a read-only cache only costs the next start
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(path.parent)
            partial = path.with_name(f"{path.name}.{os.getpid()}{PARTIAL_MARK}")
            partial.write_bytes(state)
            partial.replace(path)
        return shared, state

    def _opening_path(self, ids: list[int]) -> Path:
        """Where an opening's keys and values are kept across restarts: reading
        the system prompts was ~80% of a start (1 s here, 20 s and more on a busy
        host). Named after everything the state depends on: the model file, the
        llama.cpp build and the context's shape, and the tokens."""
        import llama_cpp

        assert self.path is not None
        stat = self.path.stat()
        key = json.dumps(
            [
                str(self.path.resolve()),
                stat.st_size,
                stat.st_mtime_ns,
                llama_cpp.__version__,
                self.llm.n_ctx(),
                PROMPT_BATCH,
                ids,
            ]
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.settings.cache_dir / "chat" / "openings" / f"{digest}.state"

    def _warm_up(self) -> None:
        """A few tokens through the real path, so the first user does not pay for
        lazy initialisation. It starts from an opening, so only a few tokens are
        read: from scratch (the template's own system prompt) it was most of a
        restart once the openings came from the cache."""
        system = [{"role": "system", "content": p} for p in self.settings.system_prompts[:1]]
        prompt = self.prompt([*system, {"role": "user", "content": "Hi"}])
        for _ in self.generate(
            prompt, GenerationParams(2, 1.0, 1.0, True), threading.Event(), GenerationRun(0)
        ):
            pass

    # ---- prompts -----------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode(), add_bos=False, special=False))

    def prompt(self, messages: list[dict[str, str]]) -> Prompt:
        rendered = self.formatter(messages=messages).prompt
        bos = self.add_bos and not rendered.startswith(self.formatter.bos_token or "\0")
        ids = self.llm.tokenize(rendered.encode(), add_bos=bos, special=True)
        return Prompt(messages, len(ids), ids)

    def forget(self, session_key: str) -> None:
        self.kept.drop(session_key)

    # ---- generation ------------------------------------------------------------
    def generate(
        self,
        prompt: Prompt,
        params: GenerationParams,
        stop: threading.Event,
        run: GenerationRun,
        session_key: str | None = None,
    ) -> Iterator[str]:
        import llama_cpp

        llm = self.llm
        ids = prompt.ids
        generated: list[int] = []
        text = Utf8Deltas()
        started = time.perf_counter()
        run.finish_reason = "length"
        keep = self._restore_best(session_key, ids)
        run.reused_tokens = keep
        if not self._read(ids[keep:], keep, stop):
            run.finish_reason = "cancelled"
        else:
            vocab = llm._model.vocab
            yield from token_loop(
                params,
                stop,
                run,
                self.rng,
                started,
                generated,
                next_logits=lambda: to_numpy(llm._ctx.get_logits_ith(-1), self._n_vocab),
                is_end=lambda token: bool(llama_cpp.llama_vocab_is_eog(vocab, token)),
                delta_of=lambda token: text.feed(self._piece(token)),
                feed=lambda token: llm.eval([token]),
            )
        run.text = text.text
        if session_key is not None and llm.n_tokens > 0:
            self.kept.put(session_key, self._held(), self._state())

    def _piece(self, token: int) -> bytes:
        """The token's bytes (a piece of a UTF-8 character, possibly)."""
        import llama_cpp

        size = llama_cpp.llama_token_to_piece(
            self.llm._model.vocab, token, self._piece_buffer, len(self._piece_buffer), 0, False
        )
        if size < 0:  # longer than the buffer: the size needed, negated
            self._piece_buffer = ctypes.create_string_buffer(-size)
            return self._piece(token)
        return self._piece_buffer.raw[:size]

    def _read(self, ids: list[int], start: int, stop: threading.Event) -> bool:
        """Evaluates `ids` after the first `start` held tokens, a batch at a time;
        False if the stop flag came first."""
        self.llm.n_tokens = start  # eval() drops whatever the cache holds past this
        for at in range(0, len(ids), PROMPT_BATCH):
            if stop.is_set():
                return False
            self.llm.eval(ids[at : at + PROMPT_BATCH])
        return True

    def _held(self) -> list[int]:
        return [int(t) for t in self.llm.input_ids[: self.llm.n_tokens]]

    def _restore_best(self, session_key: str | None, ids: list[int]) -> int:
        """Puts in the cache whichever kept state shares the longest prefix with
        `ids` (what it holds now, the session's last turn, the openings), and
        returns how many tokens of `ids` it covers (at least one is left to read,
        so the last position's logits are fresh)."""
        limit = len(ids) - 1
        best = min(common_prefix(self._held(), ids), limit)
        source: tuple[list[int], bytes] | None = None
        candidates = [self.kept.peek(session_key) if session_key else None, *self.openings]
        for candidate in candidates:
            if candidate is None:
                continue
            covered = min(common_prefix(candidate[0], ids), limit)
            if covered > best:
                best, source = covered, candidate
        if source is not None and not self._load_state(source[0], source[1]):
            return 0
        return max(best, 0)

    def _state(self) -> bytes:
        import llama_cpp

        ctx = self.llm._ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, buffer, size, 0)
        return bytes(buffer[:written])

    def _load_state(self, held: list[int], state: bytes) -> bool:
        import llama_cpp

        ctx = self.llm._ctx.ctx
        self.llm._ctx.kv_cache_seq_rm(0, 0, -1)
        buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if not state or llama_cpp.llama_state_seq_set_data(ctx, buffer, len(state), 0) == 0:
            self.llm.n_tokens = 0  # could not load: read everything afresh
            return False
        self.llm.input_ids[: len(held)] = held
        self.llm.n_tokens = len(held)
        return True
