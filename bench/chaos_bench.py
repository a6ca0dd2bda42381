"""Chaos: first every program is hung once (`SIGSTOP`: the port stays open,
nothing answers) and the time until the watchdog has it SERVING again in a
new process is measured, with the watchdog's default probing (every 1 s, 1 s
deadline, 3 failures); then `kill -9` every program several times while a
client asks one question after another through the gateway. Prints recovery
time per program (p50 / max) and what the client lost: turns in flight at a
kill, attempts refused while a stage was down (each retried after 0.5 s, as
a client would), turns never answered, and partial files left. Then where
the restarts' time went, read off the logs: the watchdog's detection of a
hang, supervisord's respawn, the new process's imports (spawn to port open)
and its model loading (port open to SERVING), with chat's loading in parts.
The host's load average (sampled every 2 s) is printed with every table:
a restart on a busy 2-core host takes several times as long as on a quiet one."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import grpc

from bench.system import running_system
from bench.tables import percentile, print_table
from services.common.health_probe import probe
from talker.v1 import (
    audio_pb2,
    chat_pb2,
    talker_pb2,
    talker_pb2_grpc,
)
from tests.processes import Supervisor

PROGRAMS = ["asr", "chat", "synthesize", "animate", "gateway", "web"]
KILLS = int(os.environ.get("TALKER_BENCH_KILLS", "3"))
GIVE_UP_S = 30.0


@dataclass
class Client:
    """Asks questions back to back; retries a refused one until GIVE_UP_S."""

    stub: talker_pb2_grpc.TalkerServiceStub
    avatar_id: str
    stop: threading.Event = field(default_factory=threading.Event)
    attempts: list[tuple[float, float, bool]] = field(default_factory=list)  # start, end, ok
    answered: int = 0
    lost: int = 0

    def ask_once(self, clip: bytes) -> bool:
        request = talker_pb2.AskRequest(
            audio=talker_pb2.AudioClip(
                format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_WAV), audio=clip
            ),
            mode=talker_pb2.REPLY_MODE_AUDIO_VIDEO,
            avatar_id=self.avatar_id,
            sampling=chat_pb2.SamplingParams(greedy=True, max_new_tokens=24),
        )
        started = time.monotonic()
        try:
            events = [r.event for r in self.stub.Ask(request, timeout=60)]
            ok = events[-1].WhichOneof("event") == "turn_finished"
        except grpc.RpcError:
            ok = False
        self.attempts.append((started, time.monotonic(), ok))
        return ok

    def run(self, clip: bytes) -> None:
        while not self.stop.is_set():
            first = time.monotonic()
            while not self.ask_once(clip):
                if time.monotonic() - first > GIVE_UP_S:
                    self.lost += 1
                    break
                time.sleep(0.5)
            else:
                self.answered += 1


class LoadSampler:
    """The host's 1-minute load average every 2 s, for the tables' captions."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(2.0):
            self.samples.append(os.getloadavg()[0])

    def caption(self, since: int = 0) -> str:
        now = " / ".join(f"{v:.1f}" for v in os.getloadavg())
        seen = self.samples[since:]
        during = f", 1-min during the run {min(seen):.1f}-{max(seen):.1f}" if seen else ""
        return f"load average now {now} (1/5/15 min){during}"


def hang_once(system: Supervisor, program: str) -> tuple[float, float]:
    """(SIGSTOP -> SERVING in a new process s, when the SIGSTOP was sent, epoch s)."""
    name = f"talker:{program}"
    while True:  # past the watchdog's startup grace, silence means hung
        info = system.ctl("pid", name).stdout.strip()
        uptime = system.ctl("status", name).stdout
        if "uptime 0:00:0" not in uptime and "uptime 0:00:1" not in uptime:
            break
        time.sleep(1)
    pid = int(info)
    stopped = time.monotonic()
    stopped_at = time.time()
    os.kill(pid, signal.SIGSTOP)
    while True:
        now_pid = system.ctl("pid", name).stdout.strip()
        if (
            now_pid.isdigit()
            and int(now_pid) != pid
            and probe(system.addresses[program], 0.5) == "SERVING"
        ):
            return time.monotonic() - stopped, stopped_at
        if time.monotonic() - stopped > 120:
            return float("nan"), stopped_at
        time.sleep(0.1)


def main() -> None:
    from gateway.samples import spoken_question

    # A shorter startup grace than the default 60 s, so a hang right after the
    # first load counts; the probing itself is the default.
    load = LoadSampler()
    with running_system({"TALKER_WATCHDOG_STARTUP_GRACE_S": "15"}) as (system, avatar_id):
        started_samples = len(load.samples)
        hangs = {program: hang_once(system, program) for program in PROGRAMS}
        hang_samples = len(load.samples)
        stub = talker_pb2_grpc.TalkerServiceStub(grpc.insecure_channel(system.addresses["gateway"]))
        client = Client(stub, avatar_id)
        worker = threading.Thread(target=client.run, args=(spoken_question(),), daemon=True)
        worker.start()
        recoveries: dict[str, list[float]] = {p: [] for p in PROGRAMS}
        kills: list[float] = []
        causes: list[float] = [stopped_at for _, stopped_at in hangs.values()]
        probes_seen: list[tuple[str, float, list[tuple[float, str]]]] = []
        for program in PROGRAMS:
            for _ in range(KILLS):
                time.sleep(1.5)  # let a turn get under way, then kill
                pid = int(system.ctl("pid", f"talker:{program}").stdout.strip())
                killed = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                kills.append(killed)
                causes.append(time.time())
                time.sleep(0.2)  # supervisord must notice the exit first
                seen: list[tuple[float, str]] = []
                while (status := probe(system.addresses[program], timeout_s=0.5)) != "SERVING":
                    seen.append((round(time.monotonic() - killed, 2), status))
                    time.sleep(0.05)
                recoveries[program].append(time.monotonic() - killed)
                probes_seen.append((program, causes[-1], seen[-8:]))
                # The client must be answered again before the next kill.
                answered = client.answered
                deadline = time.monotonic() + 60
                while client.answered == answered and time.monotonic() < deadline:
                    time.sleep(0.1)
        client.stop.set()
        worker.join(120)
        archive = system.var_dir / "archive"
        partial = [p for p in archive.rglob("*") if ".partial" in p.name]
        log_dir = system.var_dir / "log"
        restarts = restart_rows(log_dir, causes)
        detections = hang_rows(log_dir, hangs)
        chat_loads = chat_load_rows(log_dir)
        logged = logged_recoveries(log_dir, probes_seen)
        (system.var_dir / "kill-probes.json").write_text(json.dumps(probes_seen))
    load.stop.set()
    print_table(
        "Hung program (SIGSTOP) to SERVING again in a new process, default watchdog probing; "
        + load.caption(started_samples),
        [
            "program",
            "SIGSTOP -> SERVING s",
            "SIGSTOP -> watchdog kills s",
            "-> respawned s",
            "-> port open s",
            "-> SERVING s",
        ],
        [[p, hangs[p][0], *detections[p]] for p in PROGRAMS],
    )
    rows = [
        [
            p,
            len(v),
            percentile(v, 50),
            max(v) if v else float("nan"),
            _p50_max(logged[p]),
        ]
        for p, v in recoveries.items()
    ]
    print_table(
        f"Recovery after kill -9 ({KILLS} kills each, a client asking throughout); "
        + load.caption(hang_samples),
        [
            "program",
            "kills",
            "kill -> SERVING p50 s",
            "max s",
            "kill -> its log's serving p50 / max s",
        ],
        rows,
    )
    in_flight = sum(
        1 for start, end, ok in client.attempts if not ok and any(start <= k <= end for k in kills)
    )
    refused = sum(1 for _, _, ok in client.attempts if not ok) - in_flight
    print_table(
        "What the client saw; " + load.caption(started_samples),
        [
            "turns answered",
            "failed: in flight at a kill",
            "refused while down (retried)",
            "turns lost",
            "partial files",
        ],
        [[client.answered, in_flight, refused, client.lost, len(partial)]],
    )
    print_table(
        "Where the restarts' time went (every start after the first, from the logs); "
        + load.caption(started_samples),
        [
            "program",
            "starts",
            "exit -> spawn p50 s",
            "spawn -> port open p50 / max s",
            "port open -> SERVING p50 / max s",
            "spawn -> SERVING p50 / max s",
            "watchdog kills",
            "watchdog kills at the first start",
        ],
        restarts,
    )
    print_table(
        "Chat's loading in parts (every start after the first, from its log); "
        + load.caption(started_samples),
        ["part", "p50 s", "max s"],
        chat_loads,
    )


_SPAWNED = re.compile(r"^(\S+ \S+) INFO spawned: '(\w+)' with pid")


def _event_times(log_file: Path, event: str) -> list[float]:
    times = []
    for line in log_file.read_text(errors="replace").splitlines() if log_file.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == event:
            times.append(datetime.fromisoformat(record["ts"].replace("Z", "")).timestamp())
    return times


def _spawns(log_dir: Path) -> dict[str, list[float]]:
    """When supervisord spawned each program, every start (epoch s)."""
    spawns: dict[str, list[float]] = {p: [] for p in PROGRAMS}
    for line in (log_dir / "supervisor" / "supervisord.log").read_text().splitlines():
        match = _SPAWNED.match(line)
        if match and match.group(2) in spawns:
            when = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            spawns[match.group(2)].append(when)
    return spawns


def _watchdog_restarts(log_dir: Path) -> list[tuple[str, float]]:
    restarts = []
    for line in (log_dir / "watchdog.log").read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "restarting program":
            when = datetime.fromisoformat(record["ts"].replace("Z", "")).timestamp()
            restarts.append((record["program"], when))
    return restarts


def _after(times: list[float], moment: float | None) -> float | None:
    return next((t for t in times if moment is not None and t >= moment), None)


def _p50_max(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{percentile(values, 50):.2f} / {max(values):.2f}"


def hang_rows(log_dir: Path, hangs: dict[str, tuple[float, float]]) -> dict[str, list[object]]:
    """Per hung program: SIGSTOP -> the watchdog's kill, then each step after it."""
    spawns = _spawns(log_dir)
    restarts = _watchdog_restarts(log_dir)
    rows: dict[str, list[object]] = {}
    for program, (_, stopped_at) in hangs.items():
        killed = _after([t for p, t in restarts if p == program], stopped_at)
        spawned = _after(spawns[program], killed)
        port = _after(_event_times(log_dir / f"{program}.log", "listening"), spawned)
        ready = _after(_event_times(log_dir / f"{program}.log", "serving"), port)
        steps = [stopped_at, killed, spawned, port, ready]
        rows[program] = [
            b - a if a is not None and b is not None else float("nan")
            for a, b in itertools.pairwise(steps)
        ]
    return rows


def restart_rows(log_dir: Path, causes: list[float]) -> list[list[object]]:
    """Every start the bench caused (from its first SIGSTOP on): its cause (a
    kill -9, or the watchdog's kill of a hung program) to the spawn, the imports
    (spawn to port open), the loading (to SERVING). The watchdog's kills are
    counted apart for the first start, all programs loading at once: one killed
    then did not answer a probe within its deadline while loading."""
    spawns = _spawns(log_dir)
    watchdog = _watchdog_restarts(log_dir)
    first_cause = min(causes)
    rows: list[list[object]] = []
    for program, starts in spawns.items():
        listening = _event_times(log_dir / f"{program}.log", "listening")
        serving = _event_times(log_dir / f"{program}.log", "serving")
        exits = sorted([*causes, *(t for p, t in watchdog if p == program)])
        respawned, opened, loaded, total = [], [], [], []
        for previous, start in itertools.pairwise(starts):
            if start < first_cause:
                continue  # the first start, put right by the watchdog (its kills are counted)
            cause = next((t for t in reversed(exits) if previous < t <= start), None)
            if cause is not None:
                respawned.append(start - cause)
            port = _after(listening, start)
            ready = _after(serving, port)
            if port is not None and ready is not None:
                opened.append(port - start)
                loaded.append(ready - port)
                total.append(ready - start)
        rows.append(
            [
                program,
                len(total),
                percentile(respawned, 50),
                _p50_max(opened),
                _p50_max(loaded),
                _p50_max(total),
                sum(1 for p, t in watchdog if p == program and t >= first_cause),
                sum(1 for p, t in watchdog if p == program and t < first_cause),
            ]
        )
    return rows


def logged_recoveries(
    log_dir: Path, kills: list[tuple[str, float, list[tuple[float, str]]]]
) -> dict[str, list[float]]:
    """Kill -> the "serving" line the new process logged: the recovery without the
    bench's own probing (its probes share this process with the asking client)."""
    logged: dict[str, list[float]] = {p: [] for p in PROGRAMS}
    for program, killed_at, _ in kills:
        ready = _after(_event_times(log_dir / f"{program}.log", "serving"), killed_at)
        if ready is not None:
            logged[program].append(ready - killed_at)
    return logged


def chat_load_rows(log_dir: Path) -> list[list[object]]:
    parts: dict[str, list[float]] = {}
    records = []
    for line in (log_dir / "chat.log").read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "chat model loaded":
            records.append(record)
    for record in records[1:]:
        for key in ("model_s", "openings_s", "warm_up_s", "seconds"):
            if key in record:
                parts.setdefault(key, []).append(float(record[key]))
    return [[k, percentile(v, 50), max(v)] for k, v in parts.items()]


if __name__ == "__main__":
    main()
