"""The render job queue on Redis.

Layout (every key under `JobSettings.key_prefix`, "talker:jobs" by default):

- `{p}:job:{id}`    a hash: the job as submitted and what became of it;
- `{p}:audio:{id}`  the submitted clip of an audio job (kept apart: GetJob never reads it);
- `{p}:stream:high`, `{p}:stream:normal`  one Redis Stream per priority, each
  with the consumer group "workers"; an entry carries only the job id;
- `{p}:index`       a sorted set of job ids by submit time (ListJobs);
- `{p}:failed`      a list of the jobs that used up their attempts, newest first.

Who runs a job is whoever owns its stream entry in the group's pending list:
a worker reads an entry (XREADGROUP), or takes one over from a worker that
stopped renewing it (XAUTOCLAIM past `claim_idle_s`), then *starts* it. Every
state change is one Lua script, so it is atomic with the checks it depends on:

- start: only the entry's owner may start it; it counts the attempt, gives
  the job a fresh lease token and fails it for good once its attempts are used up;
- heartbeat: the lease holder renews its entry (so it is not taken over) and
  learns of a cancel;
- reserve_stem / finish / fail / release: only the holder of the current lease
  may record an outcome, and only while the job is running. A worker whose job
  was taken over (it hung past `claim_idle_s`) finds its lease gone and drops
  its work: a job is finished once, whatever the timing.

The entry is acknowledged (and deleted) in the same script that records the
outcome, after the archive files are written: a worker that dies between
writing and recording leaves the entry pending, and the next worker writes
the same archive name again (the name is reserved in the job hash on the
first try), so a job never has two archive entries.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from pipeline.config import JobSettings
from services.common.errors import NotFound, PreconditionFailed

GROUP = "workers"
#: Taken in this order: every HIGH job before any NORMAL one.
PRIORITIES = ("high", "normal")
QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINAL_STATES = (DONE, FAILED, CANCELLED)

# Shared Lua: acknowledge and delete the job's entry, and let a finished job expire.
_DROP = """
local function drop(stream, entry)
  redis.call('XACK', stream, ARGV[2], entry)
  redis.call('XDEL', stream, entry)
end
local function expire(job, audio, retention)
  redis.call('EXPIRE', job, retention)
  redis.call('EXPIRE', audio, retention)
end
"""

# KEYS: job, stream, failed, audio. ARGV: entry, group, worker, lease, now_ms, retention_s, job_id
_START = (
    _DROP
    + """
local pending = redis.call('XPENDING', KEYS[2], ARGV[2], ARGV[1], ARGV[1], 1)
if #pending == 0 or pending[1][2] ~= ARGV[3] then
  return {'not_owner'}
end
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  drop(KEYS[2], ARGV[1])
  return {'gone'}
end
if state ~= 'queued' and state ~= 'running' then
  drop(KEYS[2], ARGV[1])
  return {'skip', state}
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
local max = tonumber(redis.call('HGET', KEYS[1], 'max_attempts') or '1')
if state == 'running' then
  local was = redis.call('HGET', KEYS[1], 'worker') or '?'
  redis.call('HSET', KEYS[1], 'error_stage', 'worker', 'error_code', '14',
    'error_message', 'Attempt ' .. attempts .. ' was cut short: its worker ' .. was ..
    ' stopped renewing the job (it died or hung).')
end
if attempts >= max then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'ended_ms', ARGV[5])
  redis.call('HDEL', KEYS[1], 'lease')
  redis.call('LPUSH', KEYS[3], ARGV[7])
  drop(KEYS[2], ARGV[1])
  expire(KEYS[1], KEYS[4], ARGV[6])
  return {'failed'}
end
redis.call('HSET', KEYS[1], 'state', 'running', 'attempts', attempts + 1, 'worker', ARGV[3],
  'lease', ARGV[4], 'started_ms', ARGV[5], 'entry', ARGV[1])
return {'run'}
"""
)

# KEYS: job, stream. ARGV: lease, group, worker, entry
_HEARTBEAT = (
    _DROP
    + """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then
  return 'lost'
end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'cancelled' then
  drop(KEYS[2], ARGV[4])
  return 'cancelled'
end
if state ~= 'running' then
  return 'lost'
end
-- Resets the entry's idle time, so no other worker takes it over.
redis.call('XCLAIM', KEYS[2], ARGV[2], ARGV[3], 0, ARGV[4], 'JUSTID')
return 'ok'
"""
)

# KEYS: job. ARGV: lease, candidate stem
_RESERVE_STEM = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1]
   or redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  return false
end
local stem = redis.call('HGET', KEYS[1], 'archive_stem')
if stem then
  return stem
end
redis.call('HSET', KEYS[1], 'archive_stem', ARGV[2])
return ARGV[2]
"""

# KEYS: job, stream, audio. ARGV: lease, group, entry, now_ms, archive_path, result, retention_s
_FINISH = (
    _DROP
    + """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then
  return 'lost'
end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'cancelled' then
  drop(KEYS[2], ARGV[3])
  return 'cancelled'
end
if state ~= 'running' then
  return 'lost'
end
redis.call('HSET', KEYS[1], 'state', 'done', 'ended_ms', ARGV[4], 'archive_path', ARGV[5],
  'result', ARGV[6])
redis.call('HDEL', KEYS[1], 'error_stage', 'error_code', 'error_message')
drop(KEYS[2], ARGV[3])
expire(KEYS[1], KEYS[3], ARGV[7])
return 'done'
"""
)

# KEYS: job, stream, failed, audio.
# ARGV: lease, group, entry, now_ms, stage, code, message, retention_s, job_id, counts ('1' or '0')
_FAIL = (
    _DROP
    + """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then
  return 'lost'
end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'cancelled' then
  drop(KEYS[2], ARGV[3])
  return 'cancelled'
end
if state ~= 'running' then
  return 'lost'
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
local max = tonumber(redis.call('HGET', KEYS[1], 'max_attempts') or '1')
redis.call('HDEL', KEYS[1], 'lease')
drop(KEYS[2], ARGV[3])
if ARGV[10] == '0' then
  -- Released by a worker that is stopping: the attempt does not count.
  redis.call('HSET', KEYS[1], 'state', 'queued', 'attempts', attempts - 1)
  redis.call('XADD', KEYS[2], '*', 'job', ARGV[9])
  return 'released'
end
redis.call('HSET', KEYS[1], 'error_stage', ARGV[5], 'error_code', ARGV[6], 'error_message', ARGV[7])
if attempts >= max then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'ended_ms', ARGV[4])
  redis.call('LPUSH', KEYS[3], ARGV[9])
  expire(KEYS[1], KEYS[4], ARGV[8])
  return 'failed'
end
redis.call('HSET', KEYS[1], 'state', 'queued')
redis.call('XADD', KEYS[2], '*', 'job', ARGV[9])
return 'retry'
"""
)

# KEYS: job, audio. ARGV: now_ms, retention_s
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return 'missing'
end
if state ~= 'queued' and state ~= 'running' then
  return 'ended:' .. state
end
-- The entry stays: its worker (or the next to read it) sees the state and drops it.
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'ended_ms', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 'cancelled'
"""


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class JobSpec:
    """A job as submitted (already checked)."""

    priority: str
    user_id: str
    scene: str
    avatar_id: str
    voice_id: str
    fps: int
    trace_id: str
    script: str = ""
    audio: bytes = b""
    audio_encoding: int = 0
    audio_rate_hz: int = 0
    audio_channels: int = 0
    audio_ms: int = 0


@dataclass
class JobRecord:
    """A job as Redis holds it."""

    job_id: str
    state: str
    priority: str
    user_id: str
    scene: str
    avatar_id: str
    voice_id: str
    script: str
    audio_ms: int
    audio_encoding: int
    audio_rate_hz: int
    audio_channels: int
    fps: int
    trace_id: str
    created_ms: int
    started_ms: int
    ended_ms: int
    attempts: int
    max_attempts: int
    worker: str
    archive_path: str
    archive_stem: str
    result: bytes
    error_stage: str
    error_code: int
    error_message: str

    @property
    def is_audio(self) -> bool:
        return self.audio_ms > 0

    @classmethod
    def from_hash(cls, values: dict[bytes, bytes]) -> JobRecord:
        def text(name: str) -> str:
            return values.get(name.encode(), b"").decode()

        def number(name: str) -> int:
            return int(values.get(name.encode(), b"0") or b"0")

        return cls(
            job_id=text("job_id"),
            state=text("state"),
            priority=text("priority"),
            user_id=text("user_id"),
            scene=text("scene"),
            avatar_id=text("avatar_id"),
            voice_id=text("voice_id"),
            script=text("script"),
            audio_ms=number("audio_ms"),
            audio_encoding=number("audio_encoding"),
            audio_rate_hz=number("audio_rate_hz"),
            audio_channels=number("audio_channels"),
            fps=number("fps"),
            trace_id=text("trace_id"),
            created_ms=number("created_ms"),
            started_ms=number("started_ms"),
            ended_ms=number("ended_ms"),
            attempts=number("attempts"),
            max_attempts=number("max_attempts"),
            worker=text("worker"),
            archive_path=text("archive_path"),
            archive_stem=text("archive_stem"),
            result=values.get(b"result", b""),
            error_stage=text("error_stage"),
            error_code=number("error_code"),
            error_message=text("error_message"),
        )


@dataclass(frozen=True)
class Delivery:
    """A stream entry handed to this worker."""

    stream: str
    entry_id: str
    job_id: str


@dataclass
class Lease:
    """The right to run one attempt of a job: valid while the job hash holds `token`."""

    delivery: Delivery
    token: str
    job: JobRecord = field(repr=False)


@dataclass
class QueueStats:
    failed: int
    waiting: dict[str, int] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)
    oldest_waiting_s: dict[str, float] = field(default_factory=dict)


class JobQueue:
    """The queue as the gateway (submit, get, list, cancel) and workers (take,
    renew, finish) use it. Redis errors (ConnectionError, TimeoutError) pass
    through: the caller decides whether to retry or answer UNAVAILABLE."""

    def __init__(self, settings: JobSettings, client: aioredis.Redis | None = None) -> None:
        self.settings = settings
        # Any: redis-py types every reply as a bytes | str | ... union; this client
        # always answers bytes (decode_responses off), which the code relies on.
        self.redis: Any = client or aioredis.Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=2,
            # Longer than any blocking read (poll_s <= 30).
            socket_timeout=40,
            health_check_interval=10,
        )
        prefix = settings.key_prefix
        self.prefix = prefix
        self.index_key = f"{prefix}:index"
        self.failed_key = f"{prefix}:failed"
        self.streams = {priority: f"{prefix}:stream:{priority}" for priority in PRIORITIES}
        self.retention_s = int(settings.retention_days * 86400)
        # register_script: EVALSHA, and EVAL again when a restarted Redis forgot the script.
        self._start = self.redis.register_script(_START)
        self._heartbeat = self.redis.register_script(_HEARTBEAT)
        self._reserve_stem = self.redis.register_script(_RESERVE_STEM)
        self._finish = self.redis.register_script(_FINISH)
        self._fail = self.redis.register_script(_FAIL)
        self._cancel = self.redis.register_script(_CANCEL)

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def audio_key(self, job_id: str) -> str:
        return f"{self.prefix}:audio:{job_id}"

    @property
    def address(self) -> str:
        """Where the queue lives, for error messages (no password)."""
        kwargs = self.redis.connection_pool.connection_kwargs
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"

    async def close(self) -> None:
        await self.redis.aclose()

    # ---- the gateway's side ---------------------------------------------------
    async def submit(self, spec: JobSpec) -> JobRecord:
        job_id = uuid.uuid4().hex
        created = now_ms()
        fields: dict[str, Any] = {
            "job_id": job_id,
            "state": QUEUED,
            "priority": spec.priority,
            "user_id": spec.user_id,
            "scene": spec.scene,
            "avatar_id": spec.avatar_id,
            "voice_id": spec.voice_id,
            "script": spec.script,
            "audio_ms": spec.audio_ms,
            "audio_encoding": spec.audio_encoding,
            "audio_rate_hz": spec.audio_rate_hz,
            "audio_channels": spec.audio_channels,
            "fps": spec.fps,
            "trace_id": spec.trace_id,
            "created_ms": created,
            "attempts": 0,
            "max_attempts": self.settings.max_attempts,
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.job_key(job_id), mapping=fields)
            if spec.audio:
                pipe.set(self.audio_key(job_id), spec.audio)
            # Milliseconds with microseconds behind the point: two jobs submitted in
            # the same millisecond still list newest first (a double holds it exactly).
            pipe.zadd(self.index_key, {job_id: time.time_ns() / 1_000_000})
            # Index entries of jobs long expired; their hashes are gone already.
            pipe.zremrangebyscore(self.index_key, 0, created - 2 * self.retention_s * 1000)
            pipe.xadd(self.streams[spec.priority], {"job": job_id})
            await pipe.execute()
        # As submitted (a worker may have started it already: GetJob tells).
        return JobRecord.from_hash({k.encode(): str(v).encode() for k, v in fields.items()})

    async def get(self, job_id: str) -> JobRecord:
        values = await self.redis.hgetall(self.job_key(job_id))
        if not values:
            raise NotFound(
                f"No job {job_id!r}: it was never submitted here, or it ended more than "
                f"{self.settings.retention_days:g} days ago and was forgotten."
            )
        return JobRecord.from_hash(values)

    async def audio(self, job_id: str) -> bytes:
        return bytes(await self.redis.get(self.audio_key(job_id)) or b"")

    async def page(
        self, state: str, user_id: str, page_size: int, offset: int
    ) -> tuple[list[JobRecord], int | None]:
        """A page of jobs, newest first, and the offset of the next page (None: no more).
        FAILED reads the failed list; other states filter the index."""
        from_failed = state == FAILED
        source = self.failed_key if from_failed else self.index_key
        found: list[JobRecord] = []
        position = offset
        batch = max(page_size, 50)
        while len(found) < page_size:
            if from_failed:
                ids = await self.redis.lrange(source, position, position + batch - 1)
            else:
                ids = await self.redis.zrevrange(source, position, position + batch - 1)
            if not ids:
                return found, None
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hgetall(self.job_key(job_id.decode()))
                hashes = await pipe.execute()
            for job_id, values in zip(ids, hashes, strict=True):
                position += 1
                if not values:  # expired: forget it here too
                    if from_failed:
                        await self.redis.lrem(source, 0, job_id)
                        position -= 1
                    else:
                        await self.redis.zrem(source, job_id)
                        position -= 1
                    continue
                record = JobRecord.from_hash(values)
                if (state and record.state != state) or (user_id and record.user_id != user_id):
                    continue
                found.append(record)
                if len(found) == page_size:
                    break
        more = (
            await (self.redis.llen(source) if from_failed else self.redis.zcard(source)) > position
        )
        return found, position if more else None

    async def cancel(self, job_id: str) -> JobRecord:
        outcome = (
            await self._cancel(
                keys=[self.job_key(job_id), self.audio_key(job_id)],
                args=[now_ms(), self.retention_s],
            )
        ).decode()
        if outcome == "missing":
            await self.get(job_id)  # raises NotFound with the sentence
        if outcome != CANCELLED:
            state = outcome.removeprefix("ended:")
            raise PreconditionFailed(
                f"Job {job_id} has already ended ({state}); only a queued or running job "
                "can be cancelled."
            )
        return await self.get(job_id)

    # ---- the workers' side ----------------------------------------------------
    async def stats(self) -> QueueStats:
        """What the queue holds now, for the metrics: per priority the entries
        no worker has read yet, the entries being run, and the age of the
        oldest unread one; and the failed list's length."""
        stats = QueueStats(failed=int(await self.redis.llen(self.failed_key)))
        for priority, stream in self.streams.items():
            try:
                groups = await self.redis.xinfo_groups(stream)
            except ResponseError:  # no stream yet: nothing submitted
                groups = []
            # redis-py: str keys, bytes values.
            group = next((g for g in groups if g["name"] == GROUP.encode()), None)
            running = int(group["pending"]) if group else 0
            after = group["last-delivered-id"].decode() if group else "0-0"
            unread = await self.redis.xrange(stream, min=f"({after}", max="+", count=1)
            # XLEN counts read and unread entries; entries leave when a job ends.
            waiting = max(0, int(await self.redis.xlen(stream)) - running)
            oldest_s = 0.0
            if unread and waiting:
                entry_ms = int(unread[0][0].split(b"-")[0])
                oldest_s = max(0.0, (now_ms() - entry_ms) / 1000)
            stats.waiting[priority] = waiting
            stats.running[priority] = running
            stats.oldest_waiting_s[priority] = oldest_s
        return stats

    async def ensure_groups(self) -> None:
        for stream in self.streams.values():
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise

    async def next_delivery(self, worker: str, block_ms: int) -> Delivery | None:
        """The oldest new entry of the highest priority with one; waits up to
        `block_ms` for one when every stream is empty."""
        for priority in PRIORITIES:
            found = await self._read(worker, [priority], None)
            if found:
                return found
        return await self._read(worker, list(PRIORITIES), block_ms)

    async def _read(
        self, worker: str, priorities: list[str], block_ms: int | None
    ) -> Delivery | None:
        streams = {self.streams[p]: ">" for p in priorities}
        try:
            reply = await self.redis.xreadgroup(GROUP, worker, streams, count=1, block=block_ms)
        except ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            await self.ensure_groups()  # Redis lost its data, or a first start
            return None
        # Blocking on several streams returns the first that had an entry.
        for stream, entries in reply or []:
            for entry_id, fields in entries:
                return Delivery(stream.decode(), entry_id.decode(), fields[b"job"].decode())
        return None

    async def claim_stale(self, worker: str) -> Delivery | None:
        """An entry whose worker stopped renewing it for `claim_idle_s`, taken over."""
        idle_ms = int(self.settings.claim_idle_s * 1000)
        for priority in PRIORITIES:
            stream = self.streams[priority]
            reply = await self.redis.xautoclaim(stream, GROUP, worker, idle_ms, "0-0", count=1)
            for entry_id, fields in reply[1]:
                if fields and b"job" in fields:
                    return Delivery(stream, entry_id.decode(), fields[b"job"].decode())
                # A deleted entry still pending: nothing to run.
                await self.redis.xack(stream, GROUP, entry_id)
        return None

    async def start(self, delivery: Delivery, worker: str) -> tuple[str, Lease | None]:
        """Starts an attempt: ("run", lease), or why not ("not_owner", "gone",
        "skip:<state>", "failed": the dead worker's attempt was the last)."""
        token = uuid.uuid4().hex
        job_id = delivery.job_id
        reply = await self._start(
            keys=[self.job_key(job_id), delivery.stream, self.failed_key, self.audio_key(job_id)],
            args=[
                delivery.entry_id,
                GROUP,
                worker,
                token,
                now_ms(),
                self.retention_s,
                job_id,
            ],
        )
        outcome = ":".join(part.decode() for part in reply)
        if outcome != "run":
            return outcome, None
        return outcome, Lease(delivery, token, await self.get(job_id))

    async def heartbeat(self, lease: Lease, worker: str) -> str:
        """ "ok", "cancelled" (the entry is dropped) or "lost" (another worker has it)."""
        reply = await self._heartbeat(
            keys=[self.job_key(lease.delivery.job_id), lease.delivery.stream],
            args=[lease.token, GROUP, worker, lease.delivery.entry_id],
        )
        return str(reply.decode())

    async def reserve_stem(self, lease: Lease, candidate: str) -> str | None:
        """The job's archive name: the one its first finishing attempt chose,
        else `candidate`. None: the lease is no longer held."""
        reply = await self._reserve_stem(
            keys=[self.job_key(lease.delivery.job_id)], args=[lease.token, candidate]
        )
        return reply.decode() if reply else None

    async def finish(self, lease: Lease, archive_path: str, result: bytes) -> str:
        """ "done", "cancelled" or "lost"."""
        job_id = lease.delivery.job_id
        reply = await self._finish(
            keys=[self.job_key(job_id), lease.delivery.stream, self.audio_key(job_id)],
            args=[
                lease.token,
                GROUP,
                lease.delivery.entry_id,
                now_ms(),
                archive_path,
                result,
                self.retention_s,
            ],
        )
        return str(reply.decode())

    async def fail(self, lease: Lease, stage: str, code: int, message: str) -> str:
        """Records a failed attempt: "retry" (queued again), "failed" (attempts used
        up: on the failed list), "cancelled" or "lost"."""
        return await self._record_failure(lease, stage, code, message, counts=True)

    async def release(self, lease: Lease) -> str:
        """Gives the job back to the queue, the attempt uncounted (a worker stopping)."""
        return await self._record_failure(lease, "", 0, "", counts=False)

    async def _record_failure(
        self, lease: Lease, stage: str, code: int, message: str, counts: bool
    ) -> str:
        job_id = lease.delivery.job_id
        reply = await self._fail(
            keys=[
                self.job_key(job_id),
                lease.delivery.stream,
                self.failed_key,
                self.audio_key(job_id),
            ],
            args=[
                lease.token,
                GROUP,
                lease.delivery.entry_id,
                now_ms(),
                stage,
                code,
                message,
                self.retention_s,
                job_id,
                "1" if counts else "0",
            ],
        )
        return str(reply.decode())

    async def forget_idle_consumers(self, idle_s: float = 3600.0) -> int:
        """Removes consumers (dead workers: each process has its own name) that
        hold nothing and were idle for `idle_s`, so the group does not grow forever."""
        removed = 0
        for stream in self.streams.values():
            for consumer in await self.redis.xinfo_consumers(stream, GROUP):
                if consumer["pending"] == 0 and consumer["idle"] > idle_s * 1000:
                    await self.redis.xgroup_delconsumer(stream, GROUP, consumer["name"])
                    removed += 1
        return removed
