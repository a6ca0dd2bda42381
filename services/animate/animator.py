"""The embedded animator: a portrait that speaks, from the portrait alone.

Each video frame (25 fps by default) is a blend of seven mouth shapes
(services/animate/visemes.py): from the synthesizer's phoneme timings when
they come with the audio, from the audio itself otherwise; the loudness of
the frame scales how far the open shapes open.

Per avatar, once: a triangle mesh over the 68 landmarks plus anchor points
(cheeks, under the chin, the border of the lower-face region) is moved into
each shape (lips part, stretch, round and press; the jaw and chin follow the
lower lip; cheeks follow the mouth corners a little; the anchors at the
border stay, so the warp fades to nothing with no seam), and the
piecewise-affine backward map of each shape is kept as a displacement
field. Per frame: the fields are blended with the shape weights (plus blink
and eyebrow fields), one cv2.remap of the face region, then the mouth
opening is painted between the two inner-lip curves with analytic
anti-aliasing: upper teeth under the upper lip (the portrait's own when it
shows them, otherwise drawn and shaded to the face's light), a cavity darker
toward the back and the corners, a hint of tongue and lower teeth when wide
open. The head sways, nods on stressed syllables and lifts its eyebrows;
eyes blink at irregular intervals. Plain numpy + OpenCV, a few ms a frame."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import cv2
import numpy as np
from scipy.spatial import Delaunay

from services.animate import visemes as vz
from services.animate.visemes import SAMPLE_RATE_HZ, Estimator, Span

__all__ = ["SAMPLE_RATE_HZ", "SHAPES", "PortraitAnimator", "ShapeSpec"]

BLINK_PROFILE = (0.5, 1.0, 0.8, 0.3)  # eyelid closure over four frames
IDLE_AFTER_S = 0.8  # silence after which the mouth eases back to the portrait's own


@dataclass(frozen=True)
class ShapeSpec:
    """A mouth shape, in shares of the mouth width W."""

    gap: float | None  # inner-lip gap at the center; None keeps the portrait's own
    upper_share: float = 0.3  # share of an opening carried by the upper lip
    width: float = 0.0  # change of mouth width
    pucker: float = 0.0  # lips pushed out (thicker, rounder)
    press: float = 0.0  # lips pressed together (thinner)
    flat: float = 0.5  # how far the opening stays open toward the corners (0 round .. 1 slit)
    tuck: float = 0.0  # lower lip drawn up under the upper teeth (f/v)


SHAPES: dict[int, ShapeSpec] = {
    # Lips resting together (not pressed); a portrait that shows its teeth
    # shows them again as soon as the mouth opens (its own teeth are kept).
    vz.REST: ShapeSpec(gap=0.0),
    # Pressed: the inner lips overlap a little, so no sliver of the inside shows.
    vz.CLOSED: ShapeSpec(gap=-0.03),
    vz.OPEN: ShapeSpec(gap=0.46, upper_share=0.15, width=-0.03, flat=0.45),
    # Spread and rounded lips differ in width by more than half (measured by
    # dlib on the frames, blended with their neighbours, O/U/W comes out at
    # ~0.85 of E/I).
    vz.WIDE: ShapeSpec(gap=0.24, upper_share=0.35, width=0.24, flat=0.85),
    vz.ROUND: ShapeSpec(gap=0.25, upper_share=0.35, width=-0.48, pucker=0.04, flat=0.0),
    vz.FV: ShapeSpec(gap=0.10, upper_share=0.8, tuck=0.05, flat=0.8),
    vz.MID: ShapeSpec(gap=0.30, upper_share=0.25, width=0.0, flat=0.55),
}
OPENING_SHAPES = (vz.OPEN, vz.WIDE, vz.ROUND, vz.MID, vz.FV)
# Two shapes of the rig only: round and spread lips with no opening. Loudness
# scales how far the mouth opens, not how the lips round or spread, so a quiet
# o/u/w (or e/i) keeps its narrow (or wide) lips and only closes the opening.
ROUND_SHUT, WIDE_SHUT = vz.COUNT, vz.COUNT + 1
SHUT_OF = {vz.ROUND: ROUND_SHUT, vz.WIDE: WIDE_SHUT}
RIG_SHAPES = vz.COUNT + 2

# Inner-lip pairs (upper, lower) with their place across the mouth (-1..1).
PAIRS = ((61, 67, -0.5), (62, 66, 0.0), (63, 65, 0.5))
JAW_SHARE = {
    8: 1.0,
    7: 0.95,
    9: 0.95,
    6: 0.8,
    10: 0.8,
    5: 0.55,
    11: 0.55,
    4: 0.3,
    12: 0.3,
    3: 0.1,
    13: 0.1,
}


def _smooth_curve(xs: np.ndarray, ys: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The polynomial through five lip points (smooth, no corners), evaluated at `at`."""
    scale = max(float(np.ptp(xs)), 1.0)
    coeffs = np.polyfit(xs / scale, ys, min(4, len(xs) - 1))
    return np.polyval(coeffs, at / scale)


class PortraitAnimator:
    def __init__(
        self, portrait: np.ndarray, landmarks: list[tuple[int, int]], fps: float, seed: int = 7
    ) -> None:
        self.portrait = portrait
        self.landmarks = np.asarray(landmarks, dtype=np.float64)
        self._rig()
        self._start(fps, seed)

    def _start(self, fps: float, seed: int) -> None:
        """The state of one stream (the rig is shared between streams)."""
        self.fps = fps
        self._rng = np.random.default_rng(seed)
        self._next_blink = self._blink_gap()
        self._blink_frame = -1
        self.frame_index = 0
        self._pending = np.zeros(0, dtype=np.float32)
        self._pending_start = 0  # stream sample index of self._pending[0]
        self._received = 0
        self._estimator = Estimator(fps)
        self._spans: list[Span] = []
        self._stress_events: list[int] = []
        self._quiet_frames = 0

    def fresh(self, fps: float, seed: int = 7) -> PortraitAnimator:
        """A new stream on the same avatar: shares this one's rig (the per-avatar
        fields and textures, read only), so it starts in microseconds."""
        other = copy.copy(self)
        other._start(fps, seed)
        return other

    # --- per avatar -------------------------------------------------------------

    def _rig(self) -> None:
        lm = self.landmarks
        height, width = self.portrait.shape[:2]
        self.ex = (lm[54] - lm[48]) / np.linalg.norm(lm[54] - lm[48])
        self.ey = np.array([-self.ex[1], self.ex[0]])
        self.W = float(np.linalg.norm(lm[54] - lm[48]))
        self.center = lm[60:68].mean(axis=0)
        self.face_h = float(np.linalg.norm(lm[8] - lm[27]))
        W = self.W
        # The face region the fields live in: brows to below the chin.
        x0 = max(0, int(lm[:, 0].min() - 0.7 * W))
        x1 = min(width, int(lm[:, 0].max() + 0.7 * W) + 1)
        y0 = max(0, int(lm[17:27, 1].min() - 0.6 * W))
        y1 = min(height, int(lm[8, 1] + 1.1 * W) + 1)
        self.roi = (x0, y0, x1, y1)
        gx, gy = np.meshgrid(
            np.arange(x0, x1, dtype=np.float32), np.arange(y0, y1, dtype=np.float32)
        )
        self.grid_x, self.grid_y = gx, gy

        local = self._to_mouth(lm)
        self.source_gaps = np.array([local[lo, 1] - local[up, 1] for up, lo, _ in PAIRS])
        anchors, anchor_rules = self._anchors()
        points = np.vstack([lm, anchors])
        triangles = Delaunay(points).simplices
        self.shape_landmarks: dict[int, np.ndarray] = {}
        fields = []
        specs = [SHAPES[shape] for shape in range(vz.COUNT)]
        specs += [replace(SHAPES[vz.ROUND], gap=0.0), replace(SHAPES[vz.WIDE], gap=0.0)]
        for shape, spec in enumerate(specs):
            target = self._shape_landmarks(spec)
            self.shape_landmarks[shape] = target
            moved = target - lm
            anchor_moves = np.array([rule(moved) for rule in anchor_rules])
            fields.append(
                self._backward_field(points + np.vstack([moved, anchor_moves]), points, triangles)
            )
        self.fields = np.stack(fields).astype(np.float32)  # (shapes, 2, h, w)
        self.blink_field = self._blink_field()
        self.brow_field = self._brow_field()
        self._mouth_box()
        self._colors()

    def _to_mouth(self, points: np.ndarray) -> np.ndarray:
        rel = points - self.center
        return np.stack([rel @ self.ex, rel @ self.ey], axis=-1)

    def _from_mouth(self, local: np.ndarray) -> np.ndarray:
        return self.center + local[..., :1] * self.ex + local[..., 1:] * self.ey

    def _shape_landmarks(self, spec: ShapeSpec) -> np.ndarray:
        lm = self.landmarks
        if spec.gap is None:
            return lm.copy()
        W = self.W
        local = self._to_mouth(lm).copy()
        before = local.copy()
        # Inner lips: the gap at each pair becomes the shape's, narrower toward the corners.
        for (up, lo, place), source_gap in zip(PAIRS, self.source_gaps, strict=True):
            profile = spec.flat + (1 - spec.flat) * (1 - place**2)
            change = spec.gap * W * profile - source_gap
            share = spec.upper_share if change > 0 else 0.5
            local[up, 1] -= share * change
            local[lo, 1] += (1 - share) * change
        # Outer lips follow the inner ones; their middles more than their ends.
        follow = {50: (61, 0.8), 51: (62, 0.85), 52: (63, 0.8), 49: (61, 0.4), 53: (63, 0.4)}
        follow |= {58: (67, 1.0), 57: (66, 1.0), 56: (65, 1.0), 59: (67, 0.6), 55: (65, 0.6)}
        for outer, (inner, share) in follow.items():
            local[outer, 1] += share * (local[inner, 1] - before[inner, 1])
        # Pucker pushes the lips' outer edges out, press pulls them in, tuck rolls the lower lip up.
        for outer in (49, 50, 51, 52, 53):
            local[outer, 1] -= (spec.pucker - spec.press) * W
        for outer in (55, 56, 57, 58, 59):
            local[outer, 1] += (spec.pucker - spec.press - spec.tuck) * W
        # Width: the corners move out or in, the rest of the lips scale with them.
        lips = list(range(48, 68))
        scale = 1 + spec.width * np.where(np.isin(lips, (48, 54, 60, 64)), 1.0, 0.8)
        local[lips, 0] *= scale
        # The jaw rides with the lower lip (only down: a closing lip does not lift the chin).
        drop = max(0.0, local[66, 1] - before[66, 1]) * 0.9
        for point, share in JAW_SHARE.items():
            local[point, 1] += share * drop
        # The lower lip's outer edge rides with the jaw too.
        moved = self._from_mouth(local)
        target = lm.copy()
        target[list(JAW_SHARE) + lips] = moved[list(JAW_SHARE) + lips]
        return target

    def _anchors(self) -> tuple[np.ndarray, list[Callable[[np.ndarray], np.ndarray]]]:
        """Extra mesh points with rules for how they move given the landmark moves."""
        lm = self.landmarks
        W = self.W
        x0, y0, x1, y1 = self.roi
        anchors: list[np.ndarray] = []
        rules: list[Callable[[np.ndarray], np.ndarray]] = []

        def add(point: object, rule: Callable[[np.ndarray], np.ndarray]) -> None:
            anchors.append(np.asarray(point, dtype=np.float64))
            rules.append(rule)

        def still(moved: np.ndarray) -> np.ndarray:
            return np.zeros(2)

        # Cheeks: between the mouth corner and the jaw, beside the nose, and out
        # from the corner; they follow the corner (and the jaw) a little.
        def follow(
            corner: int, share: float, jaw: int = 8, jaw_share: float = 0.0
        ) -> Callable[[np.ndarray], np.ndarray]:
            def rule(moved: np.ndarray) -> np.ndarray:
                return np.asarray(share * moved[corner] + jaw_share * moved[jaw])

            return rule

        for corner, jaw, nose in ((48, 4, 31), (54, 12, 35)):
            add((lm[corner] + lm[jaw]) / 2, follow(corner, 0.35, jaw, 0.25))
            add((lm[corner] + lm[nose]) / 2, follow(corner, 0.25))
            add(lm[corner] + (lm[corner] - self.center) * 0.6, follow(corner, 0.45))
        # Under the chin: the neck stays.
        for point in (5, 8, 11):
            add(lm[point] + self.ey * 0.7 * W, still)
        # The region's border: nothing moves there.
        for fx in np.linspace(0, 1, 5):
            add((x0 + fx * (x1 - 1 - x0), y0), still)
            add((x0 + fx * (x1 - 1 - x0), y1 - 1), still)
        for fy in np.linspace(0.25, 0.75, 3):
            add((x0, y0 + fy * (y1 - 1 - y0)), still)
            add((x1 - 1, y0 + fy * (y1 - 1 - y0)), still)
        return np.array(anchors), rules

    def _backward_field(
        self, target: np.ndarray, source: np.ndarray, triangles: np.ndarray
    ) -> np.ndarray:
        """(2, h, w): for each pixel of the region in the shape, where to sample
        the portrait, minus the pixel's own position; piecewise affine over the
        mesh, then softened a little so triangle edges leave no creases."""
        x0, y0, x1, y1 = self.roi
        ids = np.full((y1 - y0, x1 - x0), -1, dtype=np.int32)
        affines = np.zeros((len(triangles), 2, 3), dtype=np.float64)
        offset = np.array([x0, y0])
        for number, tri in enumerate(triangles):
            if np.all((tri >= 60) & (tri < 68)):
                continue  # the mouth's inside: painted, never warped (lips may overlap there)
            dst = target[tri]
            area = np.cross(dst[1] - dst[0], dst[2] - dst[0])
            if abs(area) < 1e-6:
                continue
            affines[number] = cv2.getAffineTransform(
                dst.astype(np.float32), source[tri].astype(np.float32)
            )
            cv2.fillConvexPoly(ids, np.round((dst - offset) * 16).astype(np.int32), number, shift=4)
        covered = ids >= 0
        safe = np.where(covered, ids, 0)
        a = affines[safe]
        gx, gy = self.grid_x.astype(np.float64), self.grid_y.astype(np.float64)
        sx = a[..., 0, 0] * gx + a[..., 0, 1] * gy + a[..., 0, 2]
        sy = a[..., 1, 0] * gx + a[..., 1, 1] * gy + a[..., 1, 2]
        field = np.stack([np.where(covered, sx - gx, 0.0), np.where(covered, sy - gy, 0.0)])
        sigma = max(0.8, 0.02 * self.W)
        blurred = np.stack([cv2.GaussianBlur(f.astype(np.float32), (0, 0), sigma) for f in field])
        # Not on the lips: there the field jumps between the upper and the lower
        # lip, and softening it would sample the mouth's inside along a closed seam.
        local = self._to_mouth(np.stack([self.grid_x, self.grid_y], axis=-1).astype(np.float64))
        lips = np.exp(
            -((local[..., 0] / (0.6 * self.W)) ** 4 + (local[..., 1] / (0.3 * self.W)) ** 4)
        )
        return (lips * field + (1 - lips) * blurred).astype(np.float32)

    def _blink_field(self) -> np.ndarray:
        """Vertical field that draws the lids over each eye at closure 1."""
        field = np.zeros((2, *self.grid_x.shape), dtype=np.float32)
        for start in (36, 42):
            eye = self.landmarks[start : start + 6]
            (ex0, ey0), (ex1, ey1) = eye.min(axis=0), eye.max(axis=0)
            cx, cy = (ex0 + ex1) / 2, (ey0 + ey1) / 2
            half_h = max(3.0, (ey1 - ey0) * 1.6)
            half_w = (ex1 - ex0) * 0.75
            across = np.clip(1 - ((self.grid_x - cx) / half_w) ** 4, 0, 1)
            dy = self.grid_y - cy
            inside = np.clip(1 - np.abs(dy) / half_h, 0, 1)
            field[1] += 2.5 * dy * inside * across
        return field

    def _brow_field(self) -> np.ndarray:
        """Field lifting the eyebrows by one pixel (smoothly fading into the
        forehead and the upper lids)."""
        brows = self.landmarks[17:27]
        cy = brows[:, 1].mean()
        spread = max(4.0, self.landmarks[36:48, 1].mean() - cy)
        left, right = brows[:, 0].min(), brows[:, 0].max()
        span = (right - left) / 2 + spread
        across = np.exp(-(((self.grid_x - (left + right) / 2) / span) ** 6))
        down = np.exp(-(((self.grid_y - cy) / spread) ** 2))
        field = np.zeros((2, *self.grid_x.shape), dtype=np.float32)
        field[1] = across * down  # sample from below: the brow moves up
        return field

    def _mouth_box(self) -> None:
        every = np.vstack([s[60:68] for s in self.shape_landmarks.values()])
        pad = 3
        height, width = self.portrait.shape[:2]
        bx0 = max(0, int(every[:, 0].min()) - pad)
        bx1 = min(width, int(every[:, 0].max()) + pad + 1)
        by0 = max(0, int(every[:, 1].min()) - pad)
        by1 = min(height, int(every[:, 1].max()) + pad + 1)
        self.box = (bx0, by0, bx1, by1)
        bx, by = np.meshgrid(
            np.arange(bx0, bx1, dtype=np.float64), np.arange(by0, by1, dtype=np.float64)
        )
        local = self._to_mouth(np.stack([bx, by], axis=-1))
        self.box_x, self.box_y = local[..., 0], local[..., 1]

    def _colors(self) -> None:
        """Lip, skin and teeth colours from the portrait; the teeth strip."""
        lm = self.landmarks
        img = self.portrait.astype(np.float32)
        mask = np.zeros(self.portrait.shape[:2], np.uint8)
        cv2.fillPoly(mask, [lm[48:60].round().astype(np.int32)], 1)
        cv2.fillPoly(mask, [lm[60:68].round().astype(np.int32)], 0)
        self.lip_rgb = np.median(img[mask > 0], axis=0) if mask.any() else np.array([150, 80, 80.0])
        lower = np.zeros_like(mask)
        cv2.fillPoly(
            lower,
            [lm[[54, 55, 56, 57, 58, 59, 48, 60, 67, 66, 65, 64]].round().astype(np.int32)],
            1,
        )
        self.lower_lip_rgb = np.median(img[lower > 0], axis=0) if lower.any() else self.lip_rgb
        cheek = mask * 0
        for a, b in ((31, 3), (35, 13)):
            p = ((lm[a] + lm[b]) / 2).round().astype(int)
            cv2.circle(cheek, (int(p[0]), int(p[1])), max(2, int(self.W * 0.12)), 1, -1)
        self.skin_rgb = (
            np.median(img[cheek > 0], axis=0) if cheek.any() else np.array([180, 140, 120.0])
        )
        W = self.W
        center_gap = float(self.source_gaps[1])
        inner = np.zeros(self.portrait.shape[:2], np.uint8)
        cv2.fillPoly(inner, [lm[60:68].round().astype(np.int32)], 1)
        brightness = float(img[inner > 0].mean()) if inner.sum() > 4 else 0.0
        self.own_teeth = center_gap > 0.06 * W and brightness > 0.7 * float(self.skin_rgb.mean())
        self.teeth_columns = 64
        if self.own_teeth:
            self.teeth_h = 0.85 * center_gap
            self.teeth_strip = self._own_teeth_strip()
        else:
            self.teeth_h = 0.11 * W
            self.teeth_strip = self._drawn_teeth_strip()
        bright = self.teeth_strip.reshape(-1, 3)
        self.teeth_rgb = np.percentile(bright, 80, axis=0)

    def _own_teeth_strip(self) -> np.ndarray:
        """The portrait's teeth, unrolled: columns across the mouth, rows down
        from the upper inner lip."""
        local = self._to_mouth(self.landmarks)
        upper = local[[60, 61, 62, 63, 64]]
        rows = int(np.ceil(self.teeth_h)) + 2
        xs = np.linspace(upper[0, 0], upper[-1, 0], self.teeth_columns)
        top = _smooth_curve(upper[:, 0], upper[:, 1], xs)
        vs = np.arange(rows, dtype=np.float64) + 0.5
        lx = np.repeat(xs[None, :], rows, axis=0)
        ly = top[None, :] + vs[:, None]
        where = self._from_mouth(np.stack([lx, ly], axis=-1)).astype(np.float32)
        return cv2.remap(
            self.portrait,
            where[..., 0],
            where[..., 1],
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        ).astype(np.float32)

    def _drawn_teeth_strip(self) -> np.ndarray:
        """Teeth drawn to the face's light: off-white, gaps between the teeth,
        a rounded lower edge per tooth, a shadow under the lip."""
        rows = int(np.ceil(self.teeth_h)) + 2
        u = np.linspace(-1, 1, self.teeth_columns)[None, :]
        v = (np.arange(rows)[:, None] + 0.5) / self.teeth_h
        light = float(np.clip(self.skin_rgb.mean() / 150.0, 0.45, 1.0))
        # Teeth take the light's colour: half a warm white, half the skin's hue at that brightness.
        hue = self.skin_rgb / max(float(self.skin_rgb.max()), 1.0) * 235.0
        base = (0.5 * np.array([235.0, 228.0, 210.0]) + 0.5 * hue) * light
        edges = np.array([0.0, 0.24, 0.44, 0.6, 0.74, 0.86])
        distance = np.min(np.abs(np.abs(u[..., None]) - edges), axis=-1)
        gap = 1 - 0.35 * np.exp(-((distance * self.W / 2 / 0.7) ** 2))
        # Each tooth's tip is a little shorter at its sides.
        within = np.clip(distance / 0.1, 0, 1)
        length = 1.0 - 0.12 * (1 - within)
        tip = np.clip((length - v) * self.teeth_h + 0.5, 0, 1)
        shade = (0.72 + 0.28 * np.clip(v * 2.5, 0, 1)) * gap
        strip = base * shade[..., None]
        cavity = self.lip_rgb * 0.18
        return (strip * tip[..., None] + cavity * (1 - tip[..., None])).astype(np.float32)

    # --- per frame --------------------------------------------------------------

    def _blink_gap(self) -> int:
        return int(self._rng.uniform(2.5, 5.5) * self.fps)

    def add_spans(self, spans: list[Span]) -> None:
        """Phoneme timings (seconds from the start of this stream's audio) for
        audio sent or about to be sent."""
        self._spans.extend(spans)
        self._spans.sort(key=lambda s: s.start_s)

    def _weights(self, index: int, piece: np.ndarray, own: np.ndarray) -> tuple[np.ndarray, float]:
        center = (index + 0.5) / self.fps
        # How far the mouth opens follows the level of the audio this frame shows.
        level = vz.level_db(own if len(own) else piece)
        if self._spans and center <= self._spans[-1].end_s + 0.5 / self.fps:
            weights = vz.weights_at(self._spans, index, self.fps)
            # Keep the estimator's level tracking in step for frames past the timings.
            self._estimator.frame(piece, own)
            amount = vz.loudness(level)
            if any(s.stressed and int(s.start_s * self.fps) == index for s in self._spans):
                self._stress_events.append(index)
        else:
            weights, _ = self._estimator.frame(piece, own)
            amount = vz.loudness(level)
            if (
                weights[vz.OPEN] > 0.5
                and vz.loudness(level) > 0.85
                and (not self._stress_events or index - self._stress_events[-1] > 12)
            ):
                self._stress_events.append(index)
        weights = np.concatenate([weights, np.zeros(RIG_SHAPES - vz.COUNT, weights.dtype)])
        # Quiet frames open less: the open shapes give part of their weight to
        # rest (round and wide to their shut forms: the lips keep their shape).
        for shape in OPENING_SHAPES:
            share = (1 - amount) * weights[shape]
            weights[shape] -= share
            weights[SHUT_OF.get(shape, vz.REST)] += share
        return weights, level

    def frames_for(
        self, audio: np.ndarray, final: bool = False
    ) -> Iterator[tuple[int, np.ndarray, float]]:
        """Feeds 16 kHz audio; yields (frame index, RGB frame, lip gap / mouth width)
        for every whole frame it covers (with `final`, also the last partial one)."""
        self._pending = np.concatenate([self._pending, audio]) if len(self._pending) else audio
        self._received += len(audio)
        hop = SAMPLE_RATE_HZ / self.fps
        # Frame i looks at [i - 0.5, i + 1.5) frames of audio: its own frame
        # centered, so at most one frame of look-ahead past its end.
        while True:
            index = self.frame_index
            if index * hop >= self._received:
                break
            end = round((index + 1.5) * hop)
            if end > self._received and not final:
                break
            start = max(0, round((index - 0.5) * hop))
            piece = self._pending[start - self._pending_start : end - self._pending_start]
            own_from = round(index * hop) - self._pending_start
            own = self._pending[own_from : own_from + round(hop)]
            weights, level = self._weights(index, piece, own)
            # Listening: after IDLE_AFTER_S of silence the mouth eases back to the
            # portrait's own (a smile with teeth keeps them); speech takes it back at once.
            quiet = level < vz.QUIET_DB and weights[vz.REST] > 0.99
            self._quiet_frames = self._quiet_frames + 1 if quiet else 0
            idle = float(np.clip((self._quiet_frames / self.fps - IDLE_AFTER_S) / 0.4, 0.0, 1.0))
            frame, gap = self.render(weights, idle)
            yield index, frame, gap
            self.frame_index += 1
            keep = max(0, round((self.frame_index - 0.5) * hop))
            if keep > self._pending_start:
                self._pending = self._pending[keep - self._pending_start :]
                self._pending_start = keep

    def render(self, weights: np.ndarray, idle: float = 0.0) -> tuple[np.ndarray, float]:
        """The frame for shape weights (sum 1) and `idle`, how far the mouth has
        gone back to the portrait's own (0..1, after a while of silence);
        returns (RGB frame, lip gap / mouth width)."""
        if len(weights) < RIG_SHAPES:  # the viseme weights alone: no shut forms
            weights = np.pad(weights, (0, RIG_SHAPES - len(weights)))
        frame = self.portrait.copy()
        x0, y0, x1, y1 = self.roi
        field = np.zeros_like(self.fields[0])
        for shape in range(RIG_SHAPES):
            if weights[shape] > 1e-3:
                field += weights[shape] * self.fields[shape]
        if idle > 0:
            field *= 1 - idle  # the portrait's own mouth is no warp at all
        closure = self._blink_closure()
        if closure > 0:
            field += closure * self.blink_field
        brow = self._brow_lift()
        if brow > 0:
            field += brow * self.brow_field
        frame[y0:y1, x0:x1] = cv2.remap(
            self.portrait,
            self.grid_x + field[0],
            self.grid_y + field[1],
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        inner = sum(weights[s] * self.shape_landmarks[s][60:68] for s in range(RIG_SHAPES))
        inner = (1 - idle) * np.asarray(inner) + idle * self.landmarks[60:68]
        gap = self._paint_mouth(frame, np.asarray(inner), weights, idle)
        return self._head_motion(frame), gap

    def _paint_mouth(
        self, frame: np.ndarray, inner: np.ndarray, weights: np.ndarray, idle: float = 0.0
    ) -> float:
        local = self._to_mouth(inner)
        upper = local[[0, 1, 2, 3, 4]]
        lower = local[[4, 5, 6, 7, 0]]
        gap_center = float(lower[2, 1] - upper[2, 1])
        bx, by = self.box_x, self.box_y
        top = _smooth_curve(upper[:, 0], upper[:, 1], bx)
        bottom = _smooth_curve(lower[:, 0], lower[:, 1], bx)
        left, right = float(upper[0, 0]), float(upper[4, 0])
        # Analytic coverage: half a pixel of ramp at every edge, so no jaggies.
        alpha = (
            np.clip(by - top + 0.5, 0, 1)
            * np.clip(bottom - by + 0.5, 0, 1)
            * np.clip(bx - left + 0.5, 0, 1)
            * np.clip(right - bx + 0.5, 0, 1)
            * np.clip(bottom - top, 0, 1)  # lips that meet show no inside, not even a sliver
        )
        height = np.maximum(bottom - top, 1e-3)
        v = by - top
        u = np.clip((bx - (left + right) / 2) / max((right - left) / 2, 1.0), -1, 1)
        depth = np.clip(v / height, 0, 1)
        # The cavity: dark, darkest at the back (the middle of the opening) and in the corners.
        edge = np.abs(2 * depth - 1) ** 1.5
        cavity_shade = (
            (1 - 0.6 * u**2)
            * (0.35 + 0.65 * edge)
            * (0.7 + 0.3 * np.clip(height / (0.3 * self.W), 0, 1))
        )
        color = (self.lip_rgb * np.array([0.36, 0.22, 0.22]))[None, None, :] * cavity_shade[
            ..., None
        ]
        # Tongue: a rounded hump at the bottom when the mouth is well open.
        show_tongue = np.clip((height / self.W - 0.12) / 0.1, 0, 1)
        tongue_top = 0.6 + 0.3 * u**2
        tongue = np.clip((depth - tongue_top) * height / 1.5, 0, 1) * show_tongue
        tongue_rgb = (
            self.lip_rgb
            * np.array([0.8, 0.5, 0.5])
            * (0.55 + 0.3 * (1 - u**2))[..., None]
            * (0.55 + 0.45 * depth[..., None])
        )
        color = color * (1 - tongue[..., None]) + tongue_rgb * tongue[..., None]
        # Lower teeth: a hint above the lower lip on wide and open vowels.
        lower_amount = float(np.clip(weights[vz.WIDE] + 0.5 * weights[vz.OPEN], 0, 1))
        if lower_amount > 0.05:
            band = 0.05 * self.W
            lower_teeth = np.clip((v - (height - band)) + 0.5, 0, 1) * np.clip(
                1 - np.abs(u) / 0.65, 0, 1
            )
            lower_rgb = self.teeth_rgb * 0.72
            mix = (lower_amount * 0.8 * lower_teeth)[..., None]
            color = color * (1 - mix) + lower_rgb * mix
        # Upper teeth under the upper lip, from the strip (own or drawn).
        teeth_len = self.teeth_h * (1 - 0.35 * u**2)
        cover = np.clip(teeth_len - v + 0.5, 0, 1) * np.clip(1.15 - np.abs(u), 0, 1)
        strip = cv2.remap(
            self.teeth_strip,
            ((u + 1) / 2 * (self.teeth_columns - 1)).astype(np.float32),
            np.clip(v - 0.5, 0, self.teeth_strip.shape[0] - 1).astype(np.float32),
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        teeth_shade = (1 - 0.45 * u**2) * (0.8 + 0.2 * np.clip(v / 2.0, 0, 1))
        strip = strip * teeth_shade[..., None]
        color = color * (1 - cover[..., None]) + strip * cover[..., None]
        # Where the lips meet or nearly meet, the contact line: a soft darker
        # lip-coloured seam (it also hides what the warp squeezed there).
        middle = (top + bottom) / 2
        near = np.clip(1 - (bottom - top) / 2.0, 0, 1)
        seam = (
            np.exp(-(((by - middle) / 1.1) ** 2))
            * near
            * np.clip(bx - left + 0.5, 0, 1)
            * np.clip(right - bx + 0.5, 0, 1)
        )
        seam_rgb = self.lip_rgb * 0.8
        if self.own_teeth:
            # dlib's lower inner-lip points on a toothy smile sit on the lower
            # teeth; closed, that strip would show under the seam: lip over it.
            cover_lip = (
                np.clip(by - middle, 0, 1)
                * np.clip(middle + 0.07 * self.W - by + 0.5, 0, 1)
                * near
                * np.clip(1.3 * (1 - u**2), 0, 1)
            )
            color = color * (1 - cover_lip[..., None]) + self.lower_lip_rgb * cover_lip[..., None]
            alpha = np.maximum(alpha, cover_lip)
        color = color * (1 - seam[..., None]) + seam_rgb * seam[..., None]
        alpha = np.maximum(alpha, seam)
        bx0, by0, bx1, by1 = self.box
        region = frame[by0:by1, bx0:bx1].astype(np.float32)
        a = alpha[..., None] * (1 - idle)  # idle: the portrait's own mouth, unpainted
        frame[by0:by1, bx0:bx1] = np.clip(region * (1 - a) + color * a + 0.5, 0, 255).astype(
            np.uint8
        )
        return gap_center / self.W

    def _blink_closure(self) -> float:
        if self._blink_frame < 0 and self.frame_index >= self._next_blink:
            self._blink_frame = 0
        if self._blink_frame < 0:
            return 0.0
        closure = BLINK_PROFILE[self._blink_frame]
        self._blink_frame += 1
        if self._blink_frame >= len(BLINK_PROFILE):
            self._blink_frame = -1
            self._next_blink = self.frame_index + self._blink_gap()
        return closure

    def _stress_bump(self) -> float:
        """0..1: a stressed syllable's beat, rising over 3 frames, fading over 8."""
        value = 0.0
        for event in self._stress_events[-4:]:
            age = self.frame_index - event
            if 0 <= age < 3:
                value = max(value, (age + 1) / 3)
            elif 3 <= age < 11:
                value = max(value, 1 - (age - 2) / 9)
        return value

    def _brow_lift(self) -> float:
        return 0.025 * self.face_h * self._stress_bump()

    def _head_motion(self, frame: np.ndarray) -> np.ndarray:
        """Calm idle sway and breathing always; a small nod on stressed syllables."""
        t = self.frame_index / self.fps
        angle = 0.8 * np.sin(2 * np.pi * t / 4.1)
        dx = 1.5 * np.sin(2 * np.pi * t / 3.3)
        dy = 1.0 * np.sin(2 * np.pi * t / 5.2) + 0.02 * self.face_h * self._stress_bump()
        cx, cy = self.landmarks[30]
        matrix = cv2.getRotationMatrix2D((float(cx), float(cy)), float(angle), 1.0)
        matrix[:, 2] += (dx, dy)
        height, width = frame.shape[:2]
        return cv2.warpAffine(frame, matrix, (width, height), borderMode=cv2.BORDER_REPLICATE)
