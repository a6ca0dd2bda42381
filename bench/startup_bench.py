"""Startup: how long each program takes from `exec` to SERVING, split into
importing its server module and loading its models, and which imports cost
the most. A restart (kill -9, a hang) costs all of it, so this is the floor
under the chaos bench's recovery times.

Per program: `import services.<name>.server` in a fresh interpreter (p50 of
a few runs; the bare interpreter's own start is the first row), then the
real program (`python -m services.<name>`) on a free port with the
project's prepared caches (TALKER_CACHE_DIR, as after `make setup`) polled
through grpc.health.v1 until SERVING (p50), with the load time the program
logs itself, and the three heaviest third-party packages of the import
(`python -X importtime`, cumulative, so a package pulled in by another
counts in both)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.tables import percentile, print_table
from services.common.health_probe import probe
from services.common.settings import default_var_dir
from tests.processes import free_port

PROGRAMS = ["asr", "chat", "synthesize", "animate"]
RUNS = int(os.environ.get("TALKER_BENCH_STARTUP_RUNS", "3"))
OWN_PACKAGES = {"services", "talker", "bench", "tests", "gateway", "encodings"}
SERVING_TIMEOUT_S = 300.0


def import_seconds(statement: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True, capture_output=True)
    return time.perf_counter() - started


def heaviest_imports(module: str, count: int = 3) -> str:
    """The third-party packages whose import took longest (cumulative)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        check=True,
        capture_output=True,
        text=True,
    )
    packages: dict[str, int] = {}
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (
            part.strip() for part in line.removeprefix("import time:").split("|")
        )
        if not cumulative.isdigit():
            continue  # the header line
        root = name.split(".")[0]
        if name == root and root not in OWN_PACKAGES and not root.startswith("_"):
            packages[root] = max(packages.get(root, 0), int(cumulative))
    top = sorted(packages.items(), key=lambda item: -item[1])[:count]
    return ", ".join(f"{name} {us / 1e6:.2f}" for name, us in top)


def serving_seconds(program: str, var_dir: Path) -> tuple[float, float]:
    """(exec -> SERVING, the load time the program logged) of one start."""
    port = free_port()
    env = {
        **os.environ,
        "TALKER_VAR_DIR": str(var_dir),
        # The caches `make setup` and the first start prepared: a restart finds them.
        "TALKER_CACHE_DIR": os.environ.get("TALKER_CACHE_DIR")
        or str(default_var_dir().resolve() / "cache"),
        f"TALKER_{program.upper()}_PORT": str(port),
        f"TALKER_{program.upper()}_METRICS_PORT": "0",
        "HF_HUB_OFFLINE": "1",
    }
    log_path = var_dir / f"{program}.log"
    with log_path.open("wb") as log_file:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", f"services.{program}"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            while probe(f"127.0.0.1:{port}", timeout_s=0.5) != "SERVING":
                if process.poll() is not None or time.perf_counter() - started > SERVING_TIMEOUT_S:
                    raise RuntimeError(f"{program} never became SERVING; see {log_path}")
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
        finally:
            process.terminate()
            process.wait(30)
    load_s = float("nan")
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "serving":
            load_s = float(record.get("load_s", "nan"))
    return elapsed, load_s


def main() -> None:
    baseline = [import_seconds("pass") for _ in range(RUNS)]
    rows: list[list[object]] = [["(python itself)", percentile(baseline, 50), "", "", ""]]
    with tempfile.TemporaryDirectory(prefix="talker-startup-") as folder:
        for program in PROGRAMS:
            module = f"services.{program}.server"
            imports = [import_seconds(f"import {module}") for _ in range(RUNS)]
            # The first start may prepare what later ones find in the var dir.
            starts = [serving_seconds(program, Path(folder)) for _ in range(RUNS)]
            rows.append(
                [
                    program,
                    percentile(imports, 50),
                    percentile([s for s, _ in starts], 50),
                    percentile([load for _, load in starts], 50),
                    heaviest_imports(module),
                ]
            )
    print_table(
        f"Startup per program (p50 of {RUNS}; load average {os.getloadavg()[0]:.1f})",
        [
            "program",
            "import server s",
            "exec -> SERVING s",
            "of it loading s",
            "heaviest imports (cumulative s)",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
