"""Wait until programs are SERVING.

`python -m operations.readiness --timeout 300` waits until every program
reports SERVING through grpc.health.v1; if one does not, it names it and prints
the end of its log, then exits 1. This is what `make run` waits on."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from operations.programs import PROGRAMS, program_settings
from services.common.health_probe import probe
from services.common.settings import default_var_dir


def wait_serving(programs: list[str], timeout_s: float) -> dict[str, str]:
    """Polls until all are SERVING or the timeout passes; returns the last status of each."""
    addresses = {}
    for name in programs:
        settings = program_settings(name)
        addresses[name] = f"{settings.host}:{settings.port}"
    deadline = time.monotonic() + timeout_s
    status = {name: "UNKNOWN" for name in programs}
    while True:
        for name in programs:
            if status[name] != "SERVING":
                status[name] = probe(addresses[name])
        if all(s == "SERVING" for s in status.values()) or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(no log: {error})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait")
    parser.add_argument("programs", nargs="*", default=list(PROGRAMS))
    args = parser.parse_args()
    started = time.monotonic()
    status = wait_serving(args.programs, args.timeout)
    failed = [name for name, s in status.items() if s != "SERVING"]
    for name, s in status.items():
        print(f"{name:<12} {s}")
    if not failed:
        print(f"all {len(status)} programs SERVING after {time.monotonic() - started:.1f} s")
        return
    log_dir = default_var_dir() / "log"
    for name in failed:
        print(f"\n{name} is not SERVING after {args.timeout:.0f} s; last lines of its log:")
        print(tail(log_dir / f"{name}.log"))
    sys.exit(1)


if __name__ == "__main__":
    main()
