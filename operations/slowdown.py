"""Is a program that did not answer its health probe hung, or slowed by the host?

A probe's deadline cannot tell the two apart; the kernel can. What the
program's main thread (the one that runs its event loop) did during the probe
says which it was:

- stopped (SIGSTOP, a debugger): hung, whatever else is true;
- it waited in the CPU run queue for much of the probe's deadline, or it is
  runnable and barely ran (the kernel adds up a wait only once the wait ends):
  the host starved it of CPU, it was not stuck;
- it was blocked on the disk (state D) or took major page faults (code or a
  model read back from a disk that is slow right now): slowed by I/O;
- otherwise (asleep on a lock that is never released, or spinning while it
  had a CPU to itself): hung.

Linux /proc only; where it cannot be read, no evidence means the probe's
verdict stands as before."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class MainThreadSample:
    pid: int
    state: str  # R running, S sleeping, D disk, T stopped, ...
    run_s: float  # total time on a CPU
    run_queue_wait_s: float  # total time spent runnable but waiting for a CPU
    major_faults: int


def sample(pid: int, proc: Path = PROC) -> MainThreadSample | None:
    """The main thread's scheduler figures now; None if the process is gone
    or /proc does not have them."""
    if pid <= 0:
        return None
    task = proc / str(pid) / "task" / str(pid)
    try:
        # comm (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        run_ns, wait_ns = map(int, (task / "schedstat").read_text().split()[:2])
        return MainThreadSample(pid, fields[0], run_ns / 1e9, wait_ns / 1e9, int(fields[9]))
    except (OSError, IndexError, ValueError):
        return None


def slowed_by_host(
    before: MainThreadSample | None,
    after: MainThreadSample | None,
    window_s: float,
    starved_fraction: float = 0.5,
    barely_ran_fraction: float = 0.1,
) -> str | None:
    """Why the program was slowed during the window between the two samples,
    in words for the log, or None when nothing but the program itself can
    explain its silence (including: no evidence, or a stopped process)."""
    if before is None or after is None or before.pid != after.pid:
        return None
    if "T" in (before.state, after.state) or "t" in (before.state, after.state):
        return None  # stopped: nothing is slowing it, it is not running at all
    waited = after.run_queue_wait_s - before.run_queue_wait_s
    if waited >= starved_fraction * window_s:
        return f"its main thread waited {waited:.2f} s of {window_s:.2f} s for a CPU"
    ran = after.run_s - before.run_s
    if after.state == "R" and ran < barely_ran_fraction * window_s:
        # A hung loop that has a CPU runs the whole window; this one waits for one.
        return f"its main thread is waiting for a CPU (it ran {ran:.2f} s of {window_s:.2f} s)"
    faults = after.major_faults - before.major_faults
    if faults > 0:
        return f"its main thread waited for the disk ({faults} major page faults)"
    if "D" in (before.state, after.state):
        return "its main thread was blocked on the disk"
    return None
