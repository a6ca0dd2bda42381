"""Health-driven restarts. Every `interval_s` each program, and each render
worker that announced itself in var/run/workers/ (jobs/worker.py), is probed
through grpc.health.v1 with a deadline. After `failures_to_restart` failures in a row
the watchdog acts through supervisord's XML-RPC interface:

- no answer (hung, deadlocked, SIGSTOPped, port gone): SIGKILL, and
  supervisord's autorestart brings it back at once: a hung process cannot
  drain, so a graceful stop would only wait out stopwaitsecs. A probe left
  unanswered while the kernel shows the host slowed the program (a thread of
  it starved of CPU, or waiting for the disk: operations/slowdown.py) is
  not counted, for up to `slowed_patience_s`: killing a healthy program on a
  busy host only adds a reload to the load;
- NOT_SERVING for longer than `not_serving_grace_s` (e.g. over its memory
  ceiling): a graceful restart (SIGTERM drains in-flight calls first).

Restarts of one program are rate-limited with exponential backoff so a crash
loop does not spin; every action is logged and counted."""

from __future__ import annotations

import argparse
import json
import logging
import time
import xmlrpc.client
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

from prometheus_client import Counter, Gauge
from pydantic import Field
from pydantic_settings import SettingsConfigDict
from supervisor.xmlrpc import SupervisorTransport

from operations.cleanup import clean_cache
from operations.programs import PROGRAMS, program_settings
from operations.slowdown import sample, slowed_by_host
from services.common.health_probe import probe
from services.common.logs import configure_logging
from services.common.metrics import MEMORY_LIMIT, READY, start_metrics_endpoint
from services.common.runtime import load_settings
from services.common.settings import ServiceSettings

log = logging.getLogger("talker.watchdog")

PROBES = Counter(
    "talker_watchdog_probes_total", "Health probes, by program and result.", ["program", "result"]
)
RESTARTS = Counter(
    "talker_watchdog_restarts_total",
    "Restarts ordered, by program and reason.",
    ["program", "reason"],
)
FAILURES = Gauge("talker_watchdog_consecutive_failures", "Failed probes in a row.", ["program"])


class WatchdogSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TALKER_WATCHDOG_", extra="ignore")
    program: ClassVar[str] = "watchdog"

    metrics_port: int = Field(default=9155, ge=0, le=65535, description="/metrics port; 0 = off.")
    interval_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="Seconds between probe rounds (every program probed at once). A hung "
        "program is killed after `failures_to_restart` rounds: at 2 s, probed one by one, "
        "a SIGSTOPped one was SERVING again 8-25 s later on a busy 2-core host; at 1 s, "
        "all at once, 5-10 s (python -m bench chaos).",
    )
    probe_timeout_s: float = Field(default=1.0, gt=0, le=30, description="Deadline of one probe.")
    failures_to_restart: int = Field(
        default=3, ge=1, le=100, description="Failed probes in a row that trigger a restart."
    )
    slowed_patience_s: float = Field(
        default=30.0,
        ge=0,
        description="How long probes left unanswered are not counted while the kernel shows "
        "the host slowing the program (a thread of it waiting for a CPU for half the round "
        "or more, or for the disk); a stopped program gets no patience. 0 = none.",
    )
    startup_grace_s: float = Field(
        default=60.0,
        ge=0,
        description="After a (re)start, a program that does not answer yet is still importing, "
        "and one that answers NOT_SERVING is still loading its model: neither is counted "
        "for this long (NOT_SERVING then counts after `not_serving_grace_s`).",
    )
    not_serving_grace_s: float = Field(
        default=60.0,
        ge=0,
        description="How long NOT_SERVING is tolerated (model loading, a full queue) before it counts as a failure.",
    )
    backoff_initial_s: float = Field(
        default=10.0, gt=0, description="Least time between two restarts of one program."
    )
    backoff_max_s: float = Field(
        default=300.0, gt=0, description="Longest wait between restarts of a crash-looping program."
    )
    cleanup_interval_s: float = Field(
        default=600.0, gt=0, description="Seconds between runs of the disk cleaner."
    )
    cache_max_mb: int = Field(
        default=20_000,
        ge=0,
        description="Derived-model cache above this (MiB) loses its least recently used "
        "entries; 0 = no size bound.",
    )
    cache_max_age_days: float = Field(
        default=30.0, ge=0, description="Cache entries unused this long are deleted; 0 = keep."
    )
    supervisor_url: str = Field(
        default="", description="supervisord's XML-RPC URL; empty: the unix socket in the var dir."
    )


@dataclass
class ProgramWatch:
    name: str
    address: str
    #: supervisord's "group:process" name of the program.
    supervisor_name: str = ""
    #: Workers: the pid that announced the address (a restarted worker announces anew).
    pid: int = 0
    failures: int = 0
    not_serving_since: float | None = None
    next_restart_allowed: float = 0.0
    backoff_s: float = 0.0
    last_restart: float = 0.0
    #: The running process, as supervisord last reported it.
    process_pid: int = 0
    #: Since when probes go unanswered while the host slows the program.
    slowed_since: float | None = None
    #: A graceful restart of it is under way (in the watchdog's restart threads).
    restarting: bool = False


class Watchdog:
    GROUP: ClassVar[str] = "talker"

    def __init__(
        self, settings: WatchdogSettings, connect: Callable[[], Any], programs: list[str]
    ) -> None:
        self.settings = settings
        self.connect = connect
        self.supervisor = connect()
        # A graceful restart waits for the program to drain (up to its stopwaitsecs):
        # done on the probe loop, it left every other program unwatched meanwhile.
        self.graceful = ThreadPoolExecutor(max_workers=4, thread_name_prefix="restart")
        self.watches = []
        for name in programs:
            program = program_settings(name)
            self.watches.append(
                ProgramWatch(name, f"{program.host}:{program.port}", f"{self.GROUP}:{name}")
            )
        self.workers: dict[str, ProgramWatch] = {}
        self.workers_dir = settings.var_dir / "run" / "workers"

    def discover_workers(self) -> None:
        """Render workers take free ports and announce them in var/run/workers/
        (jobs/worker.py); a file of a worker that is gone is skipped by `check`
        (supervisord does not report it RUNNING with that pid)."""
        found: dict[str, ProgramWatch] = {}
        for path in sorted(self.workers_dir.glob("*.json")):
            if path.name.endswith(".targets.json"):
                continue
            try:
                entry = json.loads(path.read_text())
                name, address, pid = entry["program"], entry["address"], int(entry["pid"])
                supervisor_name = entry["supervisor_name"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being written, or not ours
            watch = self.workers.get(name)
            if watch is None or watch.pid != pid or watch.address != address:
                previous = watch
                watch = ProgramWatch(name, address, supervisor_name, pid)
                if previous is not None:  # keep the crash-loop backoff across restarts
                    watch.backoff_s = previous.backoff_s
                    watch.next_restart_allowed = previous.next_restart_allowed
                    watch.last_restart = previous.last_restart
            found[name] = watch
        self.workers = found

    def state(self, watch: ProgramWatch) -> tuple[str, float]:
        """supervisord's state name for the program and its uptime in seconds."""
        try:
            info = self.supervisor.getProcessInfo(watch.supervisor_name)
        except (xmlrpc.client.Fault, OSError) as error:
            log.warning(
                "supervisord did not answer", extra={"program": watch.name, "error": str(error)}
            )
            return "UNKNOWN", 0.0
        if watch.pid and int(info.get("pid", 0)) != watch.pid:
            return "RESTARTED", 0.0  # the announcing process is gone; its successor will announce
        watch.process_pid = int(info.get("pid", 0))
        return str(info["statename"]), float(info["now"] - info["start"])

    def check(
        self, watch: ProgramWatch, now: float, status: str | None = None, slowed: str | None = None
    ) -> None:
        """One probe's verdict; `status`: the probe's answer when it was already
        made (the round probes every program at once), else it probes now;
        `slowed`: why the host slowed the program during that probe, if it did."""
        if watch.restarting:
            return
        state, uptime_s = self.state(watch)
        # Starting, backing off, stopped by an operator: supervisord's business, not ours.
        if state != "RUNNING":
            watch.failures, watch.not_serving_since, watch.slowed_since = 0, None, None
            return
        status = status or probe(watch.address, self.settings.probe_timeout_s)
        PROBES.labels(watch.name, status).inc()
        if status != "SERVING" and uptime_s < self.settings.startup_grace_s:
            # Still importing before its port is open, or loading its model (a 0.5B
            # chat model took 37 s on a busy 2-core host): not a failure yet.
            watch.failures, watch.not_serving_since, watch.slowed_since = 0, None, None
            return
        if status in ("SERVING", "NOT_SERVING"):
            watch.slowed_since = None  # it answers
        if status == "SERVING":
            watch.failures, watch.not_serving_since = 0, None
            if watch.backoff_s and now - watch.last_restart > self.settings.backoff_max_s:
                watch.backoff_s = 0.0  # healthy long enough: forget the crash loop
        elif status == "NOT_SERVING":
            watch.not_serving_since = watch.not_serving_since or now
            if now - watch.not_serving_since >= self.settings.not_serving_grace_s:
                watch.failures += 1
        # A starved program's kernel still takes the connection: only a probe
        # that timed out can be a slowed one (a refused port is a dead program).
        elif status == "DEADLINE_EXCEEDED" and slowed and self.patient(watch, now):
            log.warning(
                "no answer, but the host is slowing the program: not counted",
                extra={
                    "program": watch.name,
                    "status": status,
                    "why": slowed,
                    "failures": watch.failures,
                    "slowed_s": round(now - (watch.slowed_since or now), 1),
                },
            )
        else:
            watch.failures += 1
            log.warning(
                "no answer",
                extra={
                    "program": watch.name,
                    "status": status,
                    "failures": watch.failures,
                    "slowed": slowed or "",
                },
            )
        FAILURES.labels(watch.name).set(watch.failures)
        if watch.failures >= self.settings.failures_to_restart:
            self.restart(watch, status, now)

    def patient(self, watch: ProgramWatch, now: float) -> bool:
        """Whether an unanswered probe of a program the host is slowing is still
        within `slowed_patience_s`: a program hung in a busy loop on a busy host
        looks starved too, and is killed once the patience runs out."""
        watch.slowed_since = watch.slowed_since or now
        return now - watch.slowed_since < self.settings.slowed_patience_s

    def restart(self, watch: ProgramWatch, status: str, now: float) -> None:
        if now < watch.next_restart_allowed:
            log.warning(
                "restart held back by backoff",
                extra={
                    "program": watch.name,
                    "status": status,
                    "wait_s": round(watch.next_restart_allowed - now, 1),
                },
            )
            return
        full_name = watch.supervisor_name
        reason = "not_serving" if status == "NOT_SERVING" else "no_answer"
        log.error(
            "restarting program",
            extra={
                "program": watch.name,
                "status": status,
                "failures": watch.failures,
                "reason": reason,
            },
        )
        if reason == "no_answer":
            try:
                self.supervisor.signalProcess(full_name, "KILL")  # autorestart brings it back
            except (xmlrpc.client.Fault, OSError) as error:
                log.error("restart failed", extra={"program": watch.name, "error": str(error)})
                return
        else:
            watch.restarting = True
            self.graceful.submit(self.restart_gracefully, watch)
        RESTARTS.labels(watch.name, reason).inc()
        watch.failures, watch.not_serving_since, watch.last_restart = 0, None, now
        watch.slowed_since = None
        watch.backoff_s = min(
            self.settings.backoff_max_s, max(self.settings.backoff_initial_s, watch.backoff_s * 2)
        )
        watch.next_restart_allowed = now + watch.backoff_s

    def restart_gracefully(self, watch: ProgramWatch) -> None:
        """Stop (it drains its calls first) and start again, on a restart thread
        with its own connection to supervisord (an XML-RPC proxy is not shared
        across threads)."""
        try:
            supervisor = self.connect()
            supervisor.stopProcess(watch.supervisor_name, True)
            supervisor.startProcess(watch.supervisor_name, False)
        except (xmlrpc.client.Fault, OSError) as error:
            log.error("restart failed", extra={"program": watch.name, "error": str(error)})
        finally:
            watch.restarting = False

    def clean(self) -> None:
        try:
            clean_cache(
                self.settings.cache_dir,
                self.settings.cache_max_mb * 2**20,
                self.settings.cache_max_age_days * 86400,
            )
        except OSError as error:  # a disk problem must not stop the health checks
            log.error("cache cleaning failed", extra={"error": str(error)})

    def run_forever(self) -> None:
        log.info("watching", extra={"programs": {w.name: w.address for w in self.watches}})
        next_clean = time.monotonic()
        # Probes run at once, so one hung program's deadline does not delay the
        # others' (or its own next) probe; supervisord is asked one call at a time.
        probes = ThreadPoolExecutor(max_workers=16, thread_name_prefix="probe")
        while True:
            started = time.monotonic()
            self.discover_workers()
            watches = [*self.watches, *self.workers.values()]
            deadlines = [self.settings.probe_timeout_s] * len(watches)
            before = [sample(w.process_pid) for w in watches]
            probed_at = time.monotonic()
            answers = list(probes.map(probe, [w.address for w in watches], deadlines))
            window_s = time.monotonic() - probed_at
            # Only a probe that timed out is judged (check): the rest need no second look.
            after = [
                sample(w.process_pid) if status == "DEADLINE_EXCEEDED" else None
                for w, status in zip(watches, answers, strict=True)
            ]
            for watch, status, first, last in zip(watches, answers, before, after, strict=True):
                self.check(watch, time.monotonic(), status, slowed_by_host(first, last, window_s))
            if started >= next_clean:
                self.clean()
                next_clean = started + self.settings.cleanup_interval_s
            time.sleep(max(0.0, self.settings.interval_s - (time.monotonic() - started)))


def supervisor_proxy(settings: WatchdogSettings) -> Any:
    url = settings.supervisor_url or f"unix://{settings.var_dir / 'run' / 'supervisor.sock'}"
    return xmlrpc.client.ServerProxy(
        "http://127.0.0.1", transport=SupervisorTransport(None, None, serverurl=url)
    ).supervisor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("programs", nargs="*", default=list(PROGRAMS))
    args = parser.parse_args()
    configure_logging(WatchdogSettings.program)
    settings = load_settings(WatchdogSettings)
    logging.getLogger().setLevel(settings.log_level.upper())
    start_metrics_endpoint(settings.host, settings.metrics_port)
    # The watchdog is ready once its loop runs: without this its talker_ready
    # stayed 0 and the not-serving alert fired on every healthy system.
    READY.set(1)
    MEMORY_LIMIT.set(settings.memory_limit_bytes())
    Watchdog(settings, partial(supervisor_proxy, settings), args.programs).run_forever()


if __name__ == "__main__":
    main()
