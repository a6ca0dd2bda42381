"""Every turn's outputs on disk: `{root}/{date}/{user_id}_{timestamp}_{scene}.mp4`
(or `.wav`) and a `.json` record beside it. Files are written under a temp
name and renamed, so a reader (or a crash) never sees half a file; the record
is written last, so a record always points at a complete output."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.common.audio import wav_bytes
from services.common.cache_files import PARTIAL_MARK, remove_stale_partials

log = logging.getLogger("talker.pipeline.archive")

DATE_FORMAT = "%Y-%m-%d"


@dataclass(frozen=True)
class ArchiveEntry:
    """Where one turn's files go: `stem` plus an extension."""

    folder: Path
    stem: str

    def path(self, extension: str) -> Path:
        return self.folder / f"{self.stem}.{extension}"


class Archive:
    def __init__(self, root: Path, retention_days: float) -> None:
        self.root = root
        self.retention_days = retention_days
        # Names handed out but not yet written. Held in memory, not as files on
        # disk, so a killed gateway leaves nothing half-made behind.
        self._reserved: set[Path] = set()
        self._lock = threading.Lock()

    def entry(self, user_id: str, scene: str, when: datetime | None = None) -> ArchiveEntry:
        """A fresh, unused name for a turn. Ids must already be checked."""
        when = when or datetime.now(UTC)
        folder = self.root / when.strftime(DATE_FORMAT)
        folder.mkdir(parents=True, exist_ok=True)
        stamp = when.strftime("%Y%m%dT%H%M%S") + f"{when.microsecond // 1000:03d}Z"
        base = f"{user_id or 'anonymous'}_{stamp}_{scene or 'default'}"
        with self._lock:
            stem, n = base, 1
            # Two turns in the same millisecond: keep both.
            while folder / stem in self._reserved or any(folder.glob(f"{stem}.*")):
                n += 1
                stem = f"{base}-{n}"
            self._reserved.add(folder / stem)
        return ArchiveEntry(folder, stem)

    def release(self, entry: ArchiveEntry) -> None:
        with self._lock:
            self._reserved.discard(entry.folder / entry.stem)

    def write(self, entry: ArchiveEntry, extension: str, data: bytes) -> Path:
        final = entry.path(extension)
        partial = final.with_name(final.name + PARTIAL_MARK)
        with open(partial, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, final)
        return final

    def write_record(self, entry: ArchiveEntry, record: dict[str, Any]) -> Path:
        data = json.dumps(record, ensure_ascii=False, indent=2, sort_keys=True).encode()
        path = self.write(entry, "json", data)
        self.release(entry)
        return path

    def write_entry(
        self, entry: ArchiveEntry, record: dict[str, Any], media: tuple[str, bytes] | None = None
    ) -> Path:
        """The media file (extension, bytes), then the record naming it: the path of
        the media, or of the record when there is none. Nothing is left of an entry
        whose writes failed."""
        try:
            path = None
            if media is not None:
                path = self.write(entry, *media)
                record["file"] = path.name
            record_path = self.write_record(entry, record)
            return path or record_path
        except BaseException:
            self.abandon(entry)
            raise

    def abandon(self, entry: ArchiveEntry) -> None:
        """Removes every file of a turn whose record could not be written: an
        output without its record is as good as lost, and only confuses."""
        for path in entry.folder.glob(f"{entry.stem}.*"):
            path.unlink(missing_ok=True)
        self.release(entry)

    def sweep(self, now: float | None = None) -> int:
        """Deletes date folders past the retention and partial files left by a
        crash. Returns how many date folders were deleted."""
        if not self.root.is_dir():
            return 0
        removed = 0
        today = datetime.fromtimestamp(now or time.time(), UTC).date()
        for folder in self.root.iterdir():
            if not folder.is_dir():
                continue
            remove_stale_partials(folder)
            try:
                day = datetime.strptime(folder.name, DATE_FORMAT).date()
            except ValueError:
                continue  # not ours
            if self.retention_days and today - day > timedelta(days=self.retention_days):
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
                log.info("archive folder past retention deleted", extra={"folder": str(folder)})
        return removed


Renderer = Callable[[bytes, int], Awaitable[bytes]]


class Archivist:
    """Decides what a turn leaves in the archive and writes it off the event loop.

    Videos of live turns are rendered by Animate after the turn, one at a time,
    so archiving never competes with the next turn for more than one core."""

    def __init__(self, archive: Archive, media: str) -> None:
        self.archive = archive
        self.media = media
        self._renders = asyncio.Semaphore(1)
        self._background: set[asyncio.Task[None]] = set()

    async def keep(
        self,
        record: dict[str, Any],
        user_id: str,
        scene: str,
        audio: bytes = b"",
        audio_rate_hz: int = 0,
        mp4: bytes = b"",
        render: Renderer | None = None,
    ) -> str:
        """Archives one turn and returns the path of its main file ("" when the
        archive is off). A video still to be rendered appears at that path
        when its render is done; until then there is no file, never half of one."""
        if self.media == "off":
            return ""
        entry = await asyncio.to_thread(self.archive.entry, user_id, scene)
        if self.media == "record" or not (audio or mp4):
            return str(await self._finish(entry, record))
        if mp4:
            return str(await self._finish(entry, record, ("mp4", mp4)))
        wav = ("wav", wav_bytes(audio, audio_rate_hz))
        if self.media == "video" and render is not None:
            task = asyncio.create_task(
                self._render_later(entry, record, audio, audio_rate_hz, render, wav)
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return str(entry.path("mp4"))
        return str(await self._finish(entry, record, wav))

    async def _render_later(
        self,
        entry: ArchiveEntry,
        record: dict[str, Any],
        audio: bytes,
        audio_rate_hz: int,
        render: Renderer,
        fallback: tuple[str, bytes],
    ) -> None:
        async with self._renders:
            try:
                mp4 = await render(audio, audio_rate_hz)
            except Exception as error:  # the turn is over; keep its audio at least
                log.warning("archive render failed; keeping the audio", extra={"error": str(error)})
                record = {**record, "archive_note": f"video render failed: {error}"}
                await self._finish(entry, record, fallback)
                return
        await self._finish(entry, record, ("mp4", mp4))

    async def _finish(
        self, entry: ArchiveEntry, record: dict[str, Any], media: tuple[str, bytes] | None = None
    ) -> Path:
        return await asyncio.to_thread(self.archive.write_entry, entry, record, media)

    async def drain(self) -> None:
        """Waits for videos still rendering (on a graceful stop)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
