"""The watchdog's hung-or-slowed verdict on real processes and the kernel's own
figures: a stopped, a deadlocked and a spinning process are hung; one kept off
the CPU by busy neighbours is slowed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from operations.slowdown import sample, slowed_by_host

WINDOW_S = 1.0
# Wakes every 10 ms, as an event loop answering calls does.
TICKING = "import time\nwhile True: time.sleep(0.01)"


@contextmanager
def child(code: str, cpu: int | None = None) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-c", code])
    try:
        if cpu is not None:
            os.sched_setaffinity(process.pid, {cpu})
        time.sleep(0.5)  # past the interpreter's start
        yield process
    finally:
        process.kill()
        process.wait()


def verdict(pid: int) -> str | None:
    before = sample(pid)
    assert before is not None
    time.sleep(WINDOW_S)
    return slowed_by_host(before, sample(pid), WINDOW_S)


def test_a_process_kept_off_the_cpu_by_its_neighbours_is_slowed() -> None:
    with child(TICKING, cpu=0) as ticking:
        os.sched_setscheduler(ticking.pid, os.SCHED_IDLE, os.sched_param(0))
        busy = "while True: pass"
        with child(busy, cpu=0), child(busy, cpu=0):
            why = verdict(ticking.pid)
    assert why is not None and "for a CPU" in why, why


def test_a_stopped_process_is_hung_whatever_else() -> None:
    with child(TICKING) as stopped:
        os.kill(stopped.pid, signal.SIGSTOP)
        assert verdict(stopped.pid) is None
        assert sample(stopped.pid).main.state == "T"  # type: ignore[union-attr]


def test_a_deadlocked_process_is_hung() -> None:
    deadlock = "import threading\nlock = threading.Lock()\nlock.acquire()\nlock.acquire()"
    with child(deadlock) as stuck:
        assert verdict(stuck.pid) is None


def test_a_process_spinning_on_a_cpu_of_its_own_is_hung() -> None:
    with child("while True: pass", cpu=1) as spinning:
        # A CPU of its own on a shared host: the real-time class runs before anything
        # else there (the kernel still leaves others 5% of it).
        try:
            os.sched_setscheduler(spinning.pid, os.SCHED_FIFO, os.sched_param(1))
        except PermissionError:
            pytest.skip("the real-time class needs CAP_SYS_NICE, which this host withholds")
        assert verdict(spinning.pid) is None


@pytest.mark.parametrize("pid", [0, -1, 2**22 + 1])
def test_no_process_no_evidence(pid: int) -> None:
    assert sample(pid) is None
    assert slowed_by_host(None, None, WINDOW_S) is None
