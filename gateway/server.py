"""TalkerService: the public entry point. Validates a call, then hands its
turns to the pipeline (pipeline/runner.py: the stages, the archive) and, for
Converse, to the conversation's state machine (gateway/conversation.py)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from grpc import aio
from grpc_health.v1 import health_pb2

from gateway.access import ApiKeyInterceptor, server_credentials
from gateway.admission import Admission
from gateway.checks import checked_text, clip_seconds, reply_options
from gateway.config import GatewaySettings
from gateway.conversation import Conversation
from gateway.downloads import DownloadRpcs
from gateway.jobs import JobRpcs
from pipeline.archive import Archive
from pipeline.runner import TurnRunner
from pipeline.stages import LABELS, Stage, Stages
from pipeline.turns import CallContext, ReplyOptions, Turn
from services.common.errors import InvalidInput, LimitExceeded
from services.common.ids import check_id, new_id
from services.common.runtime import GrpcProgram, run_program
from services.common.tasks import stream_events
from services.common.tracing import current_trace_id
from talker.v1 import (
    talker_pb2,
    talker_pb2_grpc,
)

log = logging.getLogger("talker.gateway")

SERVICE_NAME = talker_pb2.DESCRIPTOR.services_by_name["TalkerService"].full_name


# JobRpcs: SubmitRender, GetJob, ListJobs and CancelJob (gateway/jobs.py);
# DownloadRpcs: DownloadFile (gateway/downloads.py).
class TalkerServicer(JobRpcs, DownloadRpcs, talker_pb2_grpc.TalkerServiceServicer):
    def __init__(self, settings: GatewaySettings, stages: Stages) -> None:
        self.settings = settings
        self.stages = stages
        self.runner = TurnRunner(settings, stages, settings.archive_media)
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
                language = "" if request.language in ("", "auto") else request.language
                await self.runner.transcribe(request.audio, language, turn, emit)
            else:
                turn.user_text = request.text.strip()
            await self.runner.run(turn, call, emit, end_on_error=True)

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
        conversation = Conversation(self.runner, call, config, self.settings)
        log.info("converse", extra={"session_id": session_id, "user_id": user_id, "scene": scene})
        async for event in conversation.run(request_iterator):
            yield talker_pb2.ConverseResponse(event=event)

    async def _check_ids(self, options: ReplyOptions) -> None:
        """Unknown voices and avatars fail the call at once with NOT_FOUND, not mid-reply."""
        await self.stages.check_ids(
            options.voice_id if options.speaks else "",
            options.avatar_id if options.live_video or options.render_mp4 else "",
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
        holder["sweeper"] = asyncio.create_task(sweep_archive(servicer.runner.archive))

    def on_change(stages: Stages, stage: Stage) -> None:
        down = stages.down()
        if not down:
            all_serving.set()
        if program.ready:
            task = asyncio.ensure_future(publish(stages))
            pending.add(task)
            task.add_done_callback(pending.discard)

    async def publish(stages: Stages) -> None:
        # The gateway itself stays SERVING (the watchdog must not restart it for
        # another program's fault); its service name tells balancers which stage is out.
        down = stages.down()
        status = (
            health_pb2.HealthCheckResponse.NOT_SERVING
            if down
            else health_pb2.HealthCheckResponse.SERVING
        )
        await program.health.set(SERVICE_NAME, status)
        if down:
            log.warning(
                "a stage is down", extra={"down": down, "stages": {n: LABELS[n] for n in down}}
            )

    def load() -> None:
        # SERVING once every stage is: that is the start order, without sleeps. Not
        # forever: a stage that never comes up (over its memory ceiling, a broken
        # model) would keep the gateway NOT_SERVING, and the watchdog would restart
        # it, again and again, for another program's fault.
        waited_s = 0.0
        while not all_serving.wait(min(5.0, settings.stages_wait_s - waited_s)):
            waited_s += 5.0
            down = holder["stages"].down()
            if waited_s >= settings.stages_wait_s:
                log.warning("serving without every stage", extra={"down": down})
                return
            log.info("waiting for stages", extra={"down": down})

    async def on_stop() -> None:
        holder["sweeper"].cancel()
        await holder["servicer"].runner.archivist.drain()
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

    async def on_ready() -> None:
        await publish(holder["stages"])

    program.on_ready = on_ready
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
