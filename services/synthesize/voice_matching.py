"""Voice matching: moves the built-in voice toward a reference speaker with
WORLD analysis/synthesis (pyworld). Pitch is mapped to the reference's log-F0
mean and spread; the spectral envelope is warped along frequency by the factor
(a vocal-tract-length proxy) that makes the result most similar to the
reference by a speaker encoder (resemblyzer, weights in its wheel).

This is voice *matching*, not neural cloning: timbre moves toward the
reference, it does not become it. Coqui XTTS, when configured, is the real
cloning path."""

from __future__ import annotations

import threading
import warnings
from typing import Any

import numpy as np

with warnings.catch_warnings():  # pyworld imports pkg_resources
    warnings.simplefilter("ignore")
    import pyworld

from services.common.audio import resample

FRAME_PERIOD_MS = 5.0
EMBED_RATE_HZ = 16_000
FORMANT_RATIOS = (0.82, 0.88, 0.94, 1.0, 1.06, 1.12, 1.18)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


class VoiceMatcher:
    def __init__(self) -> None:
        self._encoder: Any = None
        self._lock = threading.Lock()

    @property
    def encoder(self) -> Any:
        """The speaker encoder, loaded when a voice is first made: resemblyzer
        imports torch (~1 s), which speaking a matched voice does not need."""
        with self._lock:
            if self._encoder is None:
                with warnings.catch_warnings():  # webrtcvad imports pkg_resources
                    warnings.simplefilter("ignore")
                    from resemblyzer import VoiceEncoder

                self._encoder = VoiceEncoder("cpu", verbose=False)
            return self._encoder

    def embed(self, audio: np.ndarray, rate_hz: int) -> np.ndarray:
        encoder = self.encoder
        from resemblyzer import preprocess_wav

        wav = preprocess_wav(resample(audio, rate_hz, EMBED_RATE_HZ), source_sr=EMBED_RATE_HZ)
        return encoder.embed_utterance(wav)

    @staticmethod
    def f0_stats(audio: np.ndarray, rate_hz: int) -> tuple[float, float]:
        x = audio.astype(np.float64)
        f0, times = pyworld.dio(x, rate_hz, frame_period=FRAME_PERIOD_MS)
        f0 = pyworld.stonemask(x, f0, times, rate_hz)
        voiced = np.log(f0[f0 > 0])
        if voiced.size < 10:
            return 0.0, 0.0
        return float(voiced.mean()), float(voiced.std())

    @staticmethod
    def convert(
        audio: np.ndarray,
        rate_hz: int,
        source_f0: tuple[float, float],
        target_f0: tuple[float, float],
        formant_ratio: float,
    ) -> np.ndarray:
        x = audio.astype(np.float64)
        f0, times = pyworld.dio(x, rate_hz, frame_period=FRAME_PERIOD_MS)
        f0 = pyworld.stonemask(x, f0, times, rate_hz)
        envelope = pyworld.cheaptrick(x, f0, times, rate_hz)
        aperiodicity = pyworld.d4c(x, f0, times, rate_hz)
        voiced = f0 > 0
        (source_mean, source_std), (target_mean, target_std) = source_f0, target_f0
        if voiced.any() and source_std > 0 and target_std > 0:
            scaled = (np.log(f0[voiced]) - source_mean) / source_std * target_std + target_mean
            f0[voiced] = np.exp(scaled)
        if formant_ratio != 1.0:
            bins = envelope.shape[1]
            # Energy at frequency f moves to f * ratio: read the source at f / ratio.
            source_bins = np.clip(np.arange(bins) / formant_ratio, 0, bins - 1)
            low = np.floor(source_bins).astype(int)
            high = np.minimum(low + 1, bins - 1)
            weight = source_bins - low
            envelope = envelope[:, low] * (1 - weight) + envelope[:, high] * weight
        converted = pyworld.synthesize(
            f0, np.ascontiguousarray(envelope), aperiodicity, rate_hz, frame_period=FRAME_PERIOD_MS
        )
        peak = np.abs(converted).max() or 1.0
        # Keep the base voice's loudness; WORLD output level drifts with the warp.
        gain = min(1.0 / peak, (np.abs(audio).max() or 1.0) / peak)
        return (converted * gain).astype(np.float32)

    def fit(
        self,
        reference: np.ndarray,
        reference_rate_hz: int,
        base_sample: np.ndarray,
        base_rate_hz: int,
    ) -> dict[str, object]:
        """Learns the pitch map and the envelope warp from one reference and a
        sample of the base voice; returns what a profile stores."""
        target = self.embed(reference, reference_rate_hz)
        target_f0 = self.f0_stats(reference, reference_rate_hz)
        base_f0 = self.f0_stats(base_sample, base_rate_hz)
        before = cosine(self.embed(base_sample, base_rate_hz), target)
        best_ratio, best = 1.0, -1.0
        for ratio in FORMANT_RATIOS:
            converted = self.convert(base_sample, base_rate_hz, base_f0, target_f0, ratio)
            similarity = cosine(self.embed(converted, base_rate_hz), target)
            if similarity > best:
                best_ratio, best = ratio, similarity
        return {
            "embedding": [round(float(v), 6) for v in target],
            "f0_log_mean": target_f0[0],
            "f0_log_std": target_f0[1],
            "base_f0": base_f0,
            "formant_ratio": best_ratio,
            "similarity_before": round(before, 4),
            "similarity_after": round(best, 4),
        }
