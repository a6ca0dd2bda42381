"""The watchdog under the real supervisord: a hung program (SIGSTOP, port
still open) and a program over its memory ceiling are restarted; a program
starved of CPU is not, until its patience runs out; the alert rules, fed with
what that system exports, fire for the ceiling and then for the restart."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from services.common.health_probe import probe
from tests.alert_rules import MINUTES_PER_SCRAPE, promtool_test, scrape, severity
from tests.processes import Supervisor, assert_logs_are_json

STARTUP_GRACE_S = 45
# Well past a restart cycle (startup grace + not-serving grace + probes: 50-60 s
# on a busy host), so a program that stays over its ceiling meets the backoff.
BACKOFF_S = 100
SLOWED_PATIENCE_S = 12


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    supervisor = Supervisor(
        tmp_path_factory.mktemp("var"),
        {
            "TALKER_WATCHDOG_INTERVAL_S": "1",
            "TALKER_WATCHDOG_PROBE_TIMEOUT_S": "1",
            "TALKER_WATCHDOG_NOT_SERVING_GRACE_S": "2",
            "TALKER_WATCHDOG_BACKOFF_INITIAL_S": str(BACKOFF_S),
            # Long enough for chat to load its model on a busy host (NOT_SERVING while
            # loading is not counted within it); synthesize is restarted after it.
            "TALKER_WATCHDOG_STARTUP_GRACE_S": str(STARTUP_GRACE_S),
            "TALKER_WATCHDOG_SLOWED_PATIENCE_S": str(SLOWED_PATIENCE_S),
            # synthesize never comes up: the gateway serves without it after this long.
            "TALKER_GATEWAY_STAGES_WAIT_S": "20",
            # Far below what the voice models need: synthesize is over it as soon as it loads.
            "TALKER_SYNTHESIZE_MEMORY_LIMIT_MB": "100",
        },
    )
    supervisor.start()
    try:
        for program in ("asr", "chat"):
            supervisor.wait_status(supervisor.addresses[program], timeout_s=240)
        yield supervisor
    finally:
        supervisor.stop()
    # Kills, restarts and all: every line every program logged is JSON.
    assert_logs_are_json(supervisor.var_dir)


def pid(supervisor: Supervisor, program: str) -> int:
    return int(supervisor.ctl("pid", f"talker:{program}").stdout.strip())


def watchdog_events(supervisor: Supervisor, event: str) -> list[dict]:
    lines = supervisor.log("watchdog").splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == event]


def uptime_s(supervisor: Supervisor, program: str) -> int:
    status = supervisor.ctl("status", f"talker:{program}").stdout  # "... uptime 0:00:19"
    hours, minutes, seconds = status.rsplit("uptime", 1)[1].split()[0].split(":")
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds)


def test_hung_program_is_killed_and_comes_back(watched: Supervisor) -> None:
    address = watched.addresses["asr"]
    # Past the startup grace: silence now means hung.
    while uptime_s(watched, "asr") <= STARTUP_GRACE_S + 1:
        time.sleep(0.5)
    hung = pid(watched, "asr")
    os.kill(hung, signal.SIGSTOP)
    stopped_at = time.monotonic()
    deadline = stopped_at + 90
    while not (probe(address, 1) == "SERVING" and pid(watched, "asr") != hung):
        assert time.monotonic() < deadline, watched.log("watchdog")[-2000:]
        time.sleep(0.2)
    print(f"asr hung -> SERVING again with a new process in {time.monotonic() - stopped_at:.1f} s")
    restarts = [e for e in watchdog_events(watched, "restarting program") if e["program"] == "asr"]
    assert restarts and restarts[-1]["reason"] == "no_answer"


def test_a_program_starved_of_cpu_is_not_killed_until_its_patience_runs_out(
    watched: Supervisor,
) -> None:
    address = watched.addresses["animate"]
    while uptime_s(watched, "animate") <= STARTUP_GRACE_S + 1 or probe(address, 1) != "SERVING":
        time.sleep(0.5)
    starved = pid(watched, "animate")
    # The fault, injected on purpose: two busy loops on CPU 0, and animate's
    # threads on CPU 0 at the idle priority, so they run only when the loops let
    # them (a host busier than the program can bear, not a hung program).
    cpu = {0}
    burners = [
        subprocess.Popen(
            [sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {cpu})\nwhile True: pass"]
        )
        for _ in range(2)
    ]
    try:
        for task in os.listdir(f"/proc/{starved}/task"):
            os.sched_setaffinity(int(task), cpu)
            os.sched_setscheduler(int(task), os.SCHED_IDLE, os.sched_param(0))
        started = time.monotonic()
        print(f"animate starved from {datetime.now().isoformat()}")
        deadline = started + SLOWED_PATIENCE_S + 60

        def animate_events(event: str) -> list[dict]:
            return [e for e in watchdog_events(watched, event) if e["program"] == "animate"]

        not_counted = "no answer, but the host is slowing the program: not counted"
        while not animate_events("restarting program"):
            assert time.monotonic() < deadline, watched.log("watchdog")[-3000:]
            time.sleep(0.5)
        restarted_after_s = time.monotonic() - started
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    slowed = animate_events(not_counted)
    # The watchdog saw why: it was waiting for a CPU; those rounds were not counted.
    assert slowed and all("for a CPU" in e["why"] for e in slowed), slowed
    # ... for the whole patience, not the 3 rounds (3 s) that kill a hung program.
    assert max(e["slowed_s"] for e in slowed) >= SLOWED_PATIENCE_S - 2, slowed
    assert restarted_after_s >= SLOWED_PATIENCE_S, restarted_after_s
    assert animate_events("restarting program")[-1]["reason"] == "no_answer"
    print(
        f"animate starved: {len(slowed)} unanswered rounds not counted, killed after {restarted_after_s:.1f} s"
    )
    watched.wait_status(address, timeout_s=120)
    assert pid(watched, "animate") != starved


def test_program_over_its_memory_ceiling_reports_not_serving_and_is_restarted(
    watched: Supervisor,
) -> None:
    deadline = time.monotonic() + STARTUP_GRACE_S + 120
    while not any(
        e["program"] == "synthesize" for e in watchdog_events(watched, "restarting program")
    ):
        assert time.monotonic() < deadline, watched.log("watchdog")[-2000:]
        time.sleep(0.5)
    restart = next(
        e for e in watchdog_events(watched, "restarting program") if e["program"] == "synthesize"
    )
    assert restart["reason"] == "not_serving"
    log = [
        json.loads(line) for line in watched.log("synthesize").splitlines() if line.startswith("{")
    ]
    assert any(e["event"] == "not serving" and "memory" in e.get("conditions", []) for e in log)
    # It drained: the restart was a graceful stop, so the old process said so.
    assert any(e["event"] == "termination requested; draining" for e in log)
    # The gateway, which synthesize never let start fully, serves without it and
    # is not restarted for synthesize's fault.
    assert probe(watched.addresses["gateway"], 1) == "SERVING"
    assert not [
        e for e in watchdog_events(watched, "restarting program") if e["program"] == "gateway"
    ]
    gateway_log = [json.loads(line) for line in watched.log("gateway").splitlines()]
    assert any(
        e["event"] == "serving without every stage" and e["down"] == ["synthesize"]
        for e in gateway_log
    )


def test_crash_loop_is_rate_limited(watched: Supervisor) -> None:
    # synthesize stays over its ceiling after every restart: the next restart is
    # held back for the backoff instead of following at once.
    deadline = time.monotonic() + BACKOFF_S + STARTUP_GRACE_S
    while not watchdog_events(watched, "restart held back by backoff"):
        assert time.monotonic() < deadline, watched.log("watchdog")[-2000:]
        time.sleep(0.5)
    restarts = [
        datetime.fromisoformat(e["ts"].replace("Z", "+00:00"))
        for e in watchdog_events(watched, "restarting program")
        if e["program"] == "synthesize"
    ]
    # However slowly the machine reloads the program, restarts never come closer
    # together than the backoff (the watchdog's own log times, not the test's clock).
    assert restarts
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(restarts)]
    assert all(gap >= BACKOFF_S - 0.5 for gap in gaps), gaps


def test_alerts_fire_for_the_memory_ceiling_and_then_the_restart(
    watched: Supervisor, tmp_path: Path
) -> None:
    synthesize = f"127.0.0.1:{watched.metrics_ports['synthesize']}"
    watchdog = f"127.0.0.1:{watched.metrics_ports['watchdog']}"
    targets = {"synthesize": synthesize, "watchdog": watchdog}

    def restarts(series: dict[str, float]) -> float:
        return sum(
            value
            for key, value in series.items()
            if key.startswith("talker_watchdog_restarts_total{") and 'program="synthesize"' in key
        )

    def scrape_when(ready: bool, deadline_s: float = 120) -> dict[str, float]:
        """A scrape of both, once synthesize answers, is (not) ready as asked and
        is over 90% of its ceiling (not merely still importing)."""
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                series = scrape(targets)
                labels = f'{{instance="{synthesize}",job="talker"}}'
                rss = series.get(f"process_resident_memory_bytes{labels}", 0.0)
                limit = series.get(f"talker_memory_limit_bytes{labels}", 0.0)
                over_ceiling = limit > 0 and rss > 0.9 * limit
                if series.get(f"talker_ready{labels}") == (1.0 if ready else 0.0) and over_ceiling:
                    return series
            except OSError:
                pass  # restarting: its /metrics is not up yet
            assert time.monotonic() < deadline, watched.log("watchdog")[-2000:]
            time.sleep(0.5)

    # Loaded and over its ceiling (100 MiB): NOT_SERVING, its RSS above 90% of it.
    over = scrape_when(ready=False)
    first_pid = pid(watched, "synthesize")
    # The watchdog restarts it again once the backoff has passed.
    deadline = time.monotonic() + BACKOFF_S + STARTUP_GRACE_S + 60
    while pid(watched, "synthesize") == first_pid:
        assert time.monotonic() < deadline, watched.log("watchdog")[-2000:]
        time.sleep(0.5)
    after = scrape_when(ready=False)
    assert restarts(after) > restarts(over)
    base = {"job": "talker"}
    warn = severity("TalkerMemoryHigh")
    end_of_first = MINUTES_PER_SCRAPE - 1
    end_of_second = 2 * MINUTES_PER_SCRAPE - 1
    result = promtool_test(
        [over, after],
        [
            (
                end_of_first,
                {
                    "TalkerMemoryHigh": [{**base, "instance": synthesize, "severity": warn}],
                    "TalkerNotServing": [
                        {**base, "instance": synthesize, "severity": severity("TalkerNotServing")}
                    ],
                    "TalkerRestarts": [],
                    "TalkerProgramDown": [],
                },
            ),
            (
                end_of_second,
                {
                    "TalkerRestarts": [
                        {
                            **base,
                            "instance": watchdog,
                            "program": "synthesize",
                            "reason": "not_serving",
                            "severity": severity("TalkerRestarts"),
                        },
                        # A new process: its start time changed.
                        {**base, "instance": synthesize, "severity": severity("TalkerRestarts")},
                    ],
                },
            ),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
