"""A turn from its question to its archive record: the reply through the stages
(`turns.Reply`), the turn's metrics, its record in the archive (the video of a
live turn rendered afterwards), and the event that ends it. The gateway's Ask
and Converse both run their turns here."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from google.protobuf.json_format import MessageToDict
from prometheus_client import Counter, Histogram

from pipeline.archive import Archive, Archivist
from pipeline.config import StageSettings
from pipeline.reply import Reply, render_request
from pipeline.stages import StageFailure, Stages
from pipeline.turns import CallContext, Emit, HeldEmit, ReplyOptions, Turn
from services.common.errors import InvalidInput, TalkerError
from services.common.metrics import LATENCY_BUCKETS
from talker.v1 import asr_pb2, chat_pb2, talker_pb2

log = logging.getLogger("talker.pipeline.runner")

TURNS = Counter("talker_gateway_turns_total", "Turns ended, by outcome.", ["outcome"])
MILESTONE_SECONDS = Histogram(
    "talker_gateway_turn_milestone_seconds",
    "Time from the start of a turn (end of the utterance, or the question's arrival) to "
    "each milestone: asr_final, first_token, first_sentence, first_audio, first_frame, total.",
    ["milestone"],
    buckets=LATENCY_BUCKETS,
)


class TurnRunner:
    def __init__(self, settings: StageSettings, stages: Stages, archive_media: str) -> None:
        self.settings = settings
        self.stages = stages
        self.archive = Archive(settings.archive_dir, settings.archive_retention_days)
        self.archivist = Archivist(self.archive, archive_media)

    async def transcribe(
        self, clip: talker_pb2.AudioClip, language: str, turn: Turn, emit: Emit
    ) -> None:
        """A recorded question to the turn's text, told to the client as a final transcript."""
        response = await self.stages.asr.recognize(
            asr_pb2.RecognizeRequest(
                format=clip.format,
                audio=clip.audio,
                config=asr_pb2.RecognitionConfig(language=language),
            )
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

    async def run(
        self, turn: Turn, call: CallContext, emit: Emit, end_on_error: bool = False
    ) -> None:
        """The reply to `turn.user_text`, archived and ended with `turn_finished`, or
        with an `error` event naming the stage that failed (raised instead with
        `end_on_error`: an Ask ends with a status)."""
        reply = Reply(self.stages, call, turn, emit)
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
            mp4, _ = await self.stages.animate.render(request)
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

    async def interrupted(self, turn: Turn, call: CallContext) -> None:
        """A turn the user talked over: its record says so."""
        TURNS.labels("interrupted").inc()
        await self.archivist.keep(self._record(turn, call, "interrupted"), call.user_id, call.scene)
