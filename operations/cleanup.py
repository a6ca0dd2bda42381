"""The periodic disk cleaner the watchdog runs: derived model caches are
bounded by age and size, and partial files left by interrupted writes go.

A cache entry is one folder of derived files (`cache/whisper-base`,
`cache/chat/<model>-<hash>-<dtype>`); its owner rebuilds it when it is
missing, so deleting one costs a slower next start, never data. Entries used
in the last hour are never deleted (a program may be loading them)."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter, Gauge

from services.common.cache_files import remove_stale_partials

log = logging.getLogger("talker.cleanup")

IN_USE_S = 3600.0
CACHE_BYTES = Gauge("talker_cache_bytes", "Bytes in the derived-model cache after cleaning.")
CACHE_REMOVED = Counter(
    "talker_cache_entries_removed_total", "Cache entries deleted, by reason.", ["reason"]
)


@dataclass(frozen=True)
class Entry:
    path: Path
    size: int
    last_used: float


def entries(cache_dir: Path) -> list[Entry]:
    """Top-level folders are entries, or their subfolders where they group entries."""
    found = []
    for child in sorted(cache_dir.iterdir()) if cache_dir.is_dir() else []:
        if not child.is_dir():
            continue
        subfolders = [p for p in child.iterdir() if p.is_dir()]
        for folder in subfolders or [child]:
            files = [p for p in folder.rglob("*") if p.is_file()]
            stats = [p.stat() for p in files] or [folder.stat()]
            found.append(
                Entry(
                    folder,
                    sum(s.st_size for s in stats),
                    max(max(s.st_atime, s.st_mtime) for s in stats),
                )
            )
    return found


def clean_cache(cache_dir: Path, max_bytes: int, max_age_s: float, now: float | None = None) -> int:
    """Deletes stale partials, entries unused for `max_age_s`, then the least
    recently used until the cache is under `max_bytes`. Returns entries deleted."""
    now = now or time.time()
    if not cache_dir.is_dir():
        return 0
    remove_stale_partials(cache_dir)
    for child in cache_dir.iterdir():
        if child.is_dir():
            remove_stale_partials(child)
    removed = 0
    kept = []
    for entry in sorted(entries(cache_dir), key=lambda e: e.last_used):
        idle = now - entry.last_used
        if max_age_s and idle > max_age_s and idle > IN_USE_S:
            _remove(entry, "age")
            removed += 1
        else:
            kept.append(entry)
    total = sum(e.size for e in kept)
    for entry in kept:  # oldest first
        if not max_bytes or total <= max_bytes:
            break
        if now - entry.last_used <= IN_USE_S:
            continue
        _remove(entry, "size")
        total -= entry.size
        removed += 1
    CACHE_BYTES.set(total)
    return removed


def _remove(entry: Entry, reason: str) -> None:
    shutil.rmtree(entry.path, ignore_errors=True)
    CACHE_REMOVED.labels(reason).inc()
    log.info(
        "cache entry removed",
        extra={"path": str(entry.path), "reason": reason, "bytes": entry.size},
    )
