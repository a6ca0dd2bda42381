"""The render worker: `python -m jobs.worker`.

Takes jobs from the queue (HIGH before NORMAL; jobs of dead workers after
`claim_idle_s`), speaks a script through SynthesizeService, renders the audio
through AnimateService's Render, archives the mp4 and its JSON record
(`{root}/{date}/{user_id}_{timestamp}_{scene}.mp4`, temp name then rename),
and only then records the job as done and acknowledges its entry.

It calls the stages exactly as the gateway does (pipeline.stages.Stages:
trace ids, retries while a stage restarts, errors naming the stage), with the
same settings for addresses, deadlines and the archive folder
(pipeline.config.StageSettings, as `TALKER_WORKER_*`). Each job
runs under its submit call's trace id, so one grep follows it from
SubmitRender through every attempt to the archive record.

Liveness: the worker serves grpc.health.v1 (on a free port unless
TALKER_WORKER_PORT is set; Kubernetes probes it). It is SERVING while its loop
runs and NOT_SERVING while Redis cannot be reached. A stage that is down is
not the worker's fault: it waits (taking no job) and stays SERVING. Several workers
share a host, so each takes free ports (health and /metrics) and announces
them in `$TALKER_VAR_DIR/run/workers/<supervisord name>.json`: the watchdog
probes every worker found there like the other programs (and restarts a hung
or NOT_SERVING one), and Prometheus reads the same folder's `*.targets.json`
(file_sd). supervisord restarts a worker that exits; the watchdog kills one that
hangs (its job goes to another after `claim_idle_s`) and restarts one that is
NOT_SERVING past its grace (over its memory ceiling, or Redis away that long:
harmless, the new worker reconnects the same way).

Metrics: attempts by outcome, busy (1 while a job runs), and the queue as
Redis holds it (read every `stats_interval_s`; every worker exports the same
values, so take `max` across workers): waiting and running entries and the
age of the oldest waiting one per priority, the failed list's length."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.json_format import MessageToDict
from grpc import aio
from prometheus_client import Counter, Gauge, Histogram, start_http_server
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from jobs.config import WorkerSettings
from pipeline.archive import Archive, ArchiveEntry
from pipeline.config import JobSettings
from pipeline.jobs_queue import Delivery, JobQueue, Lease
from pipeline.stages import StageFailure, Stages, pcm_s16le
from services.common.errors import TalkerError
from services.common.runtime import GrpcProgram, run_program
from services.common.tracing import current_trace_id
from talker.v1 import animate_pb2, audio_pb2, synthesize_pb2

log = logging.getLogger("talker.jobs.worker")

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError)
ATTEMPTS = Counter(
    "talker_job_attempts_total",
    "Job attempts ended, by outcome: done, retry, failed (attempts used up), "
    "cancelled, lost (taken over), released (worker stopping).",
    ["outcome"],
)
JOB_SECONDS = Histogram(
    "talker_job_attempt_seconds",
    "Time of a successful attempt by step: synthesize, render, total.",
    ["step"],
    buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)
BUSY = Gauge("talker_worker_busy", "1 while this worker runs a job, 0 while it is idle.")
QUEUE_WAITING = Gauge(
    "talker_jobs_queue_depth", "Jobs waiting for a worker, by priority.", ["priority"]
)
QUEUE_RUNNING = Gauge("talker_jobs_running", "Jobs being run, by priority.", ["priority"])
OLDEST_WAITING = Gauge(
    "talker_jobs_oldest_waiting_seconds",
    "Age of the oldest job no worker has taken yet, by priority; 0 when none waits.",
    ["priority"],
)
FAILED_LIST = Gauge("talker_jobs_failed_list_length", "Jobs on the failed list (attempts used up).")
T = TypeVar("T")


class Rendered:
    """What one attempt made: the mp4, its RenderResult and how long each step took."""

    def __init__(self, mp4: bytes, result: animate_pb2.RenderResult, timings: dict[str, int]):
        self.mp4 = mp4
        self.result = result
        self.timings = timings


class Worker:
    def __init__(self, settings: WorkerSettings, job_settings: JobSettings) -> None:
        self.settings = settings
        self.job_settings = job_settings
        #: Unique per process: a restarted worker is a new consumer, and the
        #: entries of the old one are taken over like any dead worker's.
        self.name = f"{socket.gethostname()}-{os.getpid()}"
        self.queue = JobQueue(job_settings)
        self.archive = Archive(settings.archive_dir, settings.archive_retention_days)
        self.stages: Stages | None = None
        self.program: GrpcProgram | None = None
        self.stopping = asyncio.Event()
        self.stop_deadline = float("inf")
        self._loop_task: asyncio.Task[None] | None = None
        self.announced: list[Path] = []

    # ---- lifecycle ------------------------------------------------------------
    def begin(self, program: GrpcProgram) -> None:
        """Inside the running loop: channels to the stages, then the job loop."""
        self.program = program
        self.stages = Stages(self.settings)
        self.stages.start_watching(lambda stage: None)
        self._loop_task = asyncio.create_task(self.run(), name="job-loop")

    async def stop(self) -> None:
        """Lets the job in progress finish within the grace period, else gives it back."""
        self.stop_deadline = time.monotonic() + self.settings.grace_period_s
        self.stopping.set()
        if self._loop_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._loop_task, self.settings.grace_period_s + 5)
        if self.stages is not None:
            await self.stages.close()
        await self.queue.close()

    async def _set_redis_down(self, down: bool) -> None:
        if self.program is not None:
            await self.program.set_condition("redis", down)

    # ---- the loop -------------------------------------------------------------
    async def _announce(self) -> None:
        """Free ports for health and /metrics, written where the watchdog and
        Prometheus look (see the module's doc). Outside supervisord: nothing to announce."""
        assert self.program is not None
        # The port is bound by GrpcProgram.start right after the servicers are added;
        # it has no event to wait on, and this runs once.
        while not self.program.port:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "::") else self.settings.host
        metrics_port = self.settings.metrics_port
        if metrics_port == 0:  # a fixed port was started by the runtime already
            server, _thread = start_http_server(0, addr=self.settings.host)
            metrics_port = int(server.server_port)
        process = os.environ.get("SUPERVISOR_PROCESS_NAME")
        if not process:
            return
        group = os.environ.get("SUPERVISOR_GROUP_NAME", process)
        folder = self.settings.var_dir / "run" / "workers"
        folder.mkdir(parents=True, exist_ok=True)
        self.announced = [folder / f"{process}.json", folder / f"{process}.targets.json"]
        entry = {
            "supervisor_name": f"{group}:{process}",
            "program": process,
            "pid": os.getpid(),
            "address": f"{host}:{self.program.port}",
            "metrics_address": f"{host}:{metrics_port}" if metrics_port >= 0 else "",
        }
        targets = (
            [{"targets": [entry["metrics_address"]], "labels": {"program": process}}]
            if metrics_port >= 0
            else []
        )
        for path, content in zip(self.announced, (entry, targets), strict=True):
            partial = path.with_name(f".{path.name}.partial")
            partial.write_text(json.dumps(content))
            os.replace(partial, path)
        log.info("announced", extra={"announced": entry})

    async def _export_queue_stats(self) -> None:
        while not self.stopping.is_set():
            try:
                stats = await self.queue.stats()
            except REDIS_ERRORS:
                pass  # the job loop reports it; the gauges keep their last values
            except Exception:  # metrics must never end the worker
                log.exception("reading the queue's statistics failed")
            else:
                FAILED_LIST.set(stats.failed)
                for priority, waiting in stats.waiting.items():
                    QUEUE_WAITING.labels(priority).set(waiting)
                    QUEUE_RUNNING.labels(priority).set(stats.running[priority])
                    OLDEST_WAITING.labels(priority).set(stats.oldest_waiting_s[priority])
            await self._pause(self.settings.stats_interval_s)

    async def run(self) -> None:
        await self._announce()
        stats_task = asyncio.create_task(self._export_queue_stats(), name="queue-stats")
        try:
            await self._run()
        finally:
            stats_task.cancel()
            for path in self.announced:
                path.unlink(missing_ok=True)

    async def _run(self) -> None:
        log.info(
            "worker started",
            extra={"worker": self.name, "redis": self.queue.address, "priorities": "high,normal"},
        )
        connected_since: float | None = None
        last_sweep = 0.0
        backoff_s = 0.5
        while not self.stopping.is_set():
            try:
                if connected_since is None:
                    await self.queue.ensure_groups()
                    connected_since = time.monotonic()
                    backoff_s = 0.5
                    await self._set_redis_down(False)
                    log.info("queue reachable", extra={"redis": self.queue.address})
                if not await self._stages_ready():
                    continue
                delivery: Delivery | None = None
                # Right after (re)connecting, every worker's jobs look idle (Redis
                # was away): wait one claim period so live workers renew theirs first.
                if time.monotonic() - connected_since >= self.job_settings.claim_idle_s:
                    delivery = await self.queue.claim_stale(self.name)
                    if delivery is not None:
                        log.warning(
                            "took over a job from a worker that stopped renewing it",
                            extra={"job_id": delivery.job_id, "entry": delivery.entry_id},
                        )
                if delivery is None:
                    delivery = await self.queue.next_delivery(
                        self.name, int(self.settings.poll_s * 1000)
                    )
                if delivery is not None:
                    await self.run_job(delivery)
                if time.monotonic() - last_sweep > 600:
                    last_sweep = time.monotonic()
                    await self.queue.forget_idle_consumers()
            except REDIS_ERRORS as error:
                if connected_since is not None:
                    log.warning("queue unreachable", extra={"error": str(error)})
                connected_since = None
                await self._set_redis_down(True)
                await self._pause(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
            except Exception:
                log.exception("worker loop error; going on")
                await self._pause(1.0)
        log.info("worker stopped", extra={"worker": self.name})

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def _stages_ready(self) -> bool:
        """Takes no job while Synthesize or Animate is down: a restart in progress
        would only burn the job's attempts."""
        assert self.stages is not None
        needed = (self.stages.synthesize, self.stages.animate)
        waited = False
        while not all(stage.serving for stage in needed):
            if not waited:
                log.info(
                    "waiting for stages", extra={"down": [s.name for s in needed if not s.serving]}
                )
                waited = True
            await self._pause(0.25)
            if self.stopping.is_set():
                return False
        return True

    # ---- one job --------------------------------------------------------------
    async def run_job(self, delivery: Delivery) -> None:
        outcome, lease = await self.queue.start(delivery, self.name)
        if lease is None:
            if outcome == "failed":
                log.warning(
                    "job failed: its last attempt's worker stopped",
                    extra={"job_id": delivery.job_id},
                )
            elif outcome != "not_owner":
                log.info("job skipped", extra={"job_id": delivery.job_id, "reason": outcome})
            return
        job = lease.job
        token = current_trace_id.set(job.trace_id)
        try:
            log.info(
                "job started",
                extra={
                    "job_id": job.job_id,
                    "attempt": job.attempts,
                    "priority": job.priority,
                    "worker": self.name,
                },
            )
            attempt = asyncio.create_task(self.render(lease))
            BUSY.set(1)
            attempt.add_done_callback(lambda _attempt: BUSY.set(0))
            verdict = await self._renew_while(attempt, lease)
            if verdict != "ok":
                ATTEMPTS.labels(verdict).inc()
                return
            try:
                rendered = attempt.result()
            except TalkerError as error:
                await self._record_failure(lease, error)
                return
            except Exception as error:
                log.exception("job attempt crashed", extra={"job_id": job.job_id})
                await self._record_failure(lease, error)
                return
            await self._archive_and_finish(lease, rendered)
        finally:
            current_trace_id.reset(token)

    async def _renew_while(self, attempt: asyncio.Task[Rendered], lease: Lease) -> str:
        """Renews the lease every heartbeat until the attempt ends. "ok": it ended
        (well or not); otherwise it was stopped: "cancelled", "lost" or "released"."""
        while True:
            done, _ = await asyncio.wait({attempt}, timeout=self.job_settings.heartbeat_s)
            if done:
                return "ok"
            if self.stopping.is_set() and time.monotonic() > self.stop_deadline:
                await self._stop_attempt(attempt)
                outcome = await self._until_recorded(lambda: self.queue.release(lease))
                log.warning(
                    "job given back: the worker is stopping",
                    extra={"job_id": lease.delivery.job_id, "outcome": outcome},
                )
                return "released"
            try:
                status = await self.queue.heartbeat(lease, self.name)
            except REDIS_ERRORS as error:
                # Keep working: if Redis is back before claim_idle_s, nothing was lost;
                # if not, another worker may take the job and our lease check says so.
                log.warning("could not renew the job", extra={"error": str(error)})
                continue
            if status != "ok":
                await self._stop_attempt(attempt)
                log.warning(
                    "job cancelled while running"
                    if status == "cancelled"
                    else "job taken over by another worker; dropping this attempt",
                    extra={"job_id": lease.delivery.job_id},
                )
                return status

    async def _stop_attempt(self, attempt: asyncio.Task[Rendered]) -> None:
        attempt.cancel()
        await asyncio.gather(attempt, return_exceptions=True)

    async def render(self, lease: Lease) -> Rendered:
        """Speaks the script (unless the job brought its own clip) and renders the mp4."""
        assert self.stages is not None
        job = lease.job
        started = time.monotonic()
        timings = {"synthesize_ms": 0, "render_ms": 0}
        if job.is_audio:
            audio = await self.queue.audio(job.job_id)
            audio_format = audio_pb2.AudioFormat(
                encoding=job.audio_encoding,
                sample_rate_hz=job.audio_rate_hz,
                channels=job.audio_channels,
            )
            if not audio:
                raise StageFailure(
                    "gateway",
                    grpc.StatusCode.DATA_LOSS,
                    f"The clip of job {job.job_id} is missing from the queue.",
                )
        else:
            pcm = bytearray()
            rate = 0
            # A whole script, not one sentence: the render deadline, not the per-sentence one.
            async for response in self.stages.synthesize.synthesize(
                synthesize_pb2.SynthesizeRequest(text=job.script, voice_id=job.voice_id),
                timeout_s=self.settings.render_timeout_s,
            ):
                if response.WhichOneof("response") == "chunk":
                    pcm.extend(response.chunk.audio)
                    rate = response.chunk.format.sample_rate_hz
            audio = bytes(pcm)
            audio_format = pcm_s16le(rate)
            timings["synthesize_ms"] = int((time.monotonic() - started) * 1000)
        rendering = time.monotonic()
        mp4, result = await self.stages.animate.render(
            # Queued work yields the CPU to live conversations on the same host.
            animate_pb2.RenderRequest(
                avatar_id=job.avatar_id,
                audio=audio,
                format=audio_format,
                fps=job.fps,
                background=True,
            ),
        )
        if result is None:
            raise StageFailure(
                "animate", grpc.StatusCode.INTERNAL, "The render ended without its result."
            )
        timings["render_ms"] = int((time.monotonic() - rendering) * 1000)
        timings["total_ms"] = int((time.monotonic() - started) * 1000)
        return Rendered(mp4, result, timings)

    async def _record_failure(self, lease: Lease, error: Exception) -> None:
        if isinstance(error, TalkerError):
            failure = StageFailure.of(error)
            stage, code, message = failure.stage, failure.code, str(failure)
        else:
            stage, code = "worker", grpc.StatusCode.INTERNAL
            message = f"The render worker failed: {type(error).__name__}: {error}"
        outcome = await self._until_recorded(
            lambda: self.queue.fail(lease, stage, code.value[0], message)
        )
        ATTEMPTS.labels(outcome).inc()
        log.warning(
            "job attempt failed",
            extra={
                "job_id": lease.delivery.job_id,
                "attempt": lease.job.attempts,
                "stage": stage,
                "code": code.name,
                "error": message,
                "outcome": outcome,  # retry, failed (on the failed list), cancelled, lost
            },
        )

    async def _archive_and_finish(self, lease: Lease, rendered: Rendered) -> None:
        job = lease.job
        candidate = await asyncio.to_thread(self.archive.entry, job.user_id, job.scene)
        wanted = f"{candidate.folder.name}/{candidate.stem}"
        stem = await self._until_recorded(lambda: self.queue.reserve_stem(lease, wanted))
        if stem is None:
            ATTEMPTS.labels("lost").inc()
            self.archive.release(candidate)
            log.warning("job taken over before archiving; dropped", extra={"job_id": job.job_id})
            return
        entry = candidate
        if stem != wanted:
            # An earlier attempt chose the name (and died after writing, perhaps):
            # write the same files again, so the job has one archive entry.
            self.archive.release(candidate)
            folder, _, name = stem.partition("/")
            entry = ArchiveEntry(self.archive.root / folder, name)
            entry.folder.mkdir(parents=True, exist_ok=True)
        record = self._record(lease, rendered, entry)
        path = await asyncio.to_thread(
            self.archive.write_entry, entry, record, ("mp4", rendered.mp4)
        )
        outcome = await self._until_recorded(
            lambda: self.queue.finish(lease, str(path), rendered.result.SerializeToString())
        )
        if outcome == "cancelled":
            await asyncio.to_thread(self.archive.abandon, entry)
        ATTEMPTS.labels(outcome).inc()
        if outcome == "done":
            for step in ("synthesize", "render", "total"):
                if rendered.timings[f"{step}_ms"]:  # audio jobs speak nothing
                    JOB_SECONDS.labels(step).observe(rendered.timings[f"{step}_ms"] / 1000)
        log.info(
            "job done" if outcome == "done" else f"job not recorded: {outcome}",
            extra={
                "job_id": job.job_id,
                "attempt": job.attempts,
                "archive_path": str(path),
                "timings_ms": rendered.timings,
                "duration_ms": rendered.result.duration_ms,
                "outcome": outcome,
            },
        )

    def _record(self, lease: Lease, rendered: Rendered, entry: ArchiveEntry) -> dict[str, Any]:
        job = lease.job
        assert self.stages is not None
        return {
            "trace_id": job.trace_id,
            "status": "finished",
            "kind": "render_job",
            "job_id": job.job_id,
            "created": datetime.now(UTC).isoformat(),
            "submitted": datetime.fromtimestamp(job.created_ms / 1000, UTC).isoformat(),
            "user_id": job.user_id,
            "scene": job.scene,
            "priority": job.priority,
            "attempt": job.attempts,
            "worker": self.name,
            "script": job.script,
            "audio_input_ms": job.audio_ms,
            "voice_id": job.voice_id,
            "avatar_id": job.avatar_id,
            "render": MessageToDict(rendered.result, preserving_proto_field_name=True),
            "timings_ms": rendered.timings,
            "stages": {
                name: {"address": stage.address, "model": stage.model_id}
                for name, stage in self.stages.by_name.items()
                if name in ("synthesize", "animate")
            },
        }

    async def _until_recorded(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Retries a queue write while Redis is away: the work is done and must be
        recorded. Past the stop deadline it gives up (the entry stays pending and
        another worker takes the job over; its archive name is already reserved)."""
        backoff_s = 0.2
        while True:
            try:
                return await operation()
            except REDIS_ERRORS as error:
                if self.stopping.is_set() and time.monotonic() > self.stop_deadline:
                    raise
                log.warning("queue unreachable; retrying the write", extra={"error": str(error)})
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)


def build_program(settings: WorkerSettings) -> GrpcProgram:
    worker = Worker(settings, JobSettings())
    holder: dict[str, GrpcProgram] = {}

    def add_servicers(server: aio.Server) -> None:
        worker.begin(holder["program"])

    program = GrpcProgram(
        settings,
        [],
        add_servicers,
        load=lambda: None,  # no model: SERVING once the server is up
        engine=worker,
        on_stop=worker.stop,
    )
    holder["program"] = program
    return program


def main() -> None:
    run_program(WorkerSettings, build_program)


if __name__ == "__main__":
    main()
