"""The archive on its own: names, whole files only, retention."""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.archive import Archive, Archivist
from services.common.cache_files import PARTIAL_MARK


def test_names_follow_the_rule_and_never_collide(tmp_path) -> None:
    archive = Archive(tmp_path, retention_days=30)
    when = datetime(2026, 11, 25, 14, 5, 1, 123456, tzinfo=UTC)
    first = archive.entry("dev1", "lobby", when)
    second = archive.entry("dev1", "lobby", when)
    assert first.path("mp4") == tmp_path / "2026-11-25" / "dev1_20261125T140501123Z_lobby.mp4"
    assert second.stem == "dev1_20261125T140501123Z_lobby-2"
    assert archive.entry("", "", when).stem.startswith("anonymous_20261125T140501123Z_default")


def test_only_whole_files_are_visible(tmp_path) -> None:
    archive = Archive(tmp_path, retention_days=30)
    entry = archive.entry("u", "s")
    # Reserved but not written: nothing on disk at all.
    assert list(entry.folder.iterdir()) == []
    archive.write(entry, "mp4", b"\x00" * 1000)
    archive.write_record(entry, {"trace_id": "t1"})
    names = sorted(p.name for p in entry.folder.iterdir())
    assert names == [entry.path("json").name, entry.path("mp4").name]
    assert json.loads(entry.path("json").read_text())["trace_id"] == "t1"


def test_a_failed_write_leaves_nothing(tmp_path) -> None:
    archive = Archive(tmp_path, retention_days=30)
    archivist = Archivist(archive, "audio")
    record = {"trace_id": "t2", "bad": object()}  # not JSON: the record write fails

    with pytest.raises(TypeError):
        asyncio.run(archivist.keep(record, "u", "s", audio=b"\x00\x00" * 1600, audio_rate_hz=16000))
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_sweep_applies_retention_and_removes_crash_leftovers(tmp_path) -> None:
    archive = Archive(tmp_path, retention_days=7)
    now = time.time()
    today = datetime.fromtimestamp(now, UTC)
    old = tmp_path / (today - timedelta(days=8)).strftime("%Y-%m-%d")
    recent = tmp_path / (today - timedelta(days=6)).strftime("%Y-%m-%d")
    for folder in (old, recent):
        folder.mkdir()
        (folder / "u_x_s.json").write_text("{}")
    stale = recent / f"u_y_s.mp4{PARTIAL_MARK}"
    stale.write_bytes(b"half")
    os.utime(stale, (now - 3600, now - 3600))
    fresh = recent / f"u_z_s.mp4{PARTIAL_MARK}"
    fresh.write_bytes(b"being written")
    (tmp_path / "not-a-date").mkdir()
    assert archive.sweep(now) == 1
    assert not old.exists() and (recent / "u_x_s.json").exists()
    assert not stale.exists() and fresh.exists()
    assert (tmp_path / "not-a-date").exists()
