"""Settings of a render worker (`TALKER_WORKER_*`). A worker calls the stages and
archives with the same fields as the gateway (`pipeline.config.StageSettings`,
here under `TALKER_WORKER_`), and sees the queue through `pipeline.config.JobSettings`."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from pipeline.config import StageSettings


class WorkerSettings(StageSettings):
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
