"""Is a program that did not answer its health probe hung, or slowed by the host?

A probe's deadline cannot tell the two apart; the kernel can. What the
program's threads did during the probe says which it was:

- stopped (SIGSTOP, a debugger): hung, whatever else is true;
- a thread waited in the CPU run queue for much of the probe's deadline, or
  the main thread (the one that runs the event loop) is runnable and barely
  ran (the kernel adds up a wait only once the wait ends): the host starved
  it of CPU;
- a thread was blocked on the disk (state D) or took major page faults (code
  or a model read back from a disk that is slow right now): slowed by I/O.
  Any thread counts, not only the event loop's: the loop may be waiting for
  the GIL that a slowed worker thread holds, and then it looks asleep;
- otherwise (asleep on a lock that is never released, or spinning while it
  had a CPU to itself): hung.

Linux /proc only; where it cannot be read, no evidence means the probe's
verdict stands as before."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ThreadSample:
    state: str  # R running, S sleeping, D disk, T stopped, ...
    run_s: float  # total time on a CPU
    run_queue_wait_s: float  # total time spent runnable but waiting for a CPU
    major_faults: int


@dataclass(frozen=True)
class ProcessSample:
    pid: int
    threads: dict[int, ThreadSample]

    @property
    def main(self) -> ThreadSample | None:
        return self.threads.get(self.pid)


def _thread(task: Path) -> ThreadSample | None:
    try:
        # comm (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        run_ns, wait_ns = map(int, (task / "schedstat").read_text().split()[:2])
        return ThreadSample(fields[0], run_ns / 1e9, wait_ns / 1e9, int(fields[9]))
    except (OSError, IndexError, ValueError):
        return None  # the thread ended meanwhile, or no schedstat here


def sample(pid: int, proc: Path = PROC) -> ProcessSample | None:
    """Every thread's scheduler figures now; None if the process is gone or
    /proc does not have them."""
    if pid <= 0:
        return None
    tasks = proc / str(pid) / "task"
    try:
        tids = [int(name) for name in os.listdir(tasks)]
    except (OSError, ValueError):
        return None
    threads = {tid: t for tid in tids if (t := _thread(tasks / str(tid))) is not None}
    return ProcessSample(pid, threads) if pid in threads else None


def slowed_by_host(
    before: ProcessSample | None,
    after: ProcessSample | None,
    window_s: float,
    starved_fraction: float = 0.5,
    barely_ran_fraction: float = 0.1,
) -> str | None:
    """Why the host slowed the program during the window between the two
    samples, in words for the log, or None when nothing but the program itself
    can explain its silence (including: no evidence, or a stopped process)."""
    if before is None or after is None or before.pid != after.pid:
        return None
    pairs = [
        (tid, before.threads[tid], t) for tid, t in after.threads.items() if tid in before.threads
    ]
    if any(s.state in ("T", "t") for _, a, b in pairs for s in (a, b)):
        return None  # stopped: nothing is slowing it, it is not running at all
    for tid, first, last in pairs:
        waited = last.run_queue_wait_s - first.run_queue_wait_s
        if waited >= starved_fraction * window_s:
            name = "its main thread" if tid == after.pid else f"its thread {tid}"
            return f"{name} waited {waited:.2f} s of {window_s:.2f} s for a CPU"
    if before.main is not None and after.main is not None and after.main.state == "R":
        ran = after.main.run_s - before.main.run_s
        if ran < barely_ran_fraction * window_s:
            # A hung loop that has a CPU runs the whole window; this one waits for one.
            return f"its main thread is waiting for a CPU (it ran {ran:.2f} s of {window_s:.2f} s)"
    faults = sum(last.major_faults - first.major_faults for _, first, last in pairs)
    if faults > 0:
        return f"it waited for the disk ({faults} major page faults)"
    if any(last.state == "D" for _, _, last in pairs):
        return "a thread of it was blocked on the disk"
    return None
