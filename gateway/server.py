"""TalkerService: the public entry point. Validates a call, then runs its
turns through the four stages (gateway/turns.py), archives each turn, and
reports every failure as a status or event naming the stage that failed."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import soundfile
from google.protobuf.json_format import MessageToDict
from grpc import aio
from grpc_health.v1 import health_pb2
from prometheus_client import Counter, Histogram

from gateway.access import ApiKeyInterceptor, server_credentials
from gateway.admission import Admission
from gateway.archive import Archive, Archivist
from gateway.config import GatewaySettings
from gateway.conversation import Conversation
from gateway.downstream import LABELS, Stage, StageFailure, Stages
from gateway.jobs import JobRpcs
from gateway.turns import (
    CallContext,
    HeldEmit,
    Reply,
    ReplyOptions,
    Turn,
    checked_text,
    render_request,
    stream_events,
)
from services.common.audio import raw_layout
from services.common.errors import InvalidInput, LimitExceeded, TalkerError
from services.common.ids import check_id, new_id
from services.common.metrics import LATENCY_BUCKETS
from services.common.runtime import GrpcProgram, run_program
from services.common.tracing import current_trace_id
from talker.v1 import (
    asr_pb2,
    audio_pb2,
    chat_pb2,
    talker_pb2,
    talker_pb2_grpc,
)

log = logging.getLogger("talker.gateway")

TURNS = Counter("talker_gateway_turns_total", "Turns ended, by outcome.", ["outcome"])
MILESTONE_SECONDS = Histogram(
    "talker_gateway_turn_milestone_seconds",
    "Time from the start of a turn (end of the utterance, or the question's arrival) to "
    "each milestone: asr_final, first_token, first_sentence, first_audio, first_frame, total.",
    ["milestone"],
    buckets=LATENCY_BUCKETS,
)

SERVICE_NAME = talker_pb2.DESCRIPTOR.services_by_name["TalkerService"].full_name


# JobRpcs: SubmitRender, GetJob, ListJobs and CancelJob (gateway/jobs.py).
class TalkerServicer(JobRpcs, talker_pb2_grpc.TalkerServiceServicer):
    def __init__(self, settings: GatewaySettings, stages: Stages) -> None:
        self.settings = settings
        self.stages = stages
        self.archive = Archive(settings.archive_dir, settings.archive_retention_days)
        self.archivist = Archivist(self.archive, settings.archive_media)
        self.admission = Admission(settings.max_conversations, settings.busy_retry_after_s)

    # ---- Ask ------------------------------------------------------------------
    async def Ask(
        self, request: talker_pb2.AskRequest, context: aio.ServicerContext
    ) -> AsyncIterator[talker_pb2.AskResponse]:
        with self.admission.slot("ask"):
            async for response in self._ask(request):
                yield response

    async def _ask(self, request: talker_pb2.AskRequest) -> AsyncIterator[talker_pb2.AskResponse]:
        trace_id = current_trace_id.get()
        user_id = check_id(request.user_id, "user_id", allow_empty=True)
        scene = check_id(request.scene, "scene", allow_empty=True)
        session_id = check_id(request.session_id, "session_id", allow_empty=True) or new_id()
        options = reply_options(request, render_mp4=request.render_mp4)
        which = request.WhichOneof("question")
        if which is None:
            raise InvalidInput("The question is missing: set `text` or `audio`.")
        if which == "text":
            checked_text(request.text, self.settings.max_question_chars, "The question")
        else:
            self._check_clip(request.audio)
        await self._check_ids(options)
        call = CallContext(trace_id, session_id, user_id, scene, options)
        log.info(
            "ask",
            extra={"session_id": session_id, "user_id": user_id, "scene": scene, "question": which},
        )
        yield talker_pb2.AskResponse(
            event=talker_pb2.ConverseEvent(
                started=talker_pb2.ConverseStarted(session_id=session_id, trace_id=trace_id)
            )
        )
        events: asyncio.Queue[Any] = asyncio.Queue()
        turn = Turn(index=0)

        async def emit(event: talker_pb2.ConverseEvent) -> None:
            events.put_nowait(event)

        async def ask() -> None:
            if which == "audio":
                await self._transcribe(request, turn, emit)
            else:
                turn.user_text = request.text.strip()
            await self._run_turn(turn, call, emit, end_on_error=True)

        async for event in stream_events(events, ask()):
            yield talker_pb2.AskResponse(event=event)

    def _check_clip(self, clip: talker_pb2.AudioClip) -> None:
        """Size and length from the header or the byte count, without decoding:
        ASR decodes the clip once, and says what is wrong with one it cannot read."""
        if not clip.audio:
            raise InvalidInput("The question audio is empty.")
        seconds = clip_seconds(clip)
        if seconds > self.settings.max_clip_s:
            raise LimitExceeded(
                f"The question audio is {seconds:.1f} s long; at most "
                f"{self.settings.max_clip_s:.0f} s are accepted."
            )

    async def _transcribe(self, request: talker_pb2.AskRequest, turn: Turn, emit: Any) -> None:
        language = "" if request.language in ("", "auto") else request.language
        response = await self.stages.asr.unary(
            self.stages.asr_stub.Recognize,
            asr_pb2.RecognizeRequest(
                format=request.audio.format,
                audio=request.audio.audio,
                config=asr_pb2.RecognitionConfig(language=language),
            ),
            self.settings.asr_timeout_s,
        )
        turn.mark("asr_final_ms")
        turn.user_text = response.text.strip()
        turn.language = response.language
        await emit(
            turn.event(
                transcript=asr_pb2.StreamingRecognitionResult(
                    text=response.text,
                    is_final=True,
                    language=response.language,
                    end_ms=response.audio_duration_ms,
                    segments=response.segments,
                    stability=1.0,
                )
            )
        )
        if not turn.user_text:
            raise InvalidInput("No speech was heard in the question audio.")

    # ---- Converse ---------------------------------------------------------------
    async def Converse(
        self,
        request_iterator: AsyncIterator[talker_pb2.ConverseRequest],
        context: aio.ServicerContext,
    ) -> AsyncIterator[talker_pb2.ConverseResponse]:
        # Refused before reading anything: a full gateway answers at once.
        with self.admission.slot("converse"):
            async for response in self._converse(request_iterator):
                yield response

    async def _converse(
        self, request_iterator: AsyncIterator[talker_pb2.ConverseRequest]
    ) -> AsyncIterator[talker_pb2.ConverseResponse]:
        trace_id = current_trace_id.get()
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            raise InvalidInput("The stream ended before its first message (the config).") from None
        if first.WhichOneof("request") != "config":
            raise InvalidInput(
                f"The first message of Converse must carry `config`; it carried "
                f"{first.WhichOneof('request') or 'nothing'}."
            )
        config = first.config
        user_id = check_id(config.user_id, "user_id", allow_empty=True)
        scene = check_id(config.scene, "scene", allow_empty=True)
        session_id = check_id(config.session_id, "session_id", allow_empty=True) or new_id()
        options = reply_options(config)
        await self._check_ids(options)
        call = CallContext(trace_id, session_id, user_id, scene, options)

        async def run_turn(turn: Turn, emit: Any) -> None:
            await self._run_turn(turn, call, emit)

        async def interrupted(turn: Turn) -> None:
            TURNS.labels("interrupted").inc()
            await self.archivist.keep(self._record(turn, call, "interrupted"), user_id, scene)

        conversation = Conversation(
            self.stages,
            config,
            session_id,
            trace_id,
            run_turn,
            interrupted,
            self.settings.max_question_chars,
            self.settings.converse_max_s,
            self.settings.speculative_replies,
            self.settings.lookup_timeout_s,
        )
        log.info("converse", extra={"session_id": session_id, "user_id": user_id, "scene": scene})
        async for event in conversation.run(request_iterator):
            yield talker_pb2.ConverseResponse(event=event)

    # ---- a turn -----------------------------------------------------------------
    async def _run_turn(
        self, turn: Turn, call: CallContext, emit: Any, end_on_error: bool = False
    ) -> None:
        reply = Reply(self.stages, self.settings, call, turn, emit)
        try:
            await reply.run()
        except TalkerError as error:
            if isinstance(emit, HeldEmit):
                await emit.confirmed.wait()
            failure = StageFailure.of(error)
            log.warning(
                "turn failed",
                extra={"turn_index": turn.index, "stage": failure.stage, "code": failure.code.name},
            )
            record = self._record(turn, call, "error")
            TURNS.labels("error").inc()
            record["error"] = {
                "stage": failure.stage,
                "code": failure.code.name,
                "message": str(failure),
            }
            await self.archivist.keep(record, call.user_id, call.scene)
            if end_on_error:
                raise failure from None
            await emit(turn.event(error=failure.turn_error(call.trace_id)))
            return
        if isinstance(emit, HeldEmit):
            await emit.confirmed.wait()  # a guess that is never confirmed leaves no trace
        turn.mark("total_ms")
        TURNS.labels("finished").inc()
        for name, value in turn.timings.ListFields():
            MILESTONE_SECONDS.labels(name.name.removesuffix("_ms")).observe(value / 1000)
        record = self._record(turn, call, "finished")
        render = (
            self._archive_renderer(call.options, turn.phonemes) if call.options.avatar_id else None
        )
        path = await self.archivist.keep(
            record,
            call.user_id,
            call.scene,
            bytes(turn.audio),
            turn.audio_rate_hz,
            bytes(turn.mp4),
            render,
        )
        finished = turn.finished or chat_pb2.ReplyFinished()
        log.info(
            "turn finished",
            extra={
                "turn_index": turn.index,
                "timings": MessageToDict(turn.timings),
                "reply_timeline": turn.reply_timeline(),
                "reply_audio_ms": turn.audio_ms,
                "frames": turn.frames,
                "archive_path": path,
            },
        )
        await emit(
            turn.event(
                turn_finished=talker_pb2.TurnFinished(
                    trace_id=call.trace_id,
                    user_text=turn.user_text,
                    reply_text=finished.text or turn.reply_text,
                    finish_reason=finished.finish_reason,
                    usage=finished.usage,
                    timings=turn.timings,
                    reply_audio_ms=turn.audio_ms,
                    archive_path=path,
                    mp4=turn.render,
                )
            )
        )

    def _archive_renderer(self, options: ReplyOptions, phonemes: list[Any]) -> Any:
        async def render(audio: bytes, rate: int) -> bytes:
            # Nobody waits on the archive copy: it must not slow the next live turn.
            request = render_request(
                options.avatar_id, audio, rate, options.fps, background=True, phonemes=phonemes
            )
            mp4, _ = await self.stages.render(request, self.settings.render_timeout_s)
            return mp4

        return render

    def _record(self, turn: Turn, call: CallContext, status: str) -> dict[str, Any]:
        finished = turn.finished or chat_pb2.ReplyFinished()
        options = call.options
        return {
            "trace_id": call.trace_id,
            "status": status,
            "created": datetime.now(UTC).isoformat(),
            "session_id": call.session_id,
            "user_id": call.user_id,
            "scene": call.scene,
            "turn_index": turn.index,
            "user_text": turn.user_text,
            "language": turn.language,
            "reply_text": turn.reply_text,
            "finish_reason": chat_pb2.FinishReason.Name(finished.finish_reason),
            "usage": MessageToDict(finished.usage, preserving_proto_field_name=True),
            "mode": talker_pb2.ReplyMode.Name(options.mode),
            "voice_id": options.voice_id,
            "voices_used": turn.voices_used,
            "avatar_id": options.avatar_id,
            "reply_audio_ms": turn.audio_ms,
            "reply_audio_rate_hz": turn.audio_rate_hz,
            "video_frames": turn.frames,
            "timings_ms": MessageToDict(
                turn.timings,
                preserving_proto_field_name=True,
                always_print_fields_with_no_presence=True,
            ),
            "stages": {
                name: {"address": stage.address, "model": stage.model_id}
                for name, stage in self.stages.by_name.items()
            },
        }

    async def _check_ids(self, options: ReplyOptions) -> None:
        """Unknown voices and avatars fail the call at once with NOT_FOUND, not mid-reply."""
        await self.stages.check_ids(
            options.voice_id if options.speaks else "",
            options.avatar_id if options.live_video or options.render_mp4 else "",
            self.settings.lookup_timeout_s,
        )


def clip_seconds(clip: talker_pb2.AudioClip) -> float:
    fmt = clip.format
    if fmt.encoding in (audio_pb2.AUDIO_ENCODING_PCM_S16LE, audio_pb2.AUDIO_ENCODING_PCM_F32LE):
        layout = raw_layout(fmt.encoding, fmt.sample_rate_hz, fmt.channels)
        return len(clip.audio) / layout.bytes_per_frame / layout.sample_rate_hz
    try:
        info = soundfile.info(io.BytesIO(clip.audio))
    except Exception:  # not a readable file: ASR will say exactly why
        return 0.0
    return float(info.frames) / info.samplerate if info.samplerate else 0.0


MAX_FPS = 60
MIN_RATE_HZ, MAX_RATE_HZ = 8000, 48000


def reply_options(
    request: talker_pb2.ConverseConfig | talker_pb2.AskRequest, render_mp4: bool = False
) -> ReplyOptions:
    """Checks the reply settings shared by ConverseConfig and AskRequest."""
    mode = request.mode or talker_pb2.REPLY_MODE_AUDIO
    if mode not in talker_pb2.ReplyMode.values():
        raise InvalidInput(f"mode {mode} is not a ReplyMode; use TEXT, AUDIO or AUDIO_VIDEO.")
    voice_id = request.voice_id
    if voice_id:
        check_id(voice_id, "voice_id")
    avatar_id = request.avatar_id
    if avatar_id:
        check_id(avatar_id, "avatar_id")
    if (mode == talker_pb2.REPLY_MODE_AUDIO_VIDEO or render_mp4) and not avatar_id:
        raise InvalidInput(
            "avatar_id is required to show video (REPLY_MODE_AUDIO_VIDEO or render_mp4): "
            "create one with AnimateService.CreateAvatar."
        )
    rate = request.output_sample_rate_hz
    if rate and not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:
        raise InvalidInput(
            f"output_sample_rate_hz is {rate}; use {MIN_RATE_HZ} to {MAX_RATE_HZ} (0 = the voice's own)."
        )
    if request.fps > MAX_FPS:
        raise InvalidInput(f"fps is {request.fps}; use 1 to {MAX_FPS} (0 = 25).")
    if request.jpeg_quality > 100:
        raise InvalidInput(f"jpeg_quality is {request.jpeg_quality}; use 1 to 100 (0 = default).")
    return ReplyOptions(
        mode=mode,
        voice_id=voice_id,
        avatar_id=avatar_id,
        output_sample_rate_hz=rate,
        frame_encoding=request.frame_encoding,
        fps=request.fps or 25,
        jpeg_quality=request.jpeg_quality,
        sampling=request.sampling if request.HasField("sampling") else None,
        render_mp4=render_mp4,
    )


def build_program(settings: GatewaySettings) -> GrpcProgram:
    holder: dict[str, Any] = {}
    all_serving = threading.Event()
    pending: set[asyncio.Future[None]] = set()

    def add_servicers(server: aio.Server) -> None:
        # Called inside the running loop: channels and health watches live on it.
        stages = Stages(settings)
        holder["stages"] = stages
        servicer = TalkerServicer(settings, stages)
        holder["servicer"] = servicer
        talker_pb2_grpc.add_TalkerServiceServicer_to_server(servicer, server)
        stages.start_watching(lambda stage: on_change(stages, stage))
        holder["sweeper"] = asyncio.create_task(sweep_archive(servicer.archive))

    def on_change(stages: Stages, stage: Stage) -> None:
        down = stages.down()
        if not down:
            all_serving.set()
        if program.ready:
            # The gateway itself stays SERVING (the watchdog must not restart it for
            # another program's fault); its service name tells balancers which stage is out.
            status = (
                health_pb2.HealthCheckResponse.NOT_SERVING
                if down
                else health_pb2.HealthCheckResponse.SERVING
            )
            task = asyncio.ensure_future(program.health.set(SERVICE_NAME, status))
            pending.add(task)
            task.add_done_callback(pending.discard)
            if down:
                log.warning(
                    "a stage is down",
                    extra={"down": down, "stages": {n: LABELS[n] for n in down}},
                )

    def load() -> None:
        # SERVING only once every stage is: that is the start order, without sleeps.
        while not all_serving.wait(5.0):
            log.info("waiting for stages", extra={"down": holder["stages"].down()})

    async def on_stop() -> None:
        holder["sweeper"].cancel()
        await holder["servicer"].archivist.drain()
        await holder["servicer"].close_job_queue()
        await holder["stages"].close()

    program = GrpcProgram(
        settings,
        [SERVICE_NAME],
        add_servicers,
        load,
        interceptors=[ApiKeyInterceptor(settings.accepted_keys())],
        credentials=server_credentials(settings),
        on_stop=on_stop,
    )
    return program


ARCHIVE_SWEEP_INTERVAL_S = 3600.0


async def sweep_archive(archive: Archive) -> None:
    """Retention and crash leftovers, at start and then hourly."""
    while True:
        removed = await asyncio.to_thread(archive.sweep)
        log.info("archive swept", extra={"folders_removed": removed})
        await asyncio.sleep(ARCHIVE_SWEEP_INTERVAL_S)


def main() -> None:
    run_program(GatewaySettings, build_program)


if __name__ == "__main__":
    main()
