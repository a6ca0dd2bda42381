"""Mouth shapes (visemes) over time: from phoneme timings when the synthesizer
reports them, from the audio itself otherwise.

Seven shapes, as in game and 2D-puppet lip sync (Oculus/Meta visemes,
Rhubarb's mouth set): rest, closed (m/b/p), open (a), wide (e/i), round
(o/u/w), f/v (lower lip under the upper teeth) and a mid shape for the other
consonants and reduced vowels. A frame is a blend of them: a weight per shape,
summing to one, so neighbouring sounds colour each other (co-articulation)
the way real lips anticipate the next sound.

Everything is deterministic arithmetic on the audio or the timings: no
learned weights."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

REST, CLOSED, OPEN, WIDE, ROUND, FV, MID = range(7)
NAMES = ("rest", "closed", "open", "wide", "round", "fv", "mid")
COUNT = len(NAMES)
SAMPLE_RATE_HZ = 16_000

# espeak-ng IPA (what Piper speaks from) to shapes. Characters not listed
# (stress marks, length marks, ties) carry no shape of their own.
_IPA: dict[str, int] = {}
for chars, shape in (
    ("mbpɱ", CLOSED),
    ("fv", FV),
    ("aɑæɐɒʌ", OPEN),
    ("iɪeɛjɨ", WIDE),
    ("uʊoɔwɵʉʷ", ROUND),
    ("ʃʒ", ROUND),  # sh/zh push the lips forward
    ("əɚɜᵻtdnlszθðkgɡŋhɹrɾʔçxɣʎɲ", MID),
):
    for char in chars:
        _IPA[char] = shape
PAUSES = set(" ,.;:!?—…^$_\n")
STRESS = "ˈ"

# Pinyin initials and finals to shapes (Mandarin speech from the synthesizer
# comes as syllables with durations; the initial takes the first ~35% of it).
_INITIALS = (
    ("zh", ROUND),
    ("ch", ROUND),
    ("sh", ROUND),
    ("b", CLOSED),
    ("p", CLOSED),
    ("m", CLOSED),
    ("f", FV),
    ("w", ROUND),
    ("y", WIDE),
    ("r", ROUND),
)
_FINALS = (
    ("iang", WIDE),
    ("iong", ROUND),
    ("uang", ROUND),
    ("uan", ROUND),
    ("uai", ROUND),
    ("ang", OPEN),
    ("eng", MID),
    ("ing", WIDE),
    ("ong", ROUND),
    ("ian", WIDE),
    ("iao", WIDE),
    ("ai", OPEN),
    ("ao", OPEN),
    ("an", OPEN),
    ("ei", WIDE),
    ("en", MID),
    ("er", MID),
    ("ia", WIDE),
    ("ie", WIDE),
    ("in", WIDE),
    ("iu", WIDE),
    ("ou", ROUND),
    ("ua", ROUND),
    ("ue", ROUND),
    ("ui", ROUND),
    ("un", ROUND),
    ("uo", ROUND),
    ("a", OPEN),
    ("e", MID),
    ("i", WIDE),
    ("o", ROUND),
    ("u", ROUND),
    ("v", ROUND),
    ("ü", ROUND),
)


@dataclass(frozen=True)
class Span:
    """One sound: its shape, where it starts and how long it lasts (seconds),
    and whether it carries the stress of its word."""

    shape: int
    start_s: float
    duration_s: float
    stressed: bool = False

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s


def shape_of_phoneme(phoneme: str) -> int | None:
    """The shape of one espeak/Piper phoneme; REST for pauses, None for marks."""
    if not phoneme or phoneme in PAUSES or phoneme.isspace():
        return REST
    return _IPA.get(phoneme[0])


LENGTHENERS = set("ːˑ")
SHORT_CLOSURES = True
STOPS = set("bp")
STOP_LEAD_S = (
    0.045  # measured on Piper's joe voice: the closure's silence ends 20-60 ms before the span
)
# How far (in frames) a frame looks around its center for the sounds it shows.
COARTICULATION_FRAMES = 0.8
SHORT_PAUSE_S = 0.1  # a word gap shorter than this keeps the mouth where it was


def spans_from_phonemes(timings: list[tuple[str, float, float]]) -> list[Span]:
    """(phoneme, start s, duration s) from the synthesizer into shape spans.
    A length mark lengthens the sound before it; a stress mark has no shape,
    its time goes to the next sound, which it marks as stressed; a short gap
    between words lengthens the sound before it (lips do not rest between
    the words of a phrase)."""
    spans: list[Span] = []
    carry_start: float | None = None
    stressed = False
    for phoneme, start, duration in timings:
        short_gap = phoneme == " " and duration < SHORT_PAUSE_S
        if (phoneme in LENGTHENERS or short_gap) and spans and carry_start is None:
            last = spans[-1]
            spans[-1] = Span(
                last.shape, last.start_s, start + duration - last.start_s, last.stressed
            )
            continue
        shape = shape_of_phoneme(phoneme)
        if shape is None or short_gap:
            if phoneme == STRESS:
                stressed = True
            if carry_start is None:
                carry_start = start
            continue
        begin = carry_start if carry_start is not None else start
        if phoneme in STOPS and spans:
            # A stop's span covers its release; the lips shut during the
            # silence before it, which the synthesizer books to the sound before.
            last = spans[-1]
            begin = max(last.start_s + 0.5 * last.duration_s, begin - STOP_LEAD_S)
            spans[-1] = Span(last.shape, last.start_s, begin - last.start_s, last.stressed)
        spans.append(Span(shape, begin, start + duration - begin, stressed and shape != REST))
        carry_start = None
        if shape != REST:
            stressed = False
    return spans


def pinyin_spans(syllables: list[tuple[str, float, float]]) -> list[Span]:
    """Mandarin: (pinyin syllable with optional tone digit, start s, duration s)
    into shape spans. The initial takes the first 35% of the syllable, the
    final the rest; the 4th and 1st tones count as stressed."""
    spans: list[Span] = []
    for syllable, start, duration in syllables:
        text = syllable.strip().lower()
        tone = text[-1] if text[-1:].isdigit() else ""
        text = text.rstrip("012345")
        if not text or not text.isalpha():
            spans.append(Span(REST, start, duration))
            continue
        initial = next(((i, s) for i, s in _INITIALS if text.startswith(i)), None)
        if initial is None and text[0] in "dtnlgkhjqxzcs":
            initial = (text[0], MID)
        rest = text[len(initial[0]) :] if initial else text
        if initial and initial[0] in ("zh", "ch", "sh", "r", "z", "c", "s") and rest == "i":
            final = MID  # the buzzed "i" of zhi/chi/shi/ri/zi/ci/si is not an [i]
        else:
            final = next((s for f, s in _FINALS if rest.startswith(f)), MID) if rest else MID
        stressed = tone in ("1", "4")
        if initial is not None:
            head = 0.35 * duration
            spans.append(Span(initial[1], start, head, False))
            spans.append(Span(final, start + head, duration - head, stressed))
        else:
            spans.append(Span(final, start, duration, stressed))
    return spans


def weights_at(spans: list[Span], index: int, fps: float) -> np.ndarray:
    """Shape weights of frame `index`. The frame looks at the sounds within
    about a frame of its center (a raised-cosine window, so a shape fades in
    before its sound and out after it); a frame whose center sits in a closure
    (m, b, p), or that holds the middle of one shorter than a frame, is
    closed outright, since lips that only nearly meet read as mumbling."""
    weights = np.zeros(COUNT, dtype=np.float32)
    if not spans:
        weights[REST] = 1.0
        return weights
    center = (index + 0.5) / fps
    reach = COARTICULATION_FRAMES / fps
    first = max(0, bisect.bisect_right(spans, center - reach - 2.0, key=lambda s: s.start_s) - 1)
    nearby = []
    for span in spans[first:]:
        if span.start_s > center + reach:
            break
        if span.end_s >= center - reach:
            nearby.append(span)
    closed = any(
        span.shape == CLOSED
        and (
            span.start_s <= center < span.end_s
            or (
                SHORT_CLOSURES
                and index / fps <= (span.start_s + span.end_s) / 2 < (index + 1) / fps
            )
        )
        for span in nearby
    )
    if closed:
        weights[CLOSED] = 1.0
        return weights
    for offset in np.linspace(-reach, reach, 9):
        k = 0.5 + 0.5 * np.cos(np.pi * offset / reach)
        t = center + offset
        shape = next((s.shape for s in nearby if s.start_s <= t < s.end_s), REST)
        weights[shape] += k
    return weights / weights.sum()


def frame_weights_from_spans(spans: list[Span], frames: int, fps: float) -> np.ndarray:
    """(frames, COUNT) weights, frame by frame as `weights_at`."""
    return np.stack([weights_at(spans, index, fps) for index in range(frames)])


def stressed_frames(spans: list[Span], frames: int, fps: float) -> np.ndarray:
    """1.0 at the frame where a stressed sound starts, else 0."""
    marks = np.zeros(frames, dtype=np.float32)
    for span in spans:
        if span.stressed:
            index = int(span.start_s * fps)
            if 0 <= index < frames:
                marks[index] = 1.0
    return marks


# --- the audio-driven estimator -------------------------------------------------

# Loudness maps to how far the open shapes open, linearly in dB over this
# range: a wide range keeps the opening following the voice's own dynamics.
QUIET_DB = -55.0
LOUD_DB = -15.0


def level_db(piece: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(piece**2)) + 1e-9)) if len(piece) else -180.0


def loudness(level: float) -> float:
    """0 (quiet) .. 1 (loud) from a level in dBFS."""
    return float(np.clip((level - QUIET_DB) / (LOUD_DB - QUIET_DB), 0.0, 1.0))


def _formants(piece: np.ndarray, rate: int) -> tuple[float, float]:
    """F1 and F2 (Hz) from LPC roots, order 2 + rate/1000 (the classic rule)."""
    x = np.append(piece[0], piece[1:] - 0.95 * piece[:-1]) * np.hamming(len(piece))
    order = 2 + rate // 1000
    r = np.correlate(x, x, mode="full")[len(x) - 1 : len(x) + order]
    if r[0] <= 0:
        return 0.0, 0.0
    # Levinson-Durbin.
    a = np.zeros(order + 1)
    a[0] = 1.0
    error = r[0] * (1 + 1e-9)
    for i in range(1, order + 1):
        k = -(r[i] + np.dot(a[1:i], r[i - 1 : 0 : -1])) / error
        a[1:i] = a[1:i] + k * a[i - 1 : 0 : -1]
        a[i] = k
        error *= 1 - k * k
        if error <= 0:
            return 0.0, 0.0
    roots = np.roots(a)
    roots = roots[np.imag(roots) > 0]
    freqs = np.angle(roots) * rate / (2 * np.pi)
    bandwidths = -np.log(np.abs(roots) + 1e-12) * rate / np.pi
    keep = np.sort(freqs[(freqs > 200) & (bandwidths < 500)])
    f1 = float(keep[0]) if len(keep) > 0 else 0.0
    f2 = float(keep[1]) if len(keep) > 1 else 0.0
    return f1, f2


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


@dataclass
class EstimatorState:
    peak_db: float = -30.0
    previous: np.ndarray | None = None
    voiced_run: int = 0


def estimate_frame(
    piece: np.ndarray,
    state: EstimatorState,
    rate: int = SAMPLE_RATE_HZ,
    own: np.ndarray | None = None,
) -> np.ndarray:
    """Shape weights for one frame of audio (about one frame long, centered on
    it). uLipSync-style: loudness says how far the mouth opens; a quiet gap
    inside speech or a nasal hum (energy all below 500 Hz) closes it; a hiss
    (energy above 3 kHz) is f/v when weak; vowels are told apart by their
    first two formants (a: high F1, e/i: high F2, o/u: low F2)."""
    weights = np.zeros(COUNT, dtype=np.float32)
    level = level_db(piece)
    # The speaker's level, followed quickly up and slowly down, so quiet
    # stretches are judged against this voice rather than a fixed number.
    state.peak_db = max(level, state.peak_db - 0.25) if level > -60 else state.peak_db - 0.25
    relative = level - state.peak_db
    if level < -52 or relative < -32:
        weights[REST] = 1.0
        state.voiced_run = 0
        return weights
    spectrum = np.abs(np.fft.rfft(piece * np.hanning(len(piece)), 1024)) ** 2
    freqs = np.fft.rfftfreq(1024, 1 / rate)
    total = spectrum[(freqs > 60)].sum() + 1e-12
    low = spectrum[(freqs > 60) & (freqs < 500)].sum() / total
    high = spectrum[freqs > 3000].sum() / total
    mid = spectrum[(freqs >= 500) & (freqs < 3000)].sum() / total
    # The quietest 20 ms of the frame's own 40 ms: a stop's closure is a
    # silence of 30-80 ms, which a window twice the frame would average away.
    own = piece if own is None or len(own) < rate // 50 else own
    step, width = rate // 100, rate // 50
    dip = min(
        (level_db(own[at : at + width]) for at in range(0, max(1, len(own) - width + 1), step)),
        default=level,
    )
    if relative < -15 or dip - state.peak_db < -24:
        # A quiet moment inside speech: a stop's closure or a nasal.
        weights[CLOSED] = 1.0
        return weights
    if low > 0.9 and mid < 0.1 and relative < -5:
        # A hum with all its energy below 500 Hz: a nasal or a stop's voice
        # bar, both with the lips shut (m, b).
        weights[CLOSED] = 1.0
        return weights
    if high > 0.55:
        if relative < -12:
            weights[FV] = 1.0
        else:
            weights[WIDE] = 0.5  # s/z: teeth together, lips a little spread
            weights[MID] = 0.5
        return weights
    f1, f2 = _formants(piece, rate)
    if f1 <= 0:
        weights[MID] = 1.0
        return weights
    open_ = _sigmoid((f1 - 620) / 70)
    wide = (1 - open_) * _sigmoid((f2 - 1750) / 150)
    round_ = (1 - open_) * _sigmoid((1150 - f2) / 120)
    weights[OPEN] = open_
    weights[WIDE] = wide
    weights[ROUND] = round_
    weights[MID] = max(0.0, 1.0 - open_ - wide - round_)
    return weights


class Estimator:
    """Shape weights and loudness per frame from 16 kHz audio, streaming: frame
    i needs the audio up to (i + 1) / fps s (one frame of look-ahead)."""

    def __init__(self, fps: float) -> None:
        self.fps = fps
        self.state = EstimatorState()
        self.smoothed = np.zeros(COUNT, dtype=np.float32)
        self.smoothed[REST] = 1.0

    def frame(self, piece: np.ndarray, own: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """Weights for a frame from `piece` (twice the frame, centered on it)
        and `own` (the frame's own stretch of audio)."""
        raw = estimate_frame(piece, self.state, own=own)
        # Co-articulation without look-ahead: glide toward the new shape, but
        # close at once (a closure is short; smoothed away, it never shows).
        if raw[CLOSED] >= 0.99:
            self.smoothed = raw.copy()
        else:
            self.smoothed = (0.35 * self.smoothed + 0.65 * raw).astype(np.float32)
        return self.smoothed / self.smoothed.sum(), level_db(piece)
