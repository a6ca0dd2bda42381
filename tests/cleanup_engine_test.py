"""The disk cleaner: cache entries go by age and by size, least recently used
first, never one in use; partial files left by interrupted writes go."""

from __future__ import annotations

import os
import time
from pathlib import Path

from operations.cleanup import clean_cache, entries
from services.common.cache_files import PARTIAL_MARK

DAY = 86400.0


def make_entry(folder: Path, size: int, used_ago_s: float, now: float) -> Path:
    folder.mkdir(parents=True)
    data = folder / "model.bin"
    data.write_bytes(b"\x00" * size)
    os.utime(data, (now - used_ago_s, now - used_ago_s))
    return folder


def test_old_and_excess_entries_go_least_recently_used_first(tmp_path: Path) -> None:
    now = time.time()
    ancient = make_entry(tmp_path / "chat" / "old-model", 1000, 40 * DAY, now)
    older = make_entry(tmp_path / "chat" / "model-a", 4000, 5 * DAY, now)
    recent = make_entry(tmp_path / "chat" / "model-b", 4000, 2 * DAY, now)
    live = make_entry(tmp_path / "whisper-base", 4000, 60, now)  # a program is loading it
    stale = tmp_path / "chat" / f"model-c{PARTIAL_MARK}"
    stale.mkdir()
    os.utime(stale, (now - DAY, now - DAY))
    removed = clean_cache(tmp_path, max_bytes=9000, max_age_s=30 * DAY, now=now)
    assert removed == 2
    assert not ancient.exists() and not older.exists() and not stale.exists()
    assert recent.exists() and live.exists()
    assert {e.path for e in entries(tmp_path)} == {recent, live}


def test_an_entry_in_use_survives_even_over_the_size_bound(tmp_path: Path) -> None:
    now = time.time()
    live = make_entry(tmp_path / "whisper-base", 10_000, 10, now)
    assert clean_cache(tmp_path, max_bytes=100, max_age_s=DAY, now=now) == 0
    assert live.exists()
