"""Settings every program shares. Each program subclasses `ServiceSettings`
with its own env prefix (`TALKER_ASR_`, `TALKER_CHAT_`, ...), so
`TALKER_ASR_PORT=6000` moves the ASR port and nothing else."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, CliSettingsSource, SettingsConfigDict


def default_var_dir() -> Path:
    """Where runtime state (logs, caches, sockets) lives: `TALKER_VAR_DIR`, else ./var."""
    return Path(os.environ.get("TALKER_VAR_DIR", "var")).resolve()


def available_memory_bytes() -> int:
    """The host's memory, or the cgroup's (v2, then v1) limit when that is lower."""
    total = 0
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except OSError:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        # "max" (v2) or a huge number (v1) means no limit.
        if value.isdigit() and 0 < int(value) < total:
            return int(value)
    return total


class ServiceSettings(BaseSettings):
    """Settings of one gRPC program. Subclasses set `model_config.env_prefix`."""

    model_config = SettingsConfigDict(env_prefix="TALKER_", extra="ignore")

    #: Program name used in logs, metrics and health; subclasses override.
    program: ClassVar[str] = "service"
    #: The model that serves when no model setting is set.
    embedded_model: ClassVar[str] = ""
    #: Settings that point at a model on disk; the first one set names the model in use.
    model_settings: ClassVar[tuple[str, ...]] = ()

    host: str = Field(
        default="127.0.0.1",
        description="Address the gRPC server binds to. Loopback by default: only the "
        "gateway is meant to face clients.",
    )
    port: int = Field(default=0, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the Prometheus /metrics endpoint (same host). 0 turns it off.",
    )
    grace_period_s: float = Field(
        default=10.0,
        ge=0,
        le=300,
        description="On SIGTERM, seconds in-flight calls get to finish before they are cancelled.",
    )
    max_message_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=64 * 1024,
        description="Largest gRPC message accepted or sent, in bytes.",
    )
    max_concurrent_rpcs: int = Field(
        default=64,
        ge=1,
        description="Calls served at once; gRPC answers RESOURCE_EXHAUSTED past it.",
    )
    log_level: str = Field(default="INFO", description="Python logging level name.")
    cpu_niceness: int = Field(
        default=0,
        ge=0,
        le=19,
        description="CPU priority of the program (Unix nice value, 0-19; higher yields "
        "more). On a small host, work that is ahead of the listener can yield to the "
        "stages a turn is waiting on.",
    )
    memory_limit_mb: int | None = Field(
        default=None,
        ge=0,
        description="Memory ceiling (RSS, MiB). Above 90% of it the program reports "
        "NOT_SERVING and the watchdog restarts it once it has drained. Unset: "
        "`memory_limit_share` of the host's memory (or of the container's cgroup limit, "
        "when lower). 0 = no ceiling.",
    )
    memory_limit_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="The default ceiling as a share of the host's (or cgroup's) memory. "
        "Half: one program that grows past it is leaking, and is restarted before the "
        "kernel's OOM killer picks a victim among all of them.",
    )
    var_dir: Path = Field(
        default_factory=default_var_dir,
        description="Folder for runtime state: caches, logs, sockets.",
    )

    cache_dir: Path = Field(
        default_factory=lambda: Path(
            os.environ.get("TALKER_CACHE_DIR") or default_var_dir() / "cache"
        ).resolve(),
        description="Folder for derived model files that are slow to build and safe to "
        "delete (TALKER_CACHE_DIR is shared by all programs).",
    )

    def memory_limit_bytes(self) -> int:
        """The ceiling in bytes (0: none), see `memory_limit_mb`."""
        if self.memory_limit_mb is not None:
            return self.memory_limit_mb * 2**20
        return int(available_memory_bytes() * self.memory_limit_share)

    def model_id(self) -> str:
        """The model this program serves with, as callers see it in the
        `x-talker-model` response header (and the gateway's archive records)."""
        for name in self.model_settings:
            value = getattr(self, name, None)
            if value:
                return str(value)
        return self.embedded_model

    @classmethod
    def load(cls, argv: list[str] | None = None) -> Self:
        """Settings from the environment, overridden by command-line flags
        (`--port 6000 --log-level DEBUG`) when `argv` is given."""
        try:
            if argv is None:
                return cls()
            source: CliSettingsSource[Any] = CliSettingsSource(
                cls,
                cli_parse_args=argv,
                cli_prog_name=f"python -m services.{cls.program}",
                cli_kebab_case=True,
                cli_implicit_flags=True,
            )
            return cls(_cli_settings_source=source(args=argv))  # type: ignore[call-arg]
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})"
                for e in error.errors()
            )
            raise SystemExit(f"{cls.program}: invalid setting: {problems}") from None
