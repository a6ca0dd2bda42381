"""A model on another machine behind an OpenAI-compatible API (llama.cpp's
llama-server, vLLM, Ollama, ...): `POST {remote_url}/chat/completions` with
`stream: true`, read as server-sent events.

Sessions, history bounds, the guard and sentence cutting stay in talker: the
remote only sees one bounded conversation at a time. Closing the response
stops the remote's generation (llama-server and vLLM abort a request whose
client went away), which is how a cancelled reply stops within one token.
Token counts for the budget are estimated (the remote's tokenizer is not
here): a CJK character as a token, other text at 3.5 characters a token,
which overestimates for English on Llama/Qwen tokenizers, so the budget holds.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from services.chat.config import ChatSettings
from services.chat.engine import (
    FIRST_TOKEN_SECONDS,
    TOKENS,
    GenerationParams,
    GenerationRun,
    Prompt,
)
from services.common.errors import PreconditionFailed, StageUnavailable

log = logging.getLogger("talker.chat.remote")

# Tokens of chat-template framing per message, estimated.
_PER_MESSAGE = 4


def estimate_tokens(text: str) -> int:
    cjk = sum(1 for ch in text if "\u3000" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff")
    return cjk + round((len(text) - cjk) / 3.5)


class RemoteEngine:
    backend = "remote"

    def __init__(self, settings: ChatSettings) -> None:
        self.settings = settings
        self.base_url = settings.remote_url.rstrip("/")
        self.model_id = settings.remote_model or self.base_url
        self.client: Any = None

    def load(self) -> None:
        """Checks the server answers (its model list), so SERVING means usable."""
        import httpx

        headers = {"Accept": "application/json"}
        if self.settings.remote_api_key:
            headers["Authorization"] = f"Bearer {self.settings.remote_api_key}"
        self.client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(self.settings.remote_timeout_s, connect=10),
        )
        try:
            response = self.client.get("/models")
        except httpx.HTTPError as error:
            raise StageUnavailable(
                f"The remote chat server at {self.base_url} does not answer: {error}."
            ) from None
        if response.status_code in (401, 403):
            raise PreconditionFailed(
                f"The remote chat server at {self.base_url} refused the API key "
                f"(HTTP {response.status_code}); check TALKER_CHAT_REMOTE_API_KEY."
            )
        if response.is_success and not self.settings.remote_model:
            models = response.json().get("data") or []
            if models:
                self.model_id = str(models[0].get("id", self.model_id))
        log.info("remote chat model ready", extra={"url": self.base_url, "model": self.model_id})

    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    def prompt(self, messages: list[dict[str, str]]) -> Prompt:
        tokens = sum(estimate_tokens(m["content"]) + _PER_MESSAGE for m in messages)
        return Prompt(messages, tokens)

    def forget(self, session_key: str) -> None:
        pass  # nothing is kept here: the remote sees whole conversations

    def generate(
        self,
        prompt: Prompt,
        params: GenerationParams,
        stop: threading.Event,
        run: GenerationRun,
        session_key: str | None = None,
    ) -> Iterator[str]:
        import httpx

        body: dict[str, Any] = {
            "model": self.settings.remote_model or self.model_id,
            "messages": prompt.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens,
            "temperature": 0.0 if params.greedy else params.temperature,
            "top_p": 1.0 if params.greedy else params.top_p,
        }
        if params.repetition_penalty != 1.0:
            # Not OpenAI's, but llama.cpp, vLLM and Ollama read it; others ignore it.
            body["repeat_penalty"] = params.repetition_penalty
        started = time.perf_counter()
        run.finish_reason = "length"
        try:
            with self.client.stream("POST", "/chat/completions", json=body) as response:
                if not response.is_success:
                    response.read()
                    raise StageUnavailable(
                        f"The remote chat server at {self.base_url} answered HTTP "
                        f"{response.status_code}: {response.text[:200]}"
                    )
                for event in _events(response.iter_lines()):
                    if stop.is_set():
                        run.finish_reason = "cancelled"
                        break  # leaving the block closes the connection: the remote stops
                    usage = event.get("usage")
                    if usage:
                        run.prompt_tokens = int(usage.get("prompt_tokens") or run.prompt_tokens)
                        run.completion_tokens = int(
                            usage.get("completion_tokens") or run.completion_tokens
                        )
                    for choice in event.get("choices") or []:
                        delta = (choice.get("delta") or {}).get("content") or ""
                        if delta:
                            if run.first_token_s is None:
                                run.first_token_s = time.perf_counter() - started
                                FIRST_TOKEN_SECONDS.observe(run.first_token_s)
                            run.completion_tokens += 1  # a chunk is a token on these servers
                            TOKENS.inc()
                            run.text += delta
                            yield delta
                        reason = choice.get("finish_reason")
                        if reason:
                            run.finish_reason = "length" if reason == "length" else "stop"
        except httpx.HTTPError as error:
            raise StageUnavailable(
                f"The remote chat server at {self.base_url} failed mid-reply: {error}."
            ) from None


def _events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream, up to `[DONE]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            yield json.loads(payload)
        except ValueError:
            log.warning(
                "unreadable event from the remote chat server", extra={"event": payload[:200]}
            )
