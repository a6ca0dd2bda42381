"""Lip-sync timings of the Mandarin voice: per-syllable pinyin timings read off
Mellotron's attention, checked against the audio it made (the silence of a
b/p closure) and against the mouth shapes the animator draws from them."""

from __future__ import annotations

import numpy as np
import pytest

from services.animate.visemes import CLOSED, frame_weights_from_spans, pinyin_spans
from services.synthesize.mandarin import SAMPLE_RATE_HZ
from tests.speech import mandarin_voice

FPS = 25
TEXT = "妈妈不在家，爸爸买了面包。"
EXPECTED = ["ma1", "ma5", "bu4", "zai4", "jia1", "ba4", "ba5", "mai3", "le5", "mian4", "bao1"]
LEVEL_HOP = 110  # 5 ms


def speak(
    text: str, speaking_rate: float = 1.0
) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """The whole text's audio and its syllable timings on the audio's timeline."""
    model = mandarin_voice()
    clauses: list[list[tuple[str, float, float]]] = []
    pieces = []
    offset_s = 0.0
    timeline: list[tuple[str, float, float]] = []
    for audio, _ in model.synthesize(text, "Aiyue", speaking_rate, timings=clauses):
        timeline += [(p, offset_s + s, d) for p, s, d in clauses[-1]]
        pieces.append(audio)
        offset_s += len(audio) / SAMPLE_RATE_HZ
    assert len(clauses) == len(pieces)
    return np.concatenate(pieces), timeline


def levels_db(audio: np.ndarray) -> np.ndarray:
    frames = len(audio) // LEVEL_HOP
    power = (audio[: frames * LEVEL_HOP].reshape(frames, LEVEL_HOP) ** 2).mean(axis=1)
    return 10 * np.log10(power + 1e-10)


@pytest.fixture(scope="module")
def speech() -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    return speak(TEXT)


def test_one_timing_per_syllable_in_order_and_covering_the_voice(speech) -> None:
    audio, timings = speech
    assert [p for p, _, _ in timings] == EXPECTED
    ends = [s + d for _, s, d in timings]
    starts = [s for _, s, _ in timings]
    assert all(d > 0.03 for _, _, d in timings), timings
    assert all(e <= s + 1e-6 for e, s in zip(ends, starts[1:], strict=False)), timings
    assert ends[-1] <= len(audio) / SAMPLE_RATE_HZ
    levels = levels_db(audio)
    voiced = np.flatnonzero(levels > levels.max() - 30)
    times = (voiced + 0.5) * LEVEL_HOP / SAMPLE_RATE_HZ
    covered = np.array([any(s <= t < s + d for _, s, d in timings) for t in times])
    assert covered.mean() >= 0.95, f"{covered.mean():.0%} of the voiced audio has a syllable"
    # The pause after a clause is not a syllable: the lips rest there.
    first_clause_end = ends[4]
    assert starts[5] - first_clause_end >= 0.1, timings


@pytest.mark.parametrize(
    ("text", "stops"),
    [(TEXT, 3), ("我不怕，你帮帮我吧。", 5)],  # bu4 ba5 bao1; bu4 pa4 bang1 bang1 ba5
)
def test_bilabial_syllables_close_the_mouth_when_the_audio_closes(
    speech, text: str, stops: int
) -> None:
    """Each b/p syllable inside a phrase: the quietest moment around its start
    (the closure's silence) falls inside the closed span the timings give
    (within 20 ms) and in a video frame the animator draws closed (or the
    next to it); every b/p/m syllable gets a closed frame."""
    audio, timings = speech if text == TEXT else speak(text)
    spans = pinyin_spans(timings)
    frames = int(len(audio) / SAMPLE_RATE_HZ * FPS) + 1
    closed = frame_weights_from_spans(spans, frames, FPS).argmax(axis=1) == CLOSED
    levels = levels_db(audio)
    checked = 0
    for index, (syllable, start, duration) in enumerate(timings):
        if syllable[0] not in "bpm":
            continue
        frame_range = range(int(start * FPS), int((start + duration) * FPS) + 1)
        assert any(closed[f] for f in frame_range), f"{syllable} at {start:.2f} s never closes"
        if (
            syllable[0] == "m"
            or index == 0
            or timings[index - 1][1] + timings[index - 1][2] < start - 0.05
        ):
            continue  # m is voiced (no silence to find); a phrase's first b/p follows a pause
        low = int((start - 0.08) * SAMPLE_RATE_HZ / LEVEL_HOP)
        high = int((start + 0.08) * SAMPLE_RATE_HZ / LEVEL_HOP)
        quietest_s = (low + int(levels[low:high].argmin()) + 0.5) * LEVEL_HOP / SAMPLE_RATE_HZ
        closure = next(span for span in spans if span.start_s == start)
        assert closure.shape == CLOSED
        assert closure.start_s - 0.02 <= quietest_s <= closure.end_s + 0.02, (
            f"{syllable}: the closure is heard at {quietest_s:.3f} s, "
            f"the timings close the lips {closure.start_s:.3f}-{closure.end_s:.3f} s"
        )
        frame = int(quietest_s * FPS)
        assert closed[max(0, frame - 1) : frame + 2].any(), (
            f"{syllable}: the closure is heard at {quietest_s:.3f} s, "
            f"the mouth is closed at frames {np.flatnonzero(closed).tolist()}"
        )
        checked += 1
    assert checked == stops


def test_faster_speech_has_earlier_timings() -> None:
    audio, timings = speak("爸爸买了面包。", speaking_rate=1.5)
    normal_audio, normal = speak("爸爸买了面包。")
    assert [p for p, _, _ in timings] == [p for p, _, _ in normal]
    ratio = (timings[-1][1] + timings[-1][2]) / (normal[-1][1] + normal[-1][2])
    assert ratio == pytest.approx(len(audio) / len(normal_audio), abs=0.08)
    assert ratio < 0.8
