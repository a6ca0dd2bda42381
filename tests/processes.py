"""Real processes for system tests: free ports and a private supervisord."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from operations.programs import PROGRAMS
from services.common.health_probe import probe
from services.common.runtime import GrpcProgram

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
SUPERVISOR_CONF = REPO / "supervisor" / "supervisord.conf"


_PORTS_GIVEN: set[int] = set()


def ephemeral_port_range() -> tuple[int, int]:
    """The ports the kernel gives outgoing connections (Linux's default if unknown)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free now and outside the kernel's ephemeral range, never given twice
    in one process. A port picked by binding to 0 comes from that range, and any
    outgoing connection (a health probe, a gRPC channel) could take it before the
    program under test binds it: animate's metrics port once stayed taken until
    supervisord gave the program up ("Address already in use")."""
    low, high = ephemeral_port_range()
    candidates = range(20000, low) if low > 21000 else range(high + 1, 65536)
    rng = random.Random()
    for _ in range(1000):
        port = rng.choice(candidates)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port in {candidates.start}-{candidates.stop - 1}")


class Supervisor:
    """supervisord with the project's own config, on private ports and a private var dir."""

    def __init__(self, var_dir: Path, env: dict[str, str] | None = None) -> None:
        self.var_dir = var_dir
        # Every program on free ports, so tests never clash with a `make run`.
        self.addresses: dict[str, str] = {}
        self.metrics_ports: dict[str, int] = {}
        ports: dict[str, str] = {}
        for program in [*PROGRAMS, "watchdog"]:
            self.metrics_ports[program] = free_port()
            ports[f"TALKER_{program.upper()}_METRICS_PORT"] = str(self.metrics_ports[program])
        for program in PROGRAMS:
            port = free_port()
            self.addresses[program] = f"127.0.0.1:{port}"
            ports[f"TALKER_{program.upper()}_PORT"] = str(port)
        # Redis on a free port too, and the job queue pointed at it; one render
        # worker unless the test asks for more (TALKER_JOBS_WORKERS in `env`).
        # The web program's HTTP port (its `port` is the health port, set above).
        self.web_http_port = free_port()
        ports["TALKER_WEB_HTTP_PORT"] = str(self.web_http_port)
        self.web_url = f"http://127.0.0.1:{self.web_http_port}"
        self.redis_port = free_port()
        ports["TALKER_REDIS_PORT"] = str(self.redis_port)
        ports["TALKER_JOBS_REDIS_URL"] = f"redis://127.0.0.1:{self.redis_port}/0"
        ports["TALKER_JOBS_WORKERS"] = "1"
        self.env = {**os.environ, "TALKER_VAR_DIR": str(var_dir), **ports, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        (self.var_dir / "log" / "supervisor").mkdir(parents=True, exist_ok=True)
        (self.var_dir / "run").mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [str(VENV_BIN / "supervisord"), "-n", "-c", str(SUPERVISOR_CONF)],
            env=self.env,
            cwd=REPO,
        )

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(VENV_BIN / "supervisorctl"),
                *("-c", str(SUPERVISOR_CONF)),
                *("-s", f"unix://{self.var_dir / 'run' / 'supervisor.sock'}"),
                *args,
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def log(self, program: str) -> str:
        return (self.var_dir / "log" / f"{program}.log").read_text(errors="replace")

    def wait_status(self, address: str, wanted: str = "SERVING", timeout_s: float = 120) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if probe(address, timeout_s=1) == wanted:
                return time.monotonic() - started
            time.sleep(0.2)
        raise AssertionError(f"{address} not {wanted} after {timeout_s} s")

    def wait_running(self, program: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while "RUNNING" not in self.ctl("status", program).stdout:
            if time.monotonic() > deadline:
                raise AssertionError(f"{program} not RUNNING: {self.ctl('status').stdout}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is None:
            return
        self.ctl("shutdown")
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def lines_not_json(var_dir: Path) -> list[str]:
    """Every line of every program log (var/log/*.log, rotated files too) that is not
    one JSON object: what a log shipper parsing each line would choke on."""
    bad = []
    for path in sorted((var_dir / "log").glob("*.log*")):
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            try:
                if not isinstance(json.loads(line), dict):
                    raise ValueError("not an object")
            except ValueError:
                bad.append(f"{path.name}:{number}: {line[:300]}")
    return bad


def assert_logs_are_json(var_dir: Path) -> None:
    bad = lines_not_json(var_dir)
    assert not bad, f"{len(bad)} log lines are not JSON:\n" + "\n".join(bad[:40])


@contextmanager
def serving_system(
    var_dir: Path, env: dict[str, str] | None = None, timeout_s: float = 240
) -> Iterator[Supervisor]:
    """Every program under the project's real supervisord, all SERVING; stopped after.
    When the body did not fail, every line every program logged must be JSON."""
    supervisor = Supervisor(var_dir, env)
    supervisor.start()
    try:
        for address in supervisor.addresses.values():
            supervisor.wait_status(address, timeout_s=timeout_s)
        yield supervisor
    finally:
        supervisor.stop()
    assert_logs_are_json(var_dir)


class InProcessServer:
    """A real gRPC program on a free port, its event loop on a background thread."""

    def __init__(self, program: GrpcProgram) -> None:
        self.program = program
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def _run(self, coro, timeout: float = 300):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> int:
        port = self._run(self.program.start())
        self._run(self.program.wait_ready())
        return port

    def stop(self, grace_s: float = 0) -> None:
        self._run(self.program.stop(grace_s))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.program.port}"


def metric(metrics_port: int, name: str, **labels: str) -> float:
    """The value of the first sample called `name` whose labels include `labels` on the
    /metrics of the program at `metrics_port`."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    raise AssertionError(f"{name} {labels} not in /metrics")
