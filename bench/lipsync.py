"""Lip-sync quality of the embedded animator, measured on the rendered frames
by dlib's 68-point landmark model (not the animator's own numbers), before
(bench/legacy_animator.py, the loudness-driven one) and after (visemes).

Portraits: skimage's astronaut (the bundled one; smiles with her teeth),
matplotlib's sample `grace_hopper.jpg` (public domain, US Navy photo; closed
mouth, turned 2 degrees, older skin) and the same photo toned darker
(a synthetic stand-in for another skin tone: no portrait of a darker-skinned
person ships in an installed package). Clips: a Piper sentence with its
phoneme timings (m/b/p and vowel classes come from those), and an espeak-ng
clip the animator gets as plain audio (the audio-driven estimator)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from skimage import data

from bench.legacy_animator import PortraitAnimator as LegacyAnimator
from bench.tables import print_table
from services.animate import visemes as vz
from services.animate.animator import PortraitAnimator
from services.animate.portrait import PortraitAnalyzer, PortraitLimits
from tests.aligned_speech import piper_speech_with_phonemes, shifted
from tests.speech import espeak_speech, silence

FPS = 25
HOP = 16_000 // FPS
TTS_TEXT = "Papa parked the blue boat by the beach, and we need room to swim."
RECORDED_TEXT = "Please bring me a map of the moon, but keep the paper dry."
OUT = Path("var/bench")
BILABIAL = set("mbp")
ROUND_V = set("uʊoɔw")
WIDE_V = set("iɪeɛj")


def cpu_name() -> str:
    text = Path("/proc/cpuinfo").read_text()
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in text.splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return f"{model}, {'AVX-512' if ' avx512f' in flags else 'AVX2 only' if ' avx2' in flags else 'no AVX2'}"


def portraits() -> dict[str, np.ndarray]:
    import matplotlib

    hopper_path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    hopper = np.asarray(Image.open(hopper_path).convert("RGB"))
    hopper = np.ascontiguousarray(hopper[: hopper.shape[0] // 2 * 2, : hopper.shape[1] // 2 * 2])
    # Darker skin, as a synthetic stand-in: lower light with a warmer, deeper tone.
    linear = (hopper / 255.0) ** 2.2 * np.array([0.30, 0.22, 0.17])
    darker = np.clip(255 * linear ** (1 / 2.2) * 1.1, 0, 255).astype(np.uint8)
    return {
        "astronaut (smiles, teeth)": data.astronaut(),
        "hopper (closed, turned 2 deg)": hopper,
        "hopper toned darker": darker,
    }


@dataclass
class Measured:
    gaps: np.ndarray  # inner lip gap (62-66) / mouth width, per frame
    widths: np.ndarray  # mouth width (48-54) in pixels, per frame
    flatness: float  # share of the open mouth's inner pixels within 6 grey levels of the median
    fps: float
    frames: list[np.ndarray]


def render(animator, audio: np.ndarray, spans=None) -> tuple[list[np.ndarray], float]:  # type: ignore[no-untyped-def]
    if spans is not None:
        animator.add_spans(spans)
    started = time.perf_counter()
    frames = [frame for _, frame, _ in animator.frames_for(audio, final=True)]
    return frames, len(frames) / (time.perf_counter() - started)


def measure(
    frames: list[np.ndarray], analyzer: PortraitAnalyzer, box: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Landmarks on every frame. dlib's detector finds the face on the first
    frame; the head moves by a few pixels only, so its box serves the rest."""
    import dlib

    # dlib's points are whole pixels; on a 512 px portrait a mouth is ~45 px
    # wide, so one pixel is 2% of it. Frames are measured at twice the size
    # (before and after alike) to halve that step.
    faces = analyzer.detector(frames[0], 1)
    if faces:
        found = max(faces, key=lambda r: r.width())
        x, y, w, h = found.left(), found.top(), found.width(), found.height()
    else:
        x, y, w, h = box
    rect = dlib.rectangle(2 * x, 2 * y, 2 * (x + w), 2 * (y + h))
    points = []
    for frame in frames:
        big = cv2.resize(frame, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
        shape = analyzer.predictor(big, rect)
        points.append(
            [
                ((shape.part(i).x + 0.5) / 2 - 0.5, (shape.part(i).y + 0.5) / 2 - 0.5)
                for i in range(68)
            ]
        )
    landmarks = np.asarray(points, dtype=float)
    widths = np.linalg.norm(landmarks[:, 54] - landmarks[:, 48], axis=1)
    gaps = np.linalg.norm(landmarks[:, 66] - landmarks[:, 62], axis=1) / widths
    return landmarks, gaps, widths


def flatness(frames: list[np.ndarray], landmarks: np.ndarray, gaps: np.ndarray) -> float:
    """Inside open mouths (gap at least half the clip's largest), in the
    inner-lip box shrunk by a quarter on each side: the share of pixels within
    6 grey levels of their median."""
    shares = []
    for frame, points, gap in zip(frames, landmarks, gaps, strict=True):
        if gap < 0.5 * gaps.max() or gap <= 0:
            continue
        inner = points[60:68]
        (x0, y0), (x1, y1) = inner.min(axis=0), inner.max(axis=0)
        dx, dy = (x1 - x0) / 4, (y1 - y0) / 4
        crop = frame[
            round(y0 + dy) : round(y1 - dy) + 1,
            round(x0 + dx) : round(x1 - dx) + 1,
        ]
        if crop.size < 3 * 4:
            continue
        grey = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2GRAY).astype(float)
        shares.append(float(np.mean(np.abs(grey - np.median(grey)) <= 6)))
    return float(np.mean(shares)) if shares else float("nan")


def loudness_db(audio: np.ndarray, frames: int) -> np.ndarray:
    """The level of the audio each frame shows: frame k shows k/fps to (k + 1)/fps."""
    return np.array([vz.level_db(audio[k * HOP : (k + 1) * HOP]) for k in range(frames)])


def best_lag_r(mouth: np.ndarray, level: np.ndarray) -> tuple[float, int]:
    level = np.maximum(level, -60.0)
    best = (-1.0, 0)
    for lag in (-1, 0, 1):
        a = mouth[max(0, lag) : len(mouth) + min(0, lag)]
        b = level[max(0, -lag) : len(level) - max(0, lag)]
        r = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 else 0.0
        best = max(best, (r, lag))
    return best


def frames_in(timings: list[tuple[str, float, float]], chars: set[str], count: int) -> list[int]:
    """Frames whose center lies in a phoneme of `chars` (from the synthesizer's timings)."""
    hits = []
    for index in range(count):
        center = (index + 0.5) / FPS
        if any(p in chars and s <= center < s + d for p, s, d in timings):
            hits.append(index)
    return hits


def contact_sheet(
    name: str, rows: dict[str, list[np.ndarray]], landmarks: np.ndarray, path: Path
) -> None:
    """12 frames across the sentence per row, cropped to the lower face and enlarged."""
    mouth = landmarks[60:68].mean(axis=0)
    width = float(np.linalg.norm(landmarks[54] - landmarks[48]))
    half = int(0.85 * width)
    x0, y0 = int(mouth[0] - half), int(mouth[1] - 0.9 * half)
    tiles_rows = []
    for label, frames in rows.items():
        picks = np.linspace(0, len(frames) - 1, 14).round().astype(int)[1:-1]
        tiles = []
        for pick in picks:
            crop = frames[pick][max(0, y0) : y0 + int(1.9 * half), max(0, x0) : x0 + 2 * half]
            tile = cv2.resize(
                crop, (150, int(150 * crop.shape[0] / crop.shape[1])), interpolation=cv2.INTER_CUBIC
            )
            tiles.append(tile)
        height = min(t.shape[0] for t in tiles)
        row = np.hstack([t[:height] for t in tiles])
        banner = np.full((22, row.shape[1], 3), 255, np.uint8)
        cv2.putText(
            banner,
            f"{name}: {label}",
            (6, 16),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.5,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
        tiles_rows.append(np.vstack([banner, row]))
    sheet = np.vstack(tiles_rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path, optimize=True)


def lipsync_report() -> None:
    analyzer = PortraitAnalyzer(PortraitLimits())
    tts, timings = piper_speech_with_phonemes(TTS_TEXT)
    lead = silence(0.4)
    tts = np.concatenate([lead, tts, silence(0.4)])
    timings = shifted(timings, 0.4)
    spans = vz.spans_from_phonemes(timings)
    recorded = np.concatenate([silence(0.4), espeak_speech(RECORDED_TEXT), silence(0.4)])
    print(f"\nCPU: {cpu_name()}")
    rows = []
    speed_rows = []
    for name, portrait in portraits().items():
        report = analyzer.analyze(portrait)
        sheets: dict[str, list[np.ndarray]] = {}
        for label, make, timed in (
            ("before", lambda p=portrait, r=report: LegacyAnimator(p, r.landmarks, FPS), False),
            ("after", lambda p=portrait, r=report: PortraitAnimator(p, r.landmarks, FPS), True),
        ):
            frames, fps = render(make(), tts, spans if timed else None)
            landmarks, gaps, widths = measure(frames, analyzer, report.face_box)
            count = len(frames)
            mbp = frames_in(timings, BILABIAL, count)
            closed = np.mean(gaps[mbp] <= 0.15 * gaps.max()) if mbp else float("nan")
            round_w = np.median(widths[frames_in(timings, ROUND_V, count)])
            wide_w = np.median(widths[frames_in(timings, WIDE_V, count)])
            flat = flatness(frames, landmarks, gaps)
            r_tts, lag_tts = best_lag_r(gaps, loudness_db(tts, count))
            rec_frames, rec_fps = render(make(), recorded)
            _rec_landmarks, rec_gaps, _ = measure(rec_frames, analyzer, report.face_box)
            r_rec, lag_rec = best_lag_r(rec_gaps, loudness_db(recorded, len(rec_frames)))
            rows.append(
                [
                    name,
                    label,
                    f"{closed:.0%} of {len(mbp)}",
                    round_w / wide_w,
                    flat,
                    f"{r_tts:.2f} (lag {lag_tts:+d})",
                    f"{r_rec:.2f} (lag {lag_rec:+d})",
                ]
            )
            speed_rows.append([name, label, (fps + rec_fps) / 2])
            sheets[label] = frames
        slug = name.split(" ")[0] + ("-dark" if "darker" in name else "")
        contact_sheet(
            name, sheets, np.asarray(report.landmarks, float), OUT / f"animate_contact_{slug}.png"
        )
    print_table(
        "Lips on the rendered frames (dlib 68 points), Piper sentence with phoneme timings + espeak-ng clip as plain audio",
        [
            "portrait",
            "animator",
            "m/b/p frames closed (gap <= 15% of max)",
            "mouth width O/U/W : E/I",
            "open-mouth flatness (share within 6 grey levels)",
            "r(lip gap, loudness dB), TTS",
            "r, recorded (espeak-ng)",
        ],
        rows,
    )
    print(
        "targets: closed >= 90%; width ratio <= 0.90; flatness <= 0.50; r >= 0.75 at lag within +-1 frame"
    )
    base = {n: f for n, label, f in speed_rows if label == "before"}
    print_table(
        "Animator speed at 512x512 and smaller (same process, same clips)",
        ["portrait", "animator", "frames/s", "vs before"],
        [[n, label, f, f / base[n]] for n, label, f in speed_rows],
    )
    print(f"target: >= 50 frames/s; contact sheets in {OUT}/animate_contact_*.png")
