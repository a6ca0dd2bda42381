"""The animator before visemes (kept for the bench's before/after comparison).

The embedded animator: a portrait that speaks, from the portrait alone.

Per video frame (25 fps by default) the audio level around the frame is
mapped to mouth openness (smoothed: quick to open, slower to close, so it does
not flicker); the jaw below the mouth line is pulled down by a smooth
displacement field, the upper lip lifts a little, and the opening is filled
with a dark cavity. Eyes blink at natural, irregular intervals, and the head
sways slightly, also while silent. Everything outside the mouth, eye and
sway fields is untouched. Plain numpy + OpenCV, a few ms a frame."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

SAMPLE_RATE_HZ = 16_000
QUIET_DB = -45.0  # at or below: mouth closed
LOUD_DB = -15.0  # at or above: mouth fully open
ATTACK = 0.65  # share of the way to a more open target taken per frame
RELEASE = 0.4  # ... and toward a more closed one
MAX_OPEN = 0.4  # jaw drop at full openness, as a share of mouth width
CAVITY_RGB = (52, 22, 26)
BLINK_PROFILE = (0.5, 1.0, 0.8, 0.3)  # eyelid closure over four frames


@dataclass(frozen=True)
class Face:
    landmarks: np.ndarray  # (68, 2) float

    @property
    def mouth_width(self) -> float:
        return float(np.linalg.norm(self.landmarks[54] - self.landmarks[48]))

    @property
    def mouth_center(self) -> np.ndarray:
        return self.landmarks[60:68].mean(axis=0)


def openness_track(audio: np.ndarray, frames: int, fps: float, state: float = 0.0) -> np.ndarray:
    """Mouth openness 0..1 for each frame of `audio` (16 kHz mono), smoothed."""
    hop = SAMPLE_RATE_HZ / fps
    window = int(hop * 2)
    values = np.zeros(frames, dtype=np.float32)
    for index in range(frames):
        center = int((index + 0.5) * hop)
        piece = audio[max(0, center - window // 2) : center + window // 2]
        rms = float(np.sqrt(np.mean(piece**2))) if len(piece) else 0.0
        level = 20 * np.log10(rms + 1e-9)
        target = float(np.clip((level - QUIET_DB) / (LOUD_DB - QUIET_DB), 0.0, 1.0))
        rate = ATTACK if target > state else RELEASE
        state += rate * (target - state)
        values[index] = state
    return values


class PortraitAnimator:
    def __init__(
        self, portrait: np.ndarray, landmarks: list[tuple[int, int]], fps: float, seed: int = 7
    ) -> None:
        self.portrait = portrait
        self.face = Face(np.asarray(landmarks, dtype=np.float32))
        self.fps = fps
        height, width = portrait.shape[:2]
        self.grid_x, self.grid_y = np.meshgrid(
            np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
        )
        self._rng = np.random.default_rng(seed)
        self._next_blink = self._blink_gap()
        self._blink_frame = -1
        self.frame_index = 0
        self._openness = 0.0
        self._pending = np.zeros(0, dtype=np.float32)
        self._jaw_field, self._lip_field = self._mouth_fields()

    def _blink_gap(self) -> int:
        return int(self._rng.uniform(2.5, 5.5) * self.fps)

    def _mouth_fields(self) -> tuple[np.ndarray, np.ndarray]:
        """Unit displacement fields: where the jaw and the upper lip move, and how much."""
        face = self.face
        cx, cy = face.mouth_center
        width = max(face.mouth_width, 8.0)
        chin_y = face.landmarks[8][1]
        across = np.exp(-(((self.grid_x - cx) / (0.8 * width)) ** 2))
        # The split runs just above the inner-lip line, so the whole lower lip rides on the jaw.
        below = self.grid_y - (cy - 0.03 * width)
        # The jaw moves as a block from the mouth line to the chin, fading out below it.
        jaw = np.where(
            below < 0,
            0.0,
            np.where(
                self.grid_y <= chin_y, 1.0, np.exp(-(((self.grid_y - chin_y) / (0.5 * width)) ** 2))
            ),
        )
        ramp = np.clip(below / (0.04 * width), 0.0, 1.0)  # no tear at the mouth line
        lip = np.exp(-(((cy - self.grid_y) / (0.25 * width)) ** 2)) * (below < 0)
        return (across * jaw * ramp).astype(np.float32), (across * lip).astype(np.float32)

    def frames_for(
        self, audio: np.ndarray, final: bool = False
    ) -> Iterator[tuple[int, np.ndarray, float]]:
        """Feeds 16 kHz audio; yields (frame index, RGB frame, openness) for every
        whole frame it covers (with `final`, also the last partial one)."""
        self._pending = np.concatenate([self._pending, audio]) if len(self._pending) else audio
        hop = SAMPLE_RATE_HZ / self.fps
        # One frame of look-ahead, so each frame's window is centered on it.
        ready = int((len(self._pending) - (0 if final else hop)) // hop)
        if final and len(self._pending) % hop:
            ready = int(np.ceil(len(self._pending) / hop))
        if ready <= 0:
            return
        track = openness_track(self._pending, ready, self.fps, self._openness)
        self._openness = float(track[-1])
        self._pending = self._pending[int(ready * hop) :]
        for openness in track:
            yield self.frame_index, self.render(float(openness)), float(openness)
            self.frame_index += 1

    def render(self, openness: float) -> np.ndarray:
        face = self.face
        width = face.mouth_width
        drop = MAX_OPEN * width * openness
        map_y = self.grid_y - drop * self._jaw_field + 0.15 * drop * self._lip_field
        map_x = self.grid_x
        map_x, map_y = self._blink(map_x, map_y)
        frame = cv2.remap(
            self.portrait, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        if drop > 1.0:
            inner = face.landmarks[60:68].copy()
            inner[[5, 7], 1] += 0.85 * drop  # lower inner lip (65, 66, 67) moves with the jaw
            inner[6, 1] += drop
            inner[[1, 2, 3], 1] -= 0.15 * drop
            inner[[0, 4], 1] += 0.2 * drop
            cv2.fillPoly(frame, [inner.round().astype(np.int32)], CAVITY_RGB, lineType=cv2.LINE_AA)
        return self._sway(frame)

    def _blink(self, map_x: np.ndarray, map_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._blink_frame < 0 and self.frame_index >= self._next_blink:
            self._blink_frame = 0
        if self._blink_frame < 0:
            return map_x, map_y
        closure = BLINK_PROFILE[self._blink_frame]
        self._blink_frame += 1
        if self._blink_frame >= len(BLINK_PROFILE):
            self._blink_frame = -1
            self._next_blink = self.frame_index + self._blink_gap()
        map_y = map_y.copy()
        for start in (36, 42):
            eye = self.face.landmarks[start : start + 6]
            (x0, y0), (x1, y1) = eye.min(axis=0), eye.max(axis=0)
            cy, half_h = (y0 + y1) / 2, max(3.0, (y1 - y0) * 1.6)
            pad = (x1 - x0) * 0.25
            region = (
                (self.grid_x > x0 - pad)
                & (self.grid_x < x1 + pad)
                & (np.abs(self.grid_y - cy) < half_h)
            )
            # Sampling from farther above and below the eye's center line draws the lids over it.
            stretch = 1 + 2.5 * closure * (1 - np.abs(self.grid_y - cy) / half_h)
            map_y = np.where(region, cy + (self.grid_y - cy) * stretch, map_y)
        return map_x, map_y

    def _sway(self, frame: np.ndarray) -> np.ndarray:
        t = self.frame_index / self.fps
        angle = 0.8 * np.sin(2 * np.pi * t / 4.1)
        dx = 1.5 * np.sin(2 * np.pi * t / 3.3)
        dy = 1.0 * np.sin(2 * np.pi * t / 5.2)
        cx, cy = self.face.landmarks[30]
        matrix = cv2.getRotationMatrix2D((float(cx), float(cy)), float(angle), 1.0)
        matrix[:, 2] += (dx, dy)
        height, width = frame.shape[:2]
        return cv2.warpAffine(frame, matrix, (width, height), borderMode=cv2.BORDER_REPLICATE)
