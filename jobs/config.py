"""Settings of the job queue and its programs.

- `RedisSettings` (`TALKER_REDIS_*`): the Redis server supervisord runs.
- `JobSettings` (`TALKER_JOBS_*`): the queue as the gateway and every worker
  see it. One variable (`TALKER_JOBS_REDIS_URL`) points both at a shared Redis.
- `WorkerSettings` (`TALKER_WORKER_*`): one worker process. Workers call the
  stages with the gateway's settings (`TALKER_GATEWAY_*_ADDRESS`, deadlines,
  retries, archive folder), so a worker renders exactly as the gateway would.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings, default_var_dir


class RedisSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TALKER_REDIS_", extra="ignore")
    program: ClassVar[str] = "redis"

    port: int = Field(default=6379, ge=1, le=65535, description="Redis TCP port.")
    data_dir: Path = Field(
        default_factory=lambda: default_var_dir() / "redis",
        description="Folder of Redis's append-only file and snapshots.",
    )
    appendfsync: str = Field(
        default="always",
        pattern=r"^(always|everysec|no)$",
        description="When Redis fsyncs its append-only file. `always`: a job the gateway "
        "has acknowledged survives even a kill -9 of Redis; jobs are few and each is "
        "worth minutes of rendering, so the cost of an fsync per write does not matter.",
    )
    maxmemory_mb: int = Field(
        default=0,
        ge=0,
        description="Redis memory ceiling, MiB; 0 = none. Jobs are never evicted "
        "(noeviction): past the ceiling SubmitRender fails rather than losing jobs.",
    )

    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


class JobSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TALKER_JOBS_", extra="ignore")
    program: ClassVar[str] = "jobs"

    redis_url: str = Field(
        default_factory=lambda: RedisSettings().url(),
        description="The Redis that holds the queue and job records. Empty: the "
        "supervisord-run one (TALKER_REDIS_HOST / TALKER_REDIS_PORT).",
    )
    key_prefix: str = Field(
        default="talker:jobs",
        pattern=r"^[A-Za-z0-9:_-]{1,64}$",
        description="Prefix of every Redis key of the queue, so several systems can share a Redis.",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=20,
        description="Attempts a job gets (a worker that dies mid-job uses one up) before "
        "it ends FAILED and goes to the failed list.",
    )
    claim_idle_s: float = Field(
        default=60.0,
        gt=0,
        description="A running job whose worker has not renewed it for this long is taken "
        "by another worker (its worker died or hung). Workers renew every heartbeat_s.",
    )
    heartbeat_s: float = Field(
        default=2.0,
        gt=0,
        description="How often a worker renews the job it runs (and notices a cancel).",
    )
    retention_days: float = Field(
        default=7.0,
        gt=0,
        description="Finished jobs (done, failed, cancelled) are forgotten this long after "
        "they end. Their archived videos follow the archive's own retention.",
    )
    max_script_chars: int = Field(
        default=5000,
        ge=1,
        description="Longest script accepted, characters. 5000 is Synthesize's own cap "
        "and about 5 minutes of speech.",
    )
    max_audio_s: float = Field(
        default=600.0,
        gt=0,
        description="Longest clip accepted for an audio job, seconds (Animate's render cap).",
    )


class WorkerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TALKER_WORKER_", extra="ignore")
    program: ClassVar[str] = "worker"

    port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the worker's grpc.health.v1 (for probes). 0 picks a free "
        "one: several workers run on one host under supervisord.",
    )
    metrics_port: int = Field(
        default=0,
        ge=-1,
        le=65535,
        description="Port of the worker's /metrics. 0 picks a free one, announced in "
        "$TALKER_VAR_DIR/run/workers/ for Prometheus (file_sd); -1 turns it off.",
    )
    stats_interval_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="How often the worker reads the queue's depth, ages and failed list "
        "from Redis for its metrics.",
    )
    grace_period_s: float = Field(
        default=30.0,
        ge=0,
        le=600,
        description="On SIGTERM, seconds the job in progress gets to finish; past it the "
        "job goes back to the queue (the attempt is not counted).",
    )
    poll_s: float = Field(
        default=1.0,
        gt=0,
        le=30,
        description="Longest a worker blocks on an empty queue before it looks for jobs "
        "of dead workers again.",
    )
