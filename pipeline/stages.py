"""The four stages as their callers (the gateway, the render workers) see them:
one typed client each (`AsrClient`, `ChatClient`, `SynthesizeClient`,
`AnimateClient`), in the manner of Riva's Python clients. Every call carries the
trace id, has its deadline from the settings, waits for a stage its health Watch
says is restarting, retries UNAVAILABLE before anything was produced, and fails
with a sentence naming the stage."""

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

from pipeline.config import STAGES, StageSettings
from services.common.errors import TalkerError, status_code_for
from services.common.interceptors import MODEL_METADATA_KEY
from services.common.runtime import channel_options
from services.common.tracing import TRACE_METADATA_KEY, current_trace_id
from talker.v1 import (
    animate_pb2,
    animate_pb2_grpc,
    asr_pb2,
    asr_pb2_grpc,
    audio_pb2,
    chat_pb2,
    chat_pb2_grpc,
    synthesize_pb2,
    synthesize_pb2_grpc,
    talker_pb2,
)

log = logging.getLogger("talker.pipeline.stages")
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
    """One downstream program: its channel, its last known health, and the
    generic call shapes (unary, server stream, bidi) the typed clients use."""

    def __init__(self, name: str, address: str, settings: StageSettings) -> None:
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


class AsrClient(Stage):
    def __init__(self, address: str, settings: StageSettings) -> None:
        super().__init__("asr", address, settings)
        self.stub = asr_pb2_grpc.AsrServiceStub(self.channel)

    async def recognize(self, request: asr_pb2.RecognizeRequest) -> asr_pb2.RecognizeResponse:
        response: asr_pb2.RecognizeResponse = await self.unary(
            self.stub.Recognize, request, self.settings.asr_timeout_s
        )
        return response

    def streaming_recognize(
        self, requests: AsyncIterator[asr_pb2.StreamingRecognizeRequest], timeout_s: float
    ) -> AsyncIterator[asr_pb2.StreamingRecognizeResponse]:
        return self.bidi(self.stub.StreamingRecognize, requests, timeout_s)


class ChatClient(Stage):
    def __init__(self, address: str, settings: StageSettings) -> None:
        super().__init__("chat", address, settings)
        self.stub = chat_pb2_grpc.ChatServiceStub(self.channel)

    def chat(self, request: chat_pb2.ChatRequest) -> AsyncIterator[chat_pb2.ChatResponse]:
        return self.stream(self.stub.Chat, request, self.settings.chat_timeout_s)

    async def discard_speculation(self, request: chat_pb2.DiscardSpeculationRequest) -> None:
        await self.unary(self.stub.DiscardSpeculation, request, self.settings.lookup_timeout_s)

    async def get_session(self, request: chat_pb2.GetSessionRequest) -> chat_pb2.GetSessionResponse:
        response: chat_pb2.GetSessionResponse = await self.unary(
            self.stub.GetSession, request, self.settings.lookup_timeout_s
        )
        return response


class SynthesizeClient(Stage):
    def __init__(self, address: str, settings: StageSettings) -> None:
        super().__init__("synthesize", address, settings)
        self.stub = synthesize_pb2_grpc.SynthesizeServiceStub(self.channel)

    def synthesize(
        self,
        request: synthesize_pb2.SynthesizeRequest,
        trailers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[synthesize_pb2.SynthesizeResponse]:
        """`trailers` receives the call's trailing metadata (the voice that spoke);
        the deadline is one sentence's unless `timeout_s` says otherwise."""
        return self.stream(
            self.stub.Synthesize,
            request,
            timeout_s or self.settings.synthesize_timeout_s,
            trailers,
        )

    async def get_voice(self, voice_id: str) -> synthesize_pb2.GetVoiceResponse:
        response: synthesize_pb2.GetVoiceResponse = await self.unary(
            self.stub.GetVoice,
            synthesize_pb2.GetVoiceRequest(voice_id=voice_id),
            self.settings.lookup_timeout_s,
        )
        return response


class AnimateClient(Stage):
    def __init__(self, address: str, settings: StageSettings) -> None:
        super().__init__("animate", address, settings)
        self.stub = animate_pb2_grpc.AnimateServiceStub(self.channel)

    def animate(
        self, requests: AsyncIterator[animate_pb2.AnimateRequest]
    ) -> AsyncIterator[animate_pb2.AnimateResponse]:
        return self.bidi(self.stub.Animate, requests, self.settings.animate_timeout_s)

    async def get_avatar(self, avatar_id: str) -> animate_pb2.GetAvatarResponse:
        response: animate_pb2.GetAvatarResponse = await self.unary(
            self.stub.GetAvatar,
            animate_pb2.GetAvatarRequest(avatar_id=avatar_id),
            self.settings.lookup_timeout_s,
        )
        return response

    async def render(
        self,
        request: animate_pb2.RenderRequest,
        on_response: Callable[[animate_pb2.RenderResponse], Awaitable[None]] | None = None,
    ) -> tuple[bytes, animate_pb2.RenderResult | None]:
        """An mp4 from Animate's Render: its bytes and its result; each response is
        also handed to `on_response` as it arrives (progress for a client)."""
        mp4 = bytearray()
        result = None
        async for response in self.stream(
            self.stub.Render, request, self.settings.render_timeout_s
        ):
            which = response.WhichOneof("response")
            if which == "chunk":
                mp4.extend(response.chunk.content)
            elif which == "result":
                result = response.result
            if on_response is not None:
                await on_response(response)
        return bytes(mp4), result


class Stages:
    """The four stage clients."""

    def __init__(self, settings: StageSettings) -> None:
        self.asr = AsrClient(settings.stage_address("asr"), settings)
        self.chat = ChatClient(settings.stage_address("chat"), settings)
        self.synthesize = SynthesizeClient(settings.stage_address("synthesize"), settings)
        self.animate = AnimateClient(settings.stage_address("animate"), settings)
        self.by_name: dict[str, Stage] = {
            stage.name: stage for stage in (self.asr, self.chat, self.synthesize, self.animate)
        }
        assert tuple(self.by_name) == STAGES

    def start_watching(self, on_change: Callable[[Stage], None]) -> None:
        for stage in self.by_name.values():
            stage.on_change = on_change
            stage.start_watching()

    async def check_ids(self, voice_id: str, avatar_id: str) -> None:
        """Unknown voices and avatars fail at once with NOT_FOUND (empty ids are not
        looked up), so a call never fails for them halfway."""
        if voice_id:
            await self.synthesize.get_voice(voice_id)
        if avatar_id:
            await self.animate.get_avatar(avatar_id)

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
