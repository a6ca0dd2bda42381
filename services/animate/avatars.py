"""Avatars on disk: the portrait (PNG) and what was computed from it once
(face box, 68 landmarks, mouth region, checks), each avatar in its own folder,
written under a temp name and renamed so a crash never leaves half of one."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from services.animate.portrait import Check, PortraitReport
from services.common.cache_files import remove_stale_partials
from services.common.errors import InvalidInput, NotFound

_VALID_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class AvatarRecord:
    avatar_id: str
    display_name: str
    width: int
    height: int
    created: float
    face_box: tuple[int, int, int, int]
    landmarks: list[tuple[int, int]]
    mouth_box: tuple[int, int, int, int]  # x, y, w, h around landmarks 48-67, with a margin
    checks: list[dict[str, object]]

    def check_objects(self) -> list[Check]:
        return [Check(**c) for c in self.checks]  # type: ignore[arg-type]


def mouth_box(
    landmarks: list[tuple[int, int]], width: int, height: int
) -> tuple[int, int, int, int]:
    mouth = np.array(landmarks[48:68])
    x0, y0 = mouth.min(axis=0)
    x1, y1 = mouth.max(axis=0)
    margin_x, margin_y = (x1 - x0) // 3, (y1 - y0)
    x0, y0 = max(0, x0 - margin_x), max(0, y0 - margin_y)
    x1, y1 = min(width, x1 + margin_x), min(height, y1 + margin_y)
    return int(x0), int(y0), int(x1 - x0), int(y1 - y0)


class AvatarStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._records: dict[str, AvatarRecord] = {}

    def load(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.folder)
        for meta in sorted(self.folder.glob("*/avatar.json")):
            try:
                record = AvatarRecord(**json.loads(meta.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError):
                continue  # a damaged avatar is skipped, never fatal
            self._records[record.avatar_id] = record

    def add(self, rgb: np.ndarray, display_name: str, report: PortraitReport) -> AvatarRecord:
        assert report.face_box is not None
        record = AvatarRecord(
            avatar_id=f"avatar-{uuid.uuid4().hex[:12]}",
            display_name=display_name,
            width=report.width,
            height=report.height,
            created=time.time(),
            face_box=report.face_box,
            landmarks=report.landmarks,
            mouth_box=mouth_box(report.landmarks, report.width, report.height),
            checks=[asdict(c) for c in report.checks],
        )
        partial = self.folder / f"{record.avatar_id}.partial-{os.getpid()}"
        partial.mkdir(parents=True)
        Image.fromarray(rgb).save(partial / "portrait.png")
        (partial / "avatar.json").write_text(json.dumps(asdict(record)), encoding="utf-8")
        partial.rename(self.folder / record.avatar_id)
        with self._lock:
            self._records[record.avatar_id] = record
        return record

    def get(self, avatar_id: str) -> AvatarRecord:
        if not _VALID_ID.match(avatar_id):
            raise InvalidInput(
                f"avatar_id {avatar_id[:80]!r} is not valid: 1 to 64 letters, digits, '-' or '_'."
            )
        record = self._records.get(avatar_id)
        if record is None:
            raise NotFound(f"No avatar {avatar_id!r}.")
        return record

    def all(self) -> list[AvatarRecord]:
        return sorted(self._records.values(), key=lambda r: r.created)

    def portrait(self, avatar_id: str) -> np.ndarray:
        with Image.open(self.folder / self.get(avatar_id).avatar_id / "portrait.png") as image:
            return np.asarray(image.convert("RGB"))

    def delete(self, avatar_id: str) -> None:
        record = self.get(avatar_id)
        with self._lock:
            self._records.pop(record.avatar_id, None)
        shutil.rmtree(self.folder / record.avatar_id, ignore_errors=True)
