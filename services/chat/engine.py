"""The chat engine as plain Python: what every backend offers the servicer.

Three backends sit behind one small Protocol, so the servicer never knows
which runs:
- `llamacpp.LlamaCppEngine`: any GGUF on llama.cpp, with its own kernels for
  the CPU it runs on (the default, with the embedded Qwen2.5-0.5B);
- `transformers_engine.TransformersEngine`: a Hugging Face model folder;
- `remote.RemoteEngine`: an OpenAI-compatible server elsewhere.

Local generation is our own token loop, so a stop flag is checked before
every token: a cancelled reply stops within one token (barge-in).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
from prometheus_client import Counter, Histogram

from services.chat.config import ChatSettings
from services.common.errors import PreconditionFailed
from services.common.metrics import LATENCY_BUCKETS

FIRST_TOKEN_SECONDS = Histogram(
    "talker_chat_first_token_seconds",
    "From the start of generation (prompt built) to the first reply token.",
    buckets=LATENCY_BUCKETS,
)
TOKENS = Counter("talker_chat_generated_tokens_total", "Reply tokens generated.")


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float
    top_p: float
    greedy: bool
    repetition_penalty: float = 1.0
    #: Sampling draws from the top_k likeliest tokens only (0: all).
    top_k: int = 40


@dataclass
class GenerationRun:
    """Filled while a reply is generated; read it after the iterator ends."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = "stop"  # stop | length | cancelled
    first_token_s: float | None = None
    tokens_after_stop: int = 0  # tokens produced after the stop flag was seen set
    reused_tokens: int = 0  # prompt tokens served from a cached prefix
    text: str = ""


@dataclass
class Prompt:
    """A conversation ready for an engine: its size in tokens (what the budget
    counts), the token ids for a local model, the messages for a remote one."""

    messages: list[dict[str, str]]
    tokens: int
    ids: list[int] = field(default_factory=list)


class ChatEngine(Protocol):
    #: The model's name as callers see it (logs, the x-talker-model header).
    model_id: str
    #: Which backend runs it: "llama.cpp", "transformers" or "remote".
    backend: str

    def load(self) -> None: ...

    def count_tokens(self, text: str) -> int: ...

    def prompt(self, messages: list[dict[str, str]]) -> Prompt: ...

    def generate(
        self,
        prompt: Prompt,
        params: GenerationParams,
        stop: threading.Event,
        run: GenerationRun,
        session_key: str | None = None,
    ) -> Iterator[str]:
        """Yields text deltas as they come; blocking, run it in a worker thread.
        With `session_key` the engine may reuse what it kept of that session's
        last turn, and keep this one's."""
        ...

    def forget(self, session_key: str) -> None:
        """Drops whatever is kept for the session (on reset)."""
        ...


def build_engine(settings: ChatSettings) -> ChatEngine:
    """The backend the settings ask for; heavy libraries are imported by the
    chosen one only (a restart pays for every import)."""
    if settings.remote_url:
        from services.chat.remote import RemoteEngine

        return RemoteEngine(settings)
    path = model_file(settings)
    if path is None or path.suffix == ".gguf":
        from services.chat.llamacpp import LlamaCppEngine

        return LlamaCppEngine(settings, path)
    from services.chat.transformers_engine import TransformersEngine

    return TransformersEngine(settings, path)


def model_file(settings: ChatSettings) -> Path | None:
    """A .gguf file, or a Hugging Face folder (with config.json); None for the
    embedded model, assembled when it loads (not before the program answers health)."""
    if not settings.model_path:
        return None
    path = Path(settings.model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    raise PreconditionFailed(
        f"TALKER_CHAT_MODEL_PATH={settings.model_path} is neither a .gguf file, a folder "
        "holding exactly one .gguf file, nor a Hugging Face model folder (with config.json)."
    )


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


State = TypeVar("State")


class KeptStates(Generic[State]):
    """What a local engine keeps of the last few sessions (their KV cache and the
    token ids it covers): the next turn of a session starts with the same tokens
    (system prompt, history, the last reply), so only the new message needs
    reading. Bounded, least recently used out."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[list[int], State]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, key: str) -> tuple[list[int], State] | None:
        with self._lock:
            return self._entries.pop(key, None)

    def peek(self, key: str) -> tuple[list[int], State] | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, ids: list[int], state: State) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._entries[key] = (ids, state)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def drop(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)


def choose_token(
    logits: np.ndarray,
    generated: list[int],
    params: GenerationParams,
    rng: np.random.Generator,
) -> int:
    """The next token from the last position's logits (float32, modified in place)."""
    if params.repetition_penalty != 1.0 and generated:
        seen = np.fromiter(set(generated), dtype=np.int64)
        scores = logits[seen]
        logits[seen] = np.where(
            scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty
        )
    if params.greedy:
        return int(np.argmax(logits))
    # Sorting a 150k vocabulary every token costs ~10 ms; the top k are enough.
    k = params.top_k if 0 < params.top_k < logits.size else logits.size
    top = np.argpartition(logits, -k)[-k:] if k < logits.size else np.arange(logits.size)
    top = top[np.argsort(logits[top])[::-1]]
    scaled = logits[top].astype(np.float64) / params.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = np.cumsum(probs) - probs < params.top_p
        probs = probs * keep
        probs /= probs.sum()
    return int(top[rng.choice(len(top), p=probs)])


def token_loop(
    params: GenerationParams,
    stop: threading.Event,
    run: GenerationRun,
    rng: np.random.Generator,
    started: float,
    generated: list[int],
    next_logits: Callable[[], np.ndarray],
    is_end: Callable[[int], bool],
    delta_of: Callable[[int], str],
    feed: Callable[[int], None],
) -> Iterator[str]:
    """The token loop every local engine runs once its prompt is read: the stop
    flag is checked before every token (a cancel stops within one), each token
    is appended to `generated`, its text yielded as soon as it is whole, then
    fed back. The engine supplies its model's four steps."""
    for _ in range(params.max_new_tokens):
        if stop.is_set():
            run.finish_reason = "cancelled"
            return
        token = choose_token(next_logits(), generated, params, rng)
        if is_end(token):
            run.finish_reason = "stop"
            return
        generated.append(token)
        run.completion_tokens = len(generated)
        if run.first_token_s is None:
            run.first_token_s = time.perf_counter() - started
            FIRST_TOKEN_SECONDS.observe(run.first_token_s)
        TOKENS.inc()
        delta = delta_of(token)
        if delta:
            run.text += delta
            yield delta
        if stop.is_set():
            run.tokens_after_stop += 1
        feed(token)
    run.finish_reason = "length"


class Utf8Deltas:
    """Turns the bytes of a growing token sequence into text deltas; a character
    split across tokens is held back until its last byte arrives."""

    def __init__(self) -> None:
        self.text = ""
        self._pending = b""

    def feed(self, piece: bytes) -> str:
        self._pending += piece
        try:
            delta = self._pending.decode("utf-8")
        except UnicodeDecodeError as error:
            if error.reason != "unexpected end of data":
                # Not a split character but invalid bytes: replaced, never stuck.
                delta = self._pending.decode("utf-8", errors="replace")
            else:
                delta = self._pending[: error.start].decode("utf-8", errors="replace")
                self._pending = self._pending[error.start :]
                self.text += delta
                return delta
        self._pending = b""
        self.text += delta
        return delta


def to_numpy(values: Any, size: int) -> np.ndarray:
    """A float32 copy of `size` logits behind a ctypes pointer."""
    return np.ctypeslib.as_array(values, shape=(size,)).astype(np.float32, copy=True)
