"""Portrait checks and the one-time preparation an avatar needs: the face
(dlib's HOG detector), its 68 landmarks, head pose (solvePnP against a generic
3D face), resolution, lighting and background clutter. Plain Python."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from services.common.errors import InvalidInput, LimitExceeded, plain

with warnings.catch_warnings():  # face_recognition_models imports pkg_resources
    warnings.simplefilter("ignore")
    import dlib
    import face_recognition_models

FORMATS = {"JPEG", "PNG", "WEBP"}
# A detection this sure is a face; the flag patch on skimage's astronaut, a
# classic false face, scores ~0.1 against the real face's ~1.2.
MIN_FACE_SCORE = 0.5
SECOND_FACE_AREA = 0.5  # a second sure face this big (vs the first) makes two people

# Generic 3D positions (mm) of six landmarks, the usual head-pose model:
# nose tip, chin, left/right eye outer corner, left/right mouth corner.
MODEL_POINTS = np.array(
    [
        (0.0, 0.0, 0.0),
        (0.0, -330.0, -65.0),
        (-225.0, 170.0, -135.0),
        (225.0, 170.0, -135.0),
        (-150.0, -150.0, -125.0),
        (150.0, -150.0, -125.0),
    ],
    dtype=np.float64,
)
LANDMARK_IDS = [30, 8, 36, 45, 48, 54]


@dataclass
class Check:
    name: str
    passed: bool
    severity: str  # info | warning | error
    message: str
    measured: float = 0.0
    threshold: float = 0.0
    unit: str = ""


@dataclass
class PortraitLimits:
    max_yaw_deg: float = 15.0
    min_side_px: int = 256
    recommended_side_px: int = 512
    min_face_px: int = 60
    max_pixels: int = 16_000_000


@dataclass
class PortraitReport:
    width: int
    height: int
    checks: list[Check] = field(default_factory=list)
    face_box: tuple[int, int, int, int] | None = None  # x, y, w, h
    landmarks: list[tuple[int, int]] = field(default_factory=list)

    @property
    def acceptable(self) -> bool:
        return not any(c.severity == "error" for c in self.checks)

    @property
    def problems(self) -> list[str]:
        return [c.message for c in self.checks if c.severity == "error"]


class PortraitAnalyzer:
    def __init__(self, limits: PortraitLimits) -> None:
        self.limits = limits
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(
            face_recognition_models.pose_predictor_model_location()
        )

    def decode(self, data: bytes) -> np.ndarray:
        if not data:
            raise InvalidInput("image is empty: send a JPEG, PNG or WebP portrait.")
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in FORMATS:
                    raise InvalidInput(f"The image is {image.format}; send JPEG, PNG or WebP.")
                if image.width * image.height > self.limits.max_pixels:
                    raise LimitExceeded(
                        f"The image is {image.width}x{image.height}; at most "
                        f"{self.limits.max_pixels // 1_000_000} megapixels are accepted."
                    )
                return np.asarray(image.convert("RGB"))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            raise InvalidInput(f"The bytes are not a readable image ({plain(error)}).") from None

    def analyze(self, rgb: np.ndarray) -> PortraitReport:
        height, width = rgb.shape[:2]
        report = PortraitReport(width=width, height=height)
        limits = self.limits
        side = min(width, height)
        if side < limits.min_side_px:
            report.checks.append(
                Check(
                    "resolution",
                    False,
                    "error",
                    f"The image is {width}x{height}; at least {limits.min_side_px} px on the short side is needed ({limits.recommended_side_px} recommended).",
                    side,
                    limits.min_side_px,
                    "px",
                )
            )
            return report
        if side < limits.recommended_side_px:
            report.checks.append(
                Check(
                    "resolution",
                    True,
                    "warning",
                    f"The image is {width}x{height}; {limits.recommended_side_px}x{limits.recommended_side_px} or more gives a sharper mouth.",
                    side,
                    limits.recommended_side_px,
                    "px",
                )
            )
        else:
            report.checks.append(
                Check(
                    "resolution",
                    True,
                    "info",
                    f"{width}x{height} is enough.",
                    side,
                    limits.recommended_side_px,
                    "px",
                )
            )

        faces, scores, _ = self.detector.run(rgb, 1, 0.0)
        sure = sorted(
            ((f, s) for f, s in zip(faces, scores, strict=True) if s >= MIN_FACE_SCORE),
            key=lambda fs: fs[0].area(),
            reverse=True,
        )
        if not sure:
            report.checks.append(
                Check(
                    "face",
                    False,
                    "error",
                    "No face was found: use a photo with one face looking at the camera, well lit.",
                    0,
                    1,
                    "faces",
                )
            )
            return report
        if len(sure) > 1 and sure[1][0].area() >= SECOND_FACE_AREA * sure[0][0].area():
            report.checks.append(
                Check(
                    "face",
                    False,
                    "error",
                    f"{len(sure)} faces of similar size were found; the portrait must show one person.",
                    len(sure),
                    1,
                    "faces",
                )
            )
            return report
        face = sure[0][0]
        report.checks.append(Check("face", True, "info", "One face found.", 1, 1, "faces"))
        box = (max(0, face.left()), max(0, face.top()), face.width(), face.height())
        report.face_box = box
        if face.width() < limits.min_face_px:
            report.checks.append(
                Check(
                    "face_size",
                    False,
                    "error",
                    f"The face is {face.width()} px wide; at least {limits.min_face_px} px is needed: move closer or crop.",
                    face.width(),
                    limits.min_face_px,
                    "px",
                )
            )
            return report
        shape = self.predictor(rgb, face)
        points = np.array([(shape.part(i).x, shape.part(i).y) for i in range(68)], dtype=np.float64)
        report.landmarks = [(int(x), int(y)) for x, y in points]

        yaw, pitch, roll = head_pose(points, width, height)
        frontal = abs(yaw) <= limits.max_yaw_deg
        report.checks.append(
            Check(
                "yaw",
                frontal,
                "info" if frontal else "error",
                f"The head is turned {abs(yaw):.0f} degrees {'left' if yaw < 0 else 'right'}"
                + (
                    "."
                    if frontal
                    else f"; at most {limits.max_yaw_deg:.0f} degrees: face the camera."
                ),
                abs(yaw),
                limits.max_yaw_deg,
                "deg",
            )
        )
        report.checks.append(
            Check(
                "pitch",
                abs(pitch) <= 30,
                "info" if abs(pitch) <= 30 else "warning",
                f"The head is tilted {abs(pitch):.0f} degrees {'up' if pitch > 0 else 'down'}.",
                abs(pitch),
                30,
                "deg",
            )
        )
        report.checks.append(
            Check(
                "roll",
                abs(roll) <= 20,
                "info" if abs(roll) <= 20 else "warning",
                f"The head leans {abs(roll):.0f} degrees.",
                abs(roll),
                20,
                "deg",
            )
        )
        report.checks += lighting_checks(rgb, box)
        report.checks.append(clutter_check(rgb, box))
        return report


def head_pose(points: np.ndarray, width: int, height: int) -> tuple[float, float, float]:
    """Yaw, pitch, roll in degrees from six landmarks (solvePnP, pinhole camera
    with focal length = image width, no lens distortion)."""
    image_points = points[LANDMARK_IDS]
    camera = np.array([[width, 0, width / 2], [0, width, height / 2], [0, 0, 1]], dtype=np.float64)
    ok, rotation, _ = cv2.solvePnP(
        MODEL_POINTS, image_points, camera, np.zeros(4), flags=cv2.SOLVEPNP_ITERATIVE
    )
    if not ok:
        return 90.0, 0.0, 0.0
    matrix, _ = cv2.Rodrigues(rotation)
    angles, *_ = cv2.RQDecomp3x3(matrix)
    pitch, yaw, roll = angles
    # RQDecomp gives pitch near +-180 for a face looking at the camera; fold it.
    pitch = (pitch + 180) % 360 - 180
    pitch = pitch - 180 if pitch > 90 else pitch + 180 if pitch < -90 else pitch
    return float(yaw), float(pitch), float(roll)


def lighting_checks(rgb: np.ndarray, box: tuple[int, int, int, int]) -> list[Check]:
    x, y, w, h = box
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float64)
    face = gray[y : y + h, x : x + w]
    mean = float(face.mean())
    checks = []
    if mean < 50:
        checks.append(
            Check(
                "exposure",
                False,
                "error",
                f"The face is too dark (brightness {mean:.0f} of 255); light it from the front.",
                mean,
                50,
                "level",
            )
        )
    elif mean > 215:
        checks.append(
            Check(
                "exposure",
                False,
                "error",
                f"The face is overexposed (brightness {mean:.0f} of 255).",
                mean,
                215,
                "level",
            )
        )
    else:
        checks.append(
            Check(
                "exposure", True, "info", f"Face brightness {mean:.0f} of 255.", mean, 50, "level"
            )
        )
    left, right = face[:, : w // 2].mean(), face[:, w // 2 :].mean()
    ratio = float(max(left, right) / max(1.0, min(left, right)))
    even = ratio <= 1.6
    checks.append(
        Check(
            "even_light",
            even,
            "info" if even else "warning",
            f"One side of the face is {ratio:.1f}x brighter than the other"
            + ("." if even else "; light both sides evenly."),
            ratio,
            1.6,
            "ratio",
        )
    )
    return checks


def clutter_check(rgb: np.ndarray, box: tuple[int, int, int, int]) -> Check:
    """Edge density in a ring around the face: a busy background makes head
    motion show its seams."""
    x, y, w, h = box
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, 100, 200) > 0
    x0, y0 = max(0, x - w // 2), max(0, y - h // 2)
    x1, y1 = min(gray.shape[1], x + w + w // 2), min(gray.shape[0], y + h + h // 2)
    ring = edges[y0:y1, x0:x1].copy()
    ring[y - y0 : y - y0 + h, x - x0 : x - x0 + w] = False
    area = max(1, ring.size - w * h)
    density = float(ring.sum() / area)
    calm = density <= 0.12
    return Check(
        "background",
        calm,
        "info" if calm else "warning",
        f"{100 * density:.0f}% of the background around the face is edges"
        + ("." if calm else "; a plainer background animates more cleanly."),
        density,
        0.12,
        "ratio",
    )
