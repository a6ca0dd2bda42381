"""The job queue's rules against a real redis-server (started the way
supervisord starts it, `python -m jobs.redis_server`, on a free port): HIGH
before NORMAL, a dead worker's job taken over and the stale worker fenced off
(a job is finished once), N failed attempts to the failed list, cancels, and
jobs surviving a kill -9 of Redis."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pipeline.config import JobSettings
from pipeline.jobs_queue import CANCELLED, DONE, FAILED, QUEUED, RUNNING, JobQueue, JobSpec
from services.common.errors import NotFound, PreconditionFailed
from tests.processes import REPO, VENV_BIN, free_port

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed (make system-deps)"
)


class RedisProcess:
    def __init__(self, var_dir: Path) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            "TALKER_VAR_DIR": str(var_dir),
            "TALKER_REDIS_PORT": str(self.port),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(VENV_BIN / "python"), "-m", "jobs.redis_server"],
            env=self.env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    return
            except redis.exceptions.RedisError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def kill_9(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    server.stop()


def make_queue(server: RedisProcess, **overrides: object) -> JobQueue:
    settings = JobSettings(
        redis_url=f"redis://127.0.0.1:{server.port}/0", claim_idle_s=0.2, **overrides
    )
    return JobQueue(settings)


def spec(priority: str = "normal", script: str = "Hello there.") -> JobSpec:
    return JobSpec(
        priority=priority,
        user_id="u1",
        scene="s1",
        avatar_id="a1",
        voice_id="",
        fps=0,
        trace_id="trace-1",
        script=script,
    )


def test_high_priority_jobs_are_taken_before_normal_ones(redis_server: RedisProcess) -> None:
    async def run() -> None:
        queue = make_queue(redis_server)
        await queue.ensure_groups()
        normal = await queue.submit(spec("normal"))
        high = await queue.submit(spec("high"))
        first = await queue.next_delivery("w1", 100)
        second = await queue.next_delivery("w1", 100)
        assert first is not None and first.job_id == high.job_id
        assert second is not None and second.job_id == normal.job_id
        assert await queue.next_delivery("w1", 100) is None
        await queue.close()

    asyncio.run(run())


def test_a_dead_workers_job_is_taken_over_and_finished_once(redis_server: RedisProcess) -> None:
    async def run() -> None:
        queue = make_queue(redis_server)
        await queue.ensure_groups()
        job = await queue.submit(spec())
        delivery = await queue.next_delivery("dead", 100)
        assert delivery is not None
        outcome, stale = await queue.start(delivery, "dead")
        assert outcome == "run" and stale is not None
        assert (await queue.get(job.job_id)).state == RUNNING
        # Not idle long enough yet: nobody takes it.
        assert await queue.claim_stale("alive") is None
        await asyncio.sleep(0.3)
        taken = await queue.claim_stale("alive")
        assert taken is not None and taken.job_id == job.job_id
        # The stale worker cannot start what it no longer owns.
        assert (await queue.start(taken, "dead"))[0] == "not_owner"
        outcome, lease = await queue.start(taken, "alive")
        assert outcome == "run" and lease is not None
        record = await queue.get(job.job_id)
        assert record.attempts == 2 and record.worker == "alive"
        assert "stopped renewing" in record.error_message
        # The stale worker wakes up: every write it tries is refused.
        assert await queue.heartbeat(stale, "dead") == "lost"
        assert await queue.reserve_stem(stale, "day/stale") is None
        assert await queue.finish(stale, "/stale.mp4", b"") == "lost"
        assert await queue.fail(stale, "animate", 13, "boom") == "lost"
        # The live one renews, names the archive entry, finishes once.
        assert await queue.heartbeat(lease, "alive") == "ok"
        assert await queue.reserve_stem(lease, "day/first") == "day/first"
        assert await queue.reserve_stem(lease, "day/other") == "day/first"
        assert await queue.finish(lease, "/a.mp4", b"") == DONE
        assert await queue.finish(lease, "/a.mp4", b"") == "lost"
        record = await queue.get(job.job_id)
        assert record.state == DONE and record.archive_path == "/a.mp4"
        assert record.error_message == ""
        # Acknowledged and deleted: nothing left to run or take over.
        await asyncio.sleep(0.3)
        assert await queue.claim_stale("third") is None
        assert await queue.next_delivery("third", 100) is None
        await queue.close()

    asyncio.run(run())


def test_a_job_failing_every_attempt_lands_on_the_failed_list(redis_server: RedisProcess) -> None:
    async def run() -> None:
        queue = make_queue(redis_server, max_attempts=3)
        await queue.ensure_groups()
        job = await queue.submit(spec())
        outcomes = []
        for attempt in range(3):
            delivery = await queue.next_delivery("w1", 100)
            assert delivery is not None, f"attempt {attempt + 1} was not queued again"
            outcome, lease = await queue.start(delivery, "w1")
            assert lease is not None, outcome
            outcomes.append(
                await queue.fail(lease, "animate", 5, f"No avatar 'a1' (try {attempt + 1}).")
            )
            if attempt < 2:
                assert (await queue.get(job.job_id)).state == QUEUED
        assert outcomes == ["retry", "retry", FAILED]
        record = await queue.get(job.job_id)
        assert record.state == FAILED and record.attempts == 3
        assert record.error_stage == "animate" and record.error_code == 5
        assert "try 3" in record.error_message and record.trace_id == "trace-1"
        failed, more = await queue.page(FAILED, "", 10, 0)
        assert [r.job_id for r in failed] == [job.job_id] and more is None
        assert await queue.next_delivery("w1", 100) is None
        with pytest.raises(PreconditionFailed, match="already ended"):
            await queue.cancel(job.job_id)
        await queue.close()

    asyncio.run(run())


def test_a_worker_dying_on_the_last_attempt_fails_the_job(redis_server: RedisProcess) -> None:
    async def run() -> None:
        queue = make_queue(redis_server, max_attempts=1)
        await queue.ensure_groups()
        job = await queue.submit(spec())
        delivery = await queue.next_delivery("dead", 100)
        assert delivery is not None
        assert (await queue.start(delivery, "dead"))[0] == "run"
        await asyncio.sleep(0.3)
        taken = await queue.claim_stale("alive")
        assert taken is not None
        assert (await queue.start(taken, "alive"))[0] == FAILED
        record = await queue.get(job.job_id)
        assert record.state == FAILED and "stopped renewing" in record.error_message
        assert [r.job_id for r in (await queue.page(FAILED, "", 10, 0))[0]] == [job.job_id]
        await queue.close()

    asyncio.run(run())


def test_cancels_and_unknown_ids(redis_server: RedisProcess) -> None:
    async def run() -> None:
        queue = make_queue(redis_server)
        await queue.ensure_groups()
        with pytest.raises(NotFound, match="No job 'nope'"):
            await queue.get("nope")
        with pytest.raises(NotFound):
            await queue.cancel("nope")
        queued = await queue.submit(spec())
        running = await queue.submit(spec())
        assert (await queue.cancel(queued.job_id)).state == CANCELLED
        with pytest.raises(PreconditionFailed, match="already ended \\(cancelled\\)"):
            await queue.cancel(queued.job_id)
        # The cancelled job's entry is skipped by the worker that reads it.
        delivery = await queue.next_delivery("w1", 100)
        assert delivery is not None and delivery.job_id == queued.job_id
        assert (await queue.start(delivery, "w1"))[0] == "skip:cancelled"
        delivery = await queue.next_delivery("w1", 100)
        assert delivery is not None and delivery.job_id == running.job_id
        _, lease = await queue.start(delivery, "w1")
        assert lease is not None
        assert (await queue.cancel(running.job_id)).state == CANCELLED
        # Its worker learns it at the next heartbeat; the outcome cannot be recorded.
        assert await queue.heartbeat(lease, "w1") == CANCELLED
        assert await queue.finish(lease, "/x.mp4", b"") == CANCELLED
        assert (await queue.get(running.job_id)).state == CANCELLED
        # Release by a stopping worker: queued again, the attempt not counted.
        job = await queue.submit(spec())
        delivery = await queue.next_delivery("w1", 100)
        assert delivery is not None
        _, lease = await queue.start(delivery, "w1")
        assert lease is not None
        assert await queue.release(lease) == "released"
        record = await queue.get(job.job_id)
        assert record.state == QUEUED and record.attempts == 0
        # Paging: newest first, filters, tokens.
        page, token = await queue.page("", "", 2, 0)
        assert [r.job_id for r in page] == [job.job_id, running.job_id] and token == 2
        page, token = await queue.page("", "", 2, 2)
        assert [r.job_id for r in page] == [queued.job_id] and token is None
        page, _ = await queue.page(CANCELLED, "u1", 10, 0)
        assert {r.job_id for r in page} == {queued.job_id, running.job_id}
        assert (await queue.page("", "someone-else", 10, 0))[0] == []
        await queue.close()

    asyncio.run(run())


def test_jobs_survive_a_kill_9_of_redis(redis_server: RedisProcess) -> None:
    async def submit() -> tuple[str, str]:
        queue = make_queue(redis_server)
        await queue.ensure_groups()
        first = await queue.submit(spec("high", "First."))
        second = await queue.submit(spec("normal", "Second."))
        await queue.close()
        return first.job_id, second.job_id

    first, second = asyncio.run(submit())
    redis_server.kill_9()  # appendfsync always: what was acknowledged is on disk
    redis_server.start()

    async def after() -> None:
        queue = make_queue(redis_server)
        await queue.ensure_groups()
        assert (await queue.get(first)).script == "First."
        delivery = await queue.next_delivery("w1", 100)
        assert delivery is not None and delivery.job_id == first
        delivery = await queue.next_delivery("w1", 100)
        assert delivery is not None and delivery.job_id == second
        await queue.close()

    asyncio.run(after())


def test_queue_statistics_follow_waiting_running_and_failed_jobs(
    redis_server: RedisProcess,
) -> None:
    """What the workers export as metrics: depth and oldest age per priority,
    running entries, the failed list's length."""

    async def run() -> None:
        queue = make_queue(redis_server, max_attempts=1)
        await queue.ensure_groups()
        empty = await queue.stats()
        assert empty.waiting == {"high": 0, "normal": 0} and empty.failed == 0
        assert empty.oldest_waiting_s == {"high": 0.0, "normal": 0.0}
        await queue.submit(spec("normal"))
        await queue.submit(spec("normal"))
        await queue.submit(spec("high"))
        await asyncio.sleep(0.3)
        stats = await queue.stats()
        assert stats.waiting == {"high": 1, "normal": 2}
        assert stats.running == {"high": 0, "normal": 0}
        assert stats.oldest_waiting_s["normal"] >= 0.25
        delivery = await queue.next_delivery("w1", 100)  # the high one
        assert delivery is not None
        stats = await queue.stats()
        assert stats.waiting == {"high": 0, "normal": 2} and stats.running["high"] == 1
        assert stats.oldest_waiting_s["high"] == 0.0
        _outcome, lease = await queue.start(delivery, "w1")
        assert lease is not None
        assert await queue.fail(lease, "animate", 5, "No avatar.") == FAILED
        stats = await queue.stats()
        assert stats.running["high"] == 0 and stats.failed == 1
        await queue.close()

    asyncio.run(run())
