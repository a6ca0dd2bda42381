"""The animate engine: the avatar store and portrait checks, and the animator
that turns audio into frames behind one small Protocol: the embedded
portrait animator (a rig per avatar, kept), or Wav2Lip when a checkpoint is
configured. Wav2Lip and torch are imported only then (~4 s of imports)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from services.animate.animator import PortraitAnimator
from services.animate.avatars import AvatarRecord, AvatarStore
from services.animate.config import AnimateSettings
from services.animate.portrait import PortraitAnalyzer, PortraitLimits
from services.animate.visemes import Span

if TYPE_CHECKING:
    from services.animate.wav2lip import Wav2Lip

RIGS_KEPT = 16  # avatars whose animator rig stays in memory (~2-6 MB each)


class Animator(Protocol):
    """One stream's animation: 16 kHz audio in, frames out."""

    portrait: np.ndarray
    fps: float

    def frames_for(
        self, audio: np.ndarray, final: bool = False
    ) -> Iterator[tuple[int, np.ndarray, float]]:
        """(frame index, RGB frame, mouth openness) for every whole frame the
        audio so far covers (with `final`, also the last partial one)."""

    def add_spans(self, spans: list[Span]) -> None:
        """Phoneme timings for audio sent or about to be sent (an animator that
        reads the lips off the audio ignores them)."""


class AnimatorMaker(Protocol):
    def animator(self, record: AvatarRecord, portrait: np.ndarray, fps: int) -> Animator: ...

    def forget(self, avatar_id: str) -> None:
        """Drops what was kept for a deleted avatar."""


class PortraitRigs:
    """The embedded animator: the rig (mesh fields per shape, teeth) is built
    once per avatar and kept, so a new stream starts in microseconds."""

    def __init__(self) -> None:
        self._rigs: dict[tuple[str, tuple[int, ...]], PortraitAnimator] = {}

    def animator(self, record: AvatarRecord, portrait: np.ndarray, fps: int) -> Animator:
        key = (record.avatar_id, portrait.shape)
        rig = self._rigs.pop(key, None) or PortraitAnimator(portrait, record.landmarks, fps)
        self._rigs[key] = rig  # most recently used last
        while len(self._rigs) > RIGS_KEPT:
            self._rigs.pop(next(iter(self._rigs)))
        return rig.fresh(fps)

    def forget(self, avatar_id: str) -> None:
        for key in [k for k in self._rigs if k[0] == avatar_id]:
            self._rigs.pop(key, None)


class Wav2LipMaker:
    def __init__(self, model: Wav2Lip) -> None:
        self.model = model

    def animator(self, record: AvatarRecord, portrait: np.ndarray, fps: int) -> Animator:
        from services.animate.wav2lip import Wav2LipAnimator

        box = record.face_box
        return Wav2LipAnimator(self.model, portrait, (box[0], box[1], box[2], box[3]), fps)

    def forget(self, avatar_id: str) -> None:
        pass  # nothing is kept per avatar


class AnimateEngine:
    """What the avatars RPCs need, loaded once."""

    def __init__(self, settings: AnimateSettings) -> None:
        self.settings = settings
        self.store = AvatarStore(settings.avatars_dir)
        self.analyzer: PortraitAnalyzer | None = None
        self.maker: AnimatorMaker = PortraitRigs()

    def load(self) -> None:
        limits = PortraitLimits(
            max_yaw_deg=self.settings.max_yaw_deg,
            min_side_px=self.settings.min_side_px,
            min_face_px=self.settings.min_face_px,
            max_pixels=self.settings.max_pixels,
        )
        self.analyzer = PortraitAnalyzer(limits)
        self.store.load()
        if self.settings.wav2lip_checkpoint:
            from services.animate.wav2lip import load_wav2lip

            checkpoint = Path(self.settings.wav2lip_checkpoint).expanduser()
            self.maker = Wav2LipMaker(load_wav2lip(checkpoint))

    def animator(self, avatar_id: str, fps: int) -> Animator:
        record = self.store.get(avatar_id)
        portrait = self.store.portrait(record.avatar_id)
        # Even sides: H.264 with yuv420p needs them.
        height, width = portrait.shape[:2]
        portrait = np.ascontiguousarray(portrait[: height - height % 2, : width - width % 2])
        return self.maker.animator(record, portrait, fps)

    def delete(self, avatar_id: str) -> None:
        self.store.delete(avatar_id)
        self.maker.forget(avatar_id)
