"""Reference recordings for new voices: a quality report with reasons and
advice, and voice profiles persisted on disk (JSON written to a temp name and
renamed, so a crash never leaves half a profile)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from faster_whisper.vad import VadOptions, get_speech_timestamps

from services.common.audio import resample
from services.common.cache_files import remove_stale_partials
from services.common.errors import InvalidInput, NotFound

ANALYSIS_RATE_HZ = 16_000
FRAME_S = 0.02
MIN_DURATION_S = 10.0
RECOMMENDED_DURATION_S = 30.0
MIN_SNR_DB = 12.0
GOOD_SNR_DB = 25.0
MAX_CLIPPING = 0.01
WARN_CLIPPING = 0.001
MIN_SPEECH_RATIO = 0.35
WARN_SPEECH_RATIO = 0.6
ADVICE = (
    "Record 30 seconds or more in a quiet room, about a hand's width from the microphone, "
    "reading a text clearly at your normal pace, without music or other voices."
)
_VALID_VOICE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# VoiceProfile.kind
MATCHED = "matched"
CLONED = "cloned"


@dataclass
class QualityReport:
    duration_s: float
    sample_rate_hz: int
    snr_db: float
    noise_floor_dbfs: float
    clipping_ratio: float
    speech_ratio: float
    problems: list[str] = field(default_factory=list)  # each one refuses the sample
    warnings: list[str] = field(default_factory=list)

    @property
    def acceptable(self) -> bool:
        return not self.problems


def assess_reference(audio: np.ndarray, sample_rate_hz: int) -> QualityReport:
    """Measures a reference recording; `problems` say why it cannot be used."""
    duration = len(audio) / sample_rate_hz
    clipping = float(np.mean(np.abs(audio) >= 0.999)) if len(audio) else 0.0
    mono16 = resample(audio, sample_rate_hz, ANALYSIS_RATE_HZ)
    speech = np.zeros(len(mono16), dtype=bool)
    for span in get_speech_timestamps(mono16, VadOptions(min_silence_duration_ms=300)):
        speech[span["start"] : span["end"]] = True
    frame = int(FRAME_S * ANALYSIS_RATE_HZ)
    frames = len(mono16) // frame
    if frames:
        shaped = mono16[: frames * frame].reshape(frames, frame)
        level_db = 10 * np.log10(np.mean(shaped**2, axis=1) + 1e-12)
        is_speech = speech[: frames * frame].reshape(frames, frame).mean(axis=1) > 0.5
    else:
        level_db, is_speech = np.array([-120.0]), np.array([False])
    speech_ratio = float(is_speech.mean())
    # The noise floor is what is left between words; with no pause in the
    # recording, the quietest frames stand in for it.
    noise_frames = (
        level_db[~is_speech]
        if (~is_speech).sum() >= 10
        else np.sort(level_db)[: max(1, frames // 10)]
    )
    noise_floor = float(np.percentile(noise_frames, 50))
    speech_level = float(np.percentile(level_db[is_speech], 50)) if is_speech.any() else noise_floor
    snr = max(0.0, speech_level - noise_floor)
    report = QualityReport(
        duration_s=duration,
        sample_rate_hz=sample_rate_hz,
        snr_db=round(snr, 1),
        noise_floor_dbfs=round(noise_floor, 1),
        clipping_ratio=round(clipping, 5),
        speech_ratio=round(speech_ratio, 3),
    )
    if duration < MIN_DURATION_S:
        report.problems.append(
            f"It is {duration:.1f} s long; at least {MIN_DURATION_S:.0f} s of speech is needed."
        )
    elif duration < RECOMMENDED_DURATION_S:
        report.warnings.append(
            f"It is {duration:.0f} s long; {RECOMMENDED_DURATION_S:.0f} s or more gives a closer match."
        )
    if speech_ratio < MIN_SPEECH_RATIO:
        report.problems.append(
            f"Only {100 * speech_ratio:.0f}% of it is speech; it is mostly silence or noise."
        )
    elif speech_ratio < WARN_SPEECH_RATIO:
        report.warnings.append(
            f"Only {100 * speech_ratio:.0f}% of it is speech; long pauses dilute it."
        )
    if speech_ratio >= MIN_SPEECH_RATIO and snr < MIN_SNR_DB:
        report.problems.append(
            f"The speech is only {snr:.0f} dB above the background noise; at least {MIN_SNR_DB:.0f} dB is needed."
        )
    elif speech_ratio >= MIN_SPEECH_RATIO and snr < GOOD_SNR_DB:
        report.warnings.append(f"The background is noisy (speech {snr:.0f} dB above it).")
    if clipping > MAX_CLIPPING:
        report.problems.append(
            f"{100 * clipping:.1f}% of the samples are clipped (the recording was too loud)."
        )
    elif clipping > WARN_CLIPPING:
        report.warnings.append(f"{100 * clipping:.2f}% of the samples are clipped.")
    return report


@dataclass
class VoiceProfile:
    """A voice made from a reference recording: the base voice it is built on and
    what is needed to move that voice toward the reference."""

    voice_id: str
    display_name: str
    language: str
    base_voice_id: str
    description: str
    consent: bool
    created: float
    quality: dict[str, object]
    embedding: list[float]  # speaker embedding of the reference (resemblyzer, 256 floats)
    f0_log_mean: float  # pitch of the reference, log Hz
    f0_log_std: float
    formant_ratio: float  # spectral envelope warp that brought the base voice closest
    similarity_before: float  # cosine(reference, base voice)
    similarity_after: float  # cosine(reference, matched voice)
    # "matched": the base voice moved toward the reference (the fields above).
    # "cloned": spoken by the Coqui XTTS model from the conditioning stored
    # beside this file (ProfileStore.conditioning_path).
    kind: str = MATCHED
    clone_model: str = ""  # cloned: fingerprint of the model the conditioning is for


class ProfileStore:
    """Profiles as JSON files in one folder; they survive restarts."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._profiles: dict[str, VoiceProfile] = {}

    def load(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.folder.glob("*.json")):
            try:
                profile = VoiceProfile(**json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError):
                continue  # a damaged file is skipped, never fatal
            self._profiles[profile.voice_id] = profile
        remove_stale_partials(self.folder)

    def new_id(self) -> str:
        return f"voice-{uuid.uuid4().hex[:12]}"

    def save(self, profile: VoiceProfile) -> None:
        path = self.folder / f"{profile.voice_id}.json"
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(asdict(profile)), encoding="utf-8")
        partial.replace(path)
        with self._lock:
            self._profiles[profile.voice_id] = profile

    def conditioning_path(self, voice_id: str) -> Path:
        """Where a cloned voice's speaker conditioning lives, beside its profile."""
        return self.folder / f"{voice_id}.xtts.pt"

    def get(self, voice_id: str) -> VoiceProfile | None:
        return self._profiles.get(voice_id)

    def all(self) -> list[VoiceProfile]:
        return sorted(self._profiles.values(), key=lambda p: p.created)

    def delete(self, voice_id: str) -> None:
        if not _VALID_VOICE_ID.match(voice_id):
            raise InvalidInput(f"voice_id {voice_id[:80]!r} is not valid.")
        with self._lock:
            if self._profiles.pop(voice_id, None) is None:
                raise NotFound(f"No voice {voice_id!r}.")
        (self.folder / f"{voice_id}.json").unlink(missing_ok=True)
        self.conditioning_path(voice_id).unlink(missing_ok=True)


def now() -> float:
    return time.time()
