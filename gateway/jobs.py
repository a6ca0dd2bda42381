"""The render-job RPCs of TalkerService: SubmitRender, GetJob, ListJobs and
CancelJob. They check the request and translate between messages and the
queue (pipeline/jobs_queue.py); workers (jobs/worker.py) do the rendering.

A mixin of TalkerServicer: it uses the servicer's `stages` (to refuse an
unknown avatar or voice at once) and nothing else of it. The queue connects
to Redis on first use, so Ask and Converse never depend on Redis."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config import GatewaySettings
from pipeline.config import JobSettings
from pipeline.jobs_queue import (
    CANCELLED,
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    JobQueue,
    JobRecord,
    JobSpec,
)
from pipeline.stages import PIPELINE_STAGE, Stages
from services.common.audio import decode_clip
from services.common.errors import InvalidInput, LimitExceeded, StageUnavailable
from services.common.ids import check_id
from services.common.tracing import current_trace_id
from talker.v1 import talker_pb2

STATE_OF = {
    QUEUED: talker_pb2.JOB_STATE_QUEUED,
    RUNNING: talker_pb2.JOB_STATE_RUNNING,
    DONE: talker_pb2.JOB_STATE_DONE,
    FAILED: talker_pb2.JOB_STATE_FAILED,
    CANCELLED: talker_pb2.JOB_STATE_CANCELLED,
}
STATE_NAME = {value: name for name, value in STATE_OF.items()}
PRIORITY_OF = {"high": talker_pb2.JOB_PRIORITY_HIGH, "normal": talker_pb2.JOB_PRIORITY_NORMAL}
PRIORITY_NAME = {
    talker_pb2.JOB_PRIORITY_UNSPECIFIED: "normal",
    talker_pb2.JOB_PRIORITY_NORMAL: "normal",
    talker_pb2.JOB_PRIORITY_HIGH: "high",
}
MIN_FPS, MAX_FPS = 10, 30
MAX_PAGE_SIZE, DEFAULT_PAGE_SIZE = 100, 20


class JobRpcs:
    """SubmitRender, GetJob, ListJobs, CancelJob (mixed into TalkerServicer)."""

    stages: Stages
    settings: GatewaySettings
    _job_queue: JobQueue | None = None

    @property
    def job_queue(self) -> JobQueue:
        # Made on first use, inside the server's event loop (redis.asyncio binds to it).
        if self._job_queue is None:
            self._job_queue = JobQueue(JobSettings())
        return self._job_queue

    async def SubmitRender(
        self, request: talker_pb2.SubmitRenderRequest, context: aio.ServicerContext
    ) -> talker_pb2.SubmitRenderResponse:
        queue = self.job_queue
        limits = queue.settings
        user_id = check_id(request.user_id, "user_id", allow_empty=True)
        scene = check_id(request.scene, "scene", allow_empty=True)
        if not request.avatar_id:
            raise InvalidInput(
                "avatar_id is required: the avatar that speaks (AnimateService.CreateAvatar)."
            )
        avatar_id = check_id(request.avatar_id, "avatar_id")
        voice_id = check_id(request.voice_id, "voice_id", allow_empty=True)
        if request.priority not in PRIORITY_NAME:
            raise InvalidInput(
                f"priority {request.priority} is not a JobPriority; use NORMAL or HIGH."
            )
        if request.fps and not MIN_FPS <= request.fps <= MAX_FPS:
            raise InvalidInput(f"fps is {request.fps}; use {MIN_FPS} to {MAX_FPS} (0 = 25).")
        spec = JobSpec(
            priority=PRIORITY_NAME[request.priority],
            user_id=user_id,
            scene=scene,
            avatar_id=avatar_id,
            voice_id=voice_id,
            fps=request.fps,
            trace_id=current_trace_id.get(),
        )
        which = request.WhichOneof("input")
        if which is None:
            raise InvalidInput("The job has no input: set `script` (text to speak) or `audio`.")
        if which == "script":
            script = request.script.strip()
            if not script:
                raise InvalidInput("The script is empty: give the text the avatar should say.")
            if len(script) > limits.max_script_chars:
                raise LimitExceeded(
                    f"The script has {len(script)} characters; at most "
                    f"{limits.max_script_chars} are accepted. Split it into several jobs."
                )
            spec.script = script
        else:
            if voice_id:
                raise InvalidInput(
                    "voice_id applies to scripts only: an audio job is rendered with the "
                    "clip as recorded. Leave voice_id empty."
                )
            clip = request.audio
            if not clip.audio:
                raise InvalidInput("The job's audio clip is empty.")
            audio, rate = decode_clip(
                clip.audio, clip.format.encoding, clip.format.sample_rate_hz, clip.format.channels
            )
            seconds = len(audio) / rate
            if seconds > limits.max_audio_s:
                raise LimitExceeded(
                    f"The clip is {seconds:.1f} s long; at most {limits.max_audio_s:.0f} s are "
                    "accepted. Split it into several jobs."
                )
            spec.audio = clip.audio
            spec.audio_encoding = clip.format.encoding
            spec.audio_rate_hz = clip.format.sample_rate_hz
            spec.audio_channels = clip.format.channels
            spec.audio_ms = max(1, int(seconds * 1000))
        # Unknown avatars and voices fail the submit with NOT_FOUND, not the job later.
        await self.stages.check_ids(voice_id, avatar_id)
        record = await self._queued(queue.submit(spec))
        return talker_pb2.SubmitRenderResponse(job=job_message(record))

    async def GetJob(
        self, request: talker_pb2.GetJobRequest, context: aio.ServicerContext
    ) -> talker_pb2.GetJobResponse:
        job_id = check_id(request.job_id, "job_id")
        record = await self._queued(self.job_queue.get(job_id))
        return talker_pb2.GetJobResponse(job=job_message(record))

    async def ListJobs(
        self, request: talker_pb2.ListJobsRequest, context: aio.ServicerContext
    ) -> talker_pb2.ListJobsResponse:
        if request.state and request.state not in STATE_NAME:
            raise InvalidInput(f"state {request.state} is not a JobState.")
        user_id = check_id(request.user_id, "user_id", allow_empty=True)
        if request.page_size > MAX_PAGE_SIZE:
            raise InvalidInput(f"page_size is {request.page_size}; at most {MAX_PAGE_SIZE}.")
        offset = 0
        if request.page_token:
            if not request.page_token.isdigit():
                raise InvalidInput(
                    "page_token is not one this server gave: pass next_page_token as it came."
                )
            offset = int(request.page_token)
        records, next_offset = await self._queued(
            self.job_queue.page(
                STATE_NAME.get(request.state, ""),
                user_id,
                request.page_size or DEFAULT_PAGE_SIZE,
                offset,
            )
        )
        return talker_pb2.ListJobsResponse(
            jobs=[job_message(record) for record in records],
            next_page_token="" if next_offset is None else str(next_offset),
        )

    async def CancelJob(
        self, request: talker_pb2.CancelJobRequest, context: aio.ServicerContext
    ) -> talker_pb2.CancelJobResponse:
        job_id = check_id(request.job_id, "job_id")
        record = await self._queued(self.job_queue.cancel(job_id))
        return talker_pb2.CancelJobResponse(job=job_message(record))

    async def _queued(self, operation: Any) -> Any:
        """Runs a queue call; Redis away becomes UNAVAILABLE with a sentence."""
        try:
            return await operation
        except (RedisConnectionError, RedisTimeoutError) as error:
            raise StageUnavailable(
                f"The job queue (Redis at {self.job_queue.address}) is unavailable: "
                f"{error}. Try again shortly. [trace id {current_trace_id.get()}]"
            ) from None

    async def close_job_queue(self) -> None:
        if self._job_queue is not None:
            await self._job_queue.close()


def timestamp(ms: int) -> Timestamp | None:
    if not ms:
        return None
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def job_message(record: JobRecord) -> talker_pb2.Job:
    job = talker_pb2.Job(
        job_id=record.job_id,
        state=STATE_OF.get(record.state, talker_pb2.JOB_STATE_UNSPECIFIED),
        priority=PRIORITY_OF.get(record.priority, talker_pb2.JOB_PRIORITY_NORMAL),
        user_id=record.user_id,
        scene=record.scene,
        avatar_id=record.avatar_id,
        voice_id=record.voice_id,
        script=record.script,
        audio_ms=record.audio_ms,
        trace_id=record.trace_id,
        create_time=timestamp(record.created_ms),
        start_time=timestamp(record.started_ms),
        end_time=timestamp(record.ended_ms),
        attempts=record.attempts,
        max_attempts=record.max_attempts,
        worker=record.worker,
        archive_path=record.archive_path,
    )
    if record.result:
        job.result.ParseFromString(record.result)
    if record.error_message:
        job.error.CopyFrom(
            talker_pb2.JobError(
                # The worker itself (not a stage) is reported as the gateway side.
                stage=PIPELINE_STAGE.get(record.error_stage, talker_pb2.PIPELINE_STAGE_GATEWAY),
                code=record.error_code,
                message=record.error_message,
                trace_id=record.trace_id,
            )
        )
    return job
