"""Files written by the temp-name-then-rename rule: what a crash mid-write
leaves behind is removed by age (a live writer's temp file is young)."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

log = logging.getLogger("talker.cache")

PARTIAL_MARK = ".partial"
STALE_AFTER_S = 600.0


def remove_stale_partials(folder: Path, older_than_s: float = STALE_AFTER_S) -> int:
    """Deletes files and folders under `folder` (one level) whose names carry
    `.partial` and that were last modified more than `older_than_s` ago."""
    if not folder.is_dir():
        return 0
    cutoff = time.time() - older_than_s
    removed = 0
    for path in folder.iterdir():
        if PARTIAL_MARK not in path.name:
            continue
        try:
            if path.stat().st_mtime > cutoff:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue  # another process cleaned it first
        removed += 1
        log.warning(
            "removed a partial file left by an interrupted write", extra={"path": str(path)}
        )
    return removed
