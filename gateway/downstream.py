"""The four stages as the gateway sees them: a channel each, their health
followed through `grpc.health.v1` Watch, and calls that carry the trace id,
retry while a stage restarts, and fail with a sentence naming the stage."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import STAGES, GatewaySettings
from services.common.errors import TalkerError, status_code_for
from services.common.interceptors import MODEL_METADATA_KEY
from services.common.runtime import channel_options
from services.common.tracing import TRACE_METADATA_KEY, current_trace_id
from talker.v1 import (
    animate_pb2,
    animate_pb2_grpc,
    asr_pb2_grpc,
    audio_pb2,
    chat_pb2_grpc,
    synthesize_pb2,
    synthesize_pb2_grpc,
    talker_pb2,
)

log = logging.getLogger("talker.gateway.downstream")
# Trailing metadata in which Synthesize names the voice that spoke (it may not be
# the one asked for: Chinese text sent to the default voice gets the Mandarin one).
VOICE_METADATA_KEY = "x-talker-voice"

LABELS = {
    "asr": "speech recognition",
    "chat": "reply generation",
    "synthesize": "speech synthesis",
    "animate": "animation",
    "gateway": "the gateway",
}
PIPELINE_STAGE = {
    "asr": talker_pb2.PIPELINE_STAGE_ASR,
    "chat": talker_pb2.PIPELINE_STAGE_CHAT,
    "synthesize": talker_pb2.PIPELINE_STAGE_SYNTHESIZE,
    "animate": talker_pb2.PIPELINE_STAGE_ANIMATE,
    "gateway": talker_pb2.PIPELINE_STAGE_GATEWAY,
}
SERVING = "SERVING"
DOWN = "DOWN"

# A restarted stage must be reachable again at once: grpc's default reconnect
# backoff grows to two minutes, which would keep a healthy stage "down".
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class StageFailure(TalkerError):
    """A downstream stage failed a call; `str()` is the sentence for the client,
    `code` the status it ends with (the stage's own, relayed)."""

    def __init__(self, stage: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.code = code

    @classmethod
    def of(cls, error: TalkerError) -> StageFailure:
        """The error as a failure of a stage: the gateway's own when no stage failed."""
        if isinstance(error, StageFailure):
            return error
        return cls("gateway", status_code_for(error), str(error))

    def turn_error(self, trace_id: str) -> talker_pb2.TurnError:
        return talker_pb2.TurnError(
            stage=PIPELINE_STAGE[self.stage],
            code=self.code.value[0],
            message=str(self),
            trace_id=trace_id,
        )


def failure_from(stage: str, error: aio.AioRpcError) -> StageFailure:
    code = error.code()
    details = (error.details() or "").strip()
    label = f"{stage} ({LABELS[stage]})"
    trace = current_trace_id.get()
    if code is grpc.StatusCode.UNAVAILABLE:
        text = f"The {label} stage is unavailable: {details or 'it does not answer'}."
    elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
        text = f"The {label} stage did not finish within its deadline."
    elif code is grpc.StatusCode.INTERNAL or code is grpc.StatusCode.UNKNOWN:
        text = f"The {label} stage failed: {details}"
    else:
        # The stage's own sentence (bad input, unknown id, limits) is what the client needs.
        text = (
            f"{details} ({stage} stage)" if details else f"The {label} stage answered {code.name}."
        )
    return StageFailure(stage, code, f"{text.rstrip()} [trace id {trace}]")


def trace_metadata() -> tuple[tuple[str, str], ...]:
    return ((TRACE_METADATA_KEY, current_trace_id.get()),)


class Stage:
    """One downstream program: its channel, stubs and last known health."""

    def __init__(self, name: str, address: str, settings: GatewaySettings) -> None:
        self.name = name
        self.address = address
        self.settings = settings
        self.channel = aio.insecure_channel(
            address, options=[*channel_options(settings), *RECONNECT_OPTIONS]
        )
        self.status = "UNKNOWN"
        #: The model that served the last call (the stage's x-talker-model header).
        self.model_id = ""
        self.changed = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self.on_change: Callable[[Stage], None] = lambda stage: None

    @property
    def serving(self) -> bool:
        return self.status == SERVING

    def start_watching(self) -> None:
        self._watcher = asyncio.create_task(self._watch(), name=f"watch-{self.name}")

    async def _watch(self) -> None:
        stub = health_pb2_grpc.HealthStub(self.channel)
        while True:
            # However the watch ends (an error, or the stage closing it), the stage is
            # down until a new watch says otherwise.
            with contextlib.suppress(aio.AioRpcError):
                call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
                async for response in call:
                    self._set(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
            self._set(DOWN)
            await asyncio.sleep(0.25)

    def _set(self, status: str) -> None:
        if status == self.status:
            return
        log.info(
            "stage health changed",
            extra={"stage": self.name, "from": self.status, "to": status, "address": self.address},
        )
        self.status = status
        self.changed.set()
        self.changed = asyncio.Event()
        self.on_change(self)

    async def ready(self) -> None:
        """Returns when the stage is SERVING; a stage known to be down gets
        `health_wait_s` to come back, then the call fails fast naming it."""
        deadline = time.monotonic() + self.settings.health_wait_s
        while not self.serving:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StageFailure(
                    self.name,
                    grpc.StatusCode.UNAVAILABLE,
                    f"The {self.name} ({LABELS[self.name]}) stage is unavailable: its health "
                    f"is {self.status} at {self.address}. It is being restarted; try again "
                    f"shortly. [trace id {current_trace_id.get()}]",
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    async def unary(self, method: Any, request: Any, timeout_s: float) -> Any:
        """A unary call with the trace id, retried on UNAVAILABLE with backoff."""
        attempt = 0
        while True:
            await self.ready()
            try:
                call = method(request, timeout=timeout_s, metadata=trace_metadata())
                response = await call
                await self._note_model(call)
                return response
            except aio.AioRpcError as error:
                if await self._should_retry(error, attempt):
                    attempt += 1
                    continue
                raise failure_from(self.name, error) from None

    async def stream(
        self,
        method: Any,
        request: Any,
        timeout_s: float,
        trailers: dict[str, str] | None = None,
    ) -> AsyncIterator[Any]:
        """A server stream with the trace id. Retried on UNAVAILABLE only before
        it produced anything; once output has gone out, a failure is final.
        `trailers`, if given, receives the call's trailing metadata at its end."""
        attempt = 0
        while True:
            await self.ready()
            call = method(request, timeout=timeout_s, metadata=trace_metadata())
            produced = False
            try:
                async for response in call:
                    if not produced:
                        await self._note_model(call)
                    produced = True
                    yield response
                if trailers is not None:
                    trailers.update((k, str(v)) for k, v in await call.trailing_metadata() or ())
                return
            except aio.AioRpcError as error:
                if not produced and await self._should_retry(error, attempt):
                    attempt += 1
                    continue
                raise failure_from(self.name, error) from None
            finally:
                call.cancel()

    async def bidi(
        self, method: Any, requests: AsyncIterator[Any], timeout_s: float
    ) -> AsyncIterator[Any]:
        """A bidirectional stream with the trace id. Not retried: the requests
        already sent cannot be sent again."""
        await self.ready()
        call = method(requests, timeout=timeout_s, metadata=trace_metadata())
        noted = False
        try:
            async for response in call:
                if not noted:
                    await self._note_model(call)
                    noted = True
                yield response
        except aio.AioRpcError as error:
            raise failure_from(self.name, error) from None
        finally:
            call.cancel()

    async def _note_model(self, call: Any) -> None:
        for key, value in await call.initial_metadata() or ():
            if key == MODEL_METADATA_KEY:
                self.model_id = str(value)

    async def _should_retry(self, error: aio.AioRpcError, attempt: int) -> bool:
        if error.code() is not grpc.StatusCode.UNAVAILABLE:
            return False
        if attempt + 1 >= self.settings.retry_attempts:
            return False
        log.warning(
            "stage unavailable; retrying",
            extra={"stage": self.name, "attempt": attempt + 1, "details": error.details()},
        )
        await asyncio.sleep(self.settings.retry_backoff_s * 2**attempt)
        return True

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        await self.channel.close()


class Stages:
    """All four stages and their stubs."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.by_name = {
            name: Stage(name, settings.stage_address(name), settings) for name in STAGES
        }
        self.asr = self.by_name["asr"]
        self.chat = self.by_name["chat"]
        self.synthesize = self.by_name["synthesize"]
        self.animate = self.by_name["animate"]
        self.asr_stub = asr_pb2_grpc.AsrServiceStub(self.asr.channel)
        self.chat_stub = chat_pb2_grpc.ChatServiceStub(self.chat.channel)
        self.synthesize_stub = synthesize_pb2_grpc.SynthesizeServiceStub(self.synthesize.channel)
        self.animate_stub = animate_pb2_grpc.AnimateServiceStub(self.animate.channel)

    def start_watching(self, on_change: Callable[[Stage], None]) -> None:
        for stage in self.by_name.values():
            stage.on_change = on_change
            stage.start_watching()

    async def check_ids(self, voice_id: str, avatar_id: str, timeout_s: float) -> None:
        """Unknown voices and avatars fail at once with NOT_FOUND (empty ids are not
        looked up), so a call never fails for them halfway."""
        if voice_id:
            await self.synthesize.unary(
                self.synthesize_stub.GetVoice,
                synthesize_pb2.GetVoiceRequest(voice_id=voice_id),
                timeout_s,
            )
        if avatar_id:
            await self.animate.unary(
                self.animate_stub.GetAvatar,
                animate_pb2.GetAvatarRequest(avatar_id=avatar_id),
                timeout_s,
            )

    async def render(
        self,
        request: animate_pb2.RenderRequest,
        timeout_s: float,
        on_response: Callable[[animate_pb2.RenderResponse], Awaitable[None]] | None = None,
    ) -> tuple[bytes, animate_pb2.RenderResult | None]:
        """An mp4 from Animate's Render: its bytes and its result; each response is
        also handed to `on_response` as it arrives (progress for a client)."""
        mp4 = bytearray()
        result = None
        async for response in self.animate.stream(self.animate_stub.Render, request, timeout_s):
            which = response.WhichOneof("response")
            if which == "chunk":
                mp4.extend(response.chunk.content)
            elif which == "result":
                result = response.result
            if on_response is not None:
                await on_response(response)
        return bytes(mp4), result

    def down(self) -> list[str]:
        return [name for name, stage in self.by_name.items() if not stage.serving]

    async def close(self) -> None:
        for stage in self.by_name.values():
            await stage.close()


def pcm_s16le(sample_rate_hz: int) -> audio_pb2.AudioFormat:
    """Mono PCM_S16LE: the format reply audio travels in between the stages."""
    return audio_pb2.AudioFormat(
        encoding=audio_pb2.AUDIO_ENCODING_PCM_S16LE, sample_rate_hz=sample_rate_hz, channels=1
    )
