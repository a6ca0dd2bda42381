"""Settings of the pipeline's parts, shared by the programs that run turns and jobs.

- `StageSettings`: how a program calls the four stages (addresses, deadlines,
  retries) and where it archives. The gateway's settings (`TALKER_GATEWAY_*`) and
  a worker's (`TALKER_WORKER_*`) both extend it, so a worker renders exactly as
  the gateway would.
- `RedisSettings` (`TALKER_REDIS_*`): the Redis server supervisord runs.
- `JobSettings` (`TALKER_JOBS_*`): the queue as the gateway and every worker
  see it. One variable (`TALKER_JOBS_REDIS_URL`) points both at a shared Redis.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.animate.config import AnimateSettings
from services.asr.config import AsrSettings
from services.chat.config import ChatSettings
from services.common.settings import ServiceSettings, default_var_dir
from services.synthesize.config import SynthesizeSettings

# The stages, in chain order (names as in supervisord), and whose settings hold
# each one's own address.
STAGE_SETTINGS: dict[str, type[ServiceSettings]] = {
    "asr": AsrSettings,
    "chat": ChatSettings,
    "synthesize": SynthesizeSettings,
    "animate": AnimateSettings,
}
STAGES = tuple(STAGE_SETTINGS)


class StageSettings(ServiceSettings):
    """The fields of a program that calls the stages; not a program itself."""

    asr_address: str = Field(
        default="", description="host:port of AsrService. Empty: the asr program's own setting."
    )
    chat_address: str = Field(default="", description="host:port of ChatService (empty: chat's).")
    synthesize_address: str = Field(
        default="", description="host:port of SynthesizeService (empty: synthesize's)."
    )
    animate_address: str = Field(
        default="", description="host:port of AnimateService (empty: animate's)."
    )

    # Per-stage deadlines. A stage that overruns fails the turn with DEADLINE_EXCEEDED naming it.
    asr_timeout_s: float = Field(
        default=30, gt=0, description="Deadline of a whole-clip Recognize."
    )
    chat_timeout_s: float = Field(default=60, gt=0, description="Deadline of one reply.")
    synthesize_timeout_s: float = Field(
        default=30, gt=0, description="Deadline of speaking one reply sentence."
    )
    animate_timeout_s: float = Field(
        default=300, gt=0, description="Deadline of a turn's live animation stream."
    )
    render_timeout_s: float = Field(default=600, gt=0, description="Deadline of an mp4 render.")
    lookup_timeout_s: float = Field(
        default=5,
        gt=0,
        description="Deadline of the short bookkeeping calls: looking up a voice or avatar "
        "id before a call, taking a dropped guess back from chat when a call ends.",
    )
    converse_max_s: float = Field(
        default=3600, gt=0, description="Longest a Converse call may stay open, in seconds."
    )
    retry_attempts: int = Field(
        default=3,
        ge=1,
        le=10,
        description="Tries of a downstream call that fails UNAVAILABLE before it produced "
        "anything (a restart in progress), with backoff between them.",
    )
    retry_backoff_s: float = Field(
        default=0.1, ge=0, le=5, description="First retry wait; doubles each time."
    )
    health_wait_s: float = Field(
        default=0.5,
        ge=0,
        le=30,
        description="A stage known to be down (its health Watch says so) is waited for "
        "this long before the call fails fast with UNAVAILABLE naming it.",
    )

    archive_dir: Path = Field(
        default_factory=lambda: default_var_dir() / "archive",
        description="Root of the archive: {root}/{date}/{user_id}_{timestamp}_{scene}.mp4 + .json.",
    )
    archive_retention_days: float = Field(
        default=30, ge=0, description="Archived turns older than this are deleted; 0 keeps all."
    )

    def stage_address(self, stage: str) -> str:
        address: str = getattr(self, f"{stage}_address")
        if address:
            return address
        settings = STAGE_SETTINGS[stage]()
        return f"{settings.host}:{settings.port}"


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
