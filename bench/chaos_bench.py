"""Chaos: first every program is hung once (`SIGSTOP`: the port stays open,
nothing answers) and the time until the watchdog has it SERVING again in a
new process is measured, with the watchdog's default probing (every 2 s, 1 s
deadline, 3 failures); then `kill -9` every program several times while a
client asks one question after another through the gateway. Prints recovery
time per program (p50 / max) and what the client lost: turns in flight at a
kill, attempts refused while a stage was down (each retried after 0.5 s, as
a client would), turns never answered, and partial files left."""

from __future__ import annotations

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

PROGRAMS = ["asr", "chat", "synthesize", "animate", "gateway"]
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


def hang_once(system: Supervisor, program: str) -> float:
    name = f"talker:{program}"
    while True:  # past the watchdog's startup grace, silence means hung
        info = system.ctl("pid", name).stdout.strip()
        uptime = system.ctl("status", name).stdout
        if "uptime 0:00:0" not in uptime and "uptime 0:00:1" not in uptime:
            break
        time.sleep(1)
    pid = int(info)
    stopped = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    while True:
        now_pid = system.ctl("pid", name).stdout.strip()
        if (
            now_pid.isdigit()
            and int(now_pid) != pid
            and probe(system.addresses[program], 0.5) == "SERVING"
        ):
            return time.monotonic() - stopped
        if time.monotonic() - stopped > 120:
            return float("nan")
        time.sleep(0.1)


def main() -> None:
    from gateway.samples import spoken_question

    # A shorter startup grace than the default 60 s, so a hang right after the
    # first load counts; the probing itself is the default.
    with running_system({"TALKER_WATCHDOG_STARTUP_GRACE_S": "15"}) as (system, avatar_id):
        hangs = {program: hang_once(system, program) for program in PROGRAMS}
        stub = talker_pb2_grpc.TalkerServiceStub(grpc.insecure_channel(system.addresses["gateway"]))
        client = Client(stub, avatar_id)
        worker = threading.Thread(target=client.run, args=(spoken_question(),), daemon=True)
        worker.start()
        recoveries: dict[str, list[float]] = {p: [] for p in PROGRAMS}
        kills: list[float] = []
        for program in PROGRAMS:
            for _ in range(KILLS):
                time.sleep(1.5)  # let a turn get under way, then kill
                pid = int(system.ctl("pid", f"talker:{program}").stdout.strip())
                killed = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                kills.append(killed)
                time.sleep(0.2)  # supervisord must notice the exit first
                while probe(system.addresses[program], timeout_s=0.5) != "SERVING":
                    time.sleep(0.05)
                recoveries[program].append(time.monotonic() - killed)
                # The client must be answered again before the next kill.
                answered = client.answered
                deadline = time.monotonic() + 60
                while client.answered == answered and time.monotonic() < deadline:
                    time.sleep(0.1)
        client.stop.set()
        worker.join(120)
        archive = system.var_dir / "archive"
        partial = [p for p in archive.rglob("*") if ".partial" in p.name]
        restarts = restart_rows(system.var_dir / "log")
    print_table(
        "Hung program (SIGSTOP) to SERVING again in a new process, default watchdog probing",
        ["program", "SIGSTOP -> SERVING s"],
        [[p, s] for p, s in hangs.items()],
    )
    rows = [
        [p, len(v), percentile(v, 50), max(v) if v else float("nan")] for p, v in recoveries.items()
    ]
    print_table(
        f"Recovery after kill -9 ({KILLS} kills each, a client asking throughout)",
        ["program", "kills", "kill -> SERVING p50 s", "max s"],
        rows,
    )
    in_flight = sum(
        1 for start, end, ok in client.attempts if not ok and any(start <= k <= end for k in kills)
    )
    refused = sum(1 for _, _, ok in client.attempts if not ok) - in_flight
    print_table(
        "What the client saw",
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
        "Where the restarts' time went (every start after the first, from the logs)",
        [
            "program",
            "starts",
            "spawn -> port open p50 s",
            "port open -> SERVING p50 s",
            "spawn -> SERVING max s",
            "watchdog restarts",
        ],
        restarts,
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


def restart_rows(log_dir: Path) -> list[list[object]]:
    spawns: dict[str, list[float]] = {p: [] for p in PROGRAMS}
    for line in (log_dir / "supervisor" / "supervisord.log").read_text().splitlines():
        match = _SPAWNED.match(line)
        if match and match.group(2) in spawns:
            when = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            spawns[match.group(2)].append(when)
    watchdog_lines = (log_dir / "watchdog.log").read_text(errors="replace")
    rows: list[list[object]] = []
    for program, starts in spawns.items():
        listening = _event_times(log_dir / f"{program}.log", "listening")
        serving = _event_times(log_dir / f"{program}.log", "serving")
        opened, loaded, total = [], [], []
        for start in starts[1:]:
            port = next((t for t in listening if t >= start), None)
            ready = next((t for t in serving if port is not None and t >= port), None)
            if port is not None and ready is not None:
                opened.append(port - start)
                loaded.append(ready - port)
                total.append(ready - start)
        kills = sum(
            1
            for line in watchdog_lines.splitlines()
            if '"restarting program"' in line and f'"program": "{program}"' in line
        )
        rows.append(
            [
                program,
                len(starts) - 1,
                percentile(opened, 50),
                percentile(loaded, 50),
                max(total) if total else float("nan"),
                kills,
            ]
        )
    return rows


if __name__ == "__main__":
    main()
