"""What speaks one Synthesize call, behind one small Protocol: a Piper voice,
a speaker of the Mandarin voice (either one possibly moved toward a matched
voice's speaker), or an XTTS cloned voice. The engine picks one
(`PiperEngine.speech_for`); the servicer only streams what it says."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from services.synthesize.engine import InstalledVoice, PiperEngine
    from services.synthesize.voice_profiles import VoiceProfile

# (phoneme, start s, duration s) within one piece of audio.
Sound = tuple[str, float, float]
# Float32 audio at the source's rate, whether it ends a sentence, and its sounds.
SpeechPiece = tuple[np.ndarray, bool, list[Sound]]


class SpeechSource(Protocol):
    @property
    def voice_id(self) -> str:
        """The voice that speaks (the caller's records cite it)."""

    @property
    def sample_rate_hz(self) -> int: ...

    @property
    def notation(self) -> str:
        """How its phoneme timings are written: "ipa" or "pinyin"."""

    def speak(
        self, text: str, speaking_rate: float, stop: threading.Event
    ) -> Iterator[SpeechPiece]:
        """Audio as it is made, piece by piece. Blocking; stops soon after `stop`."""


@dataclass
class PiperSpeech:
    """A Piper voice, or a matched voice on a Piper base. The text's first
    phrase is said on its own (`split_first`), so the first chunk comes early."""

    engine: PiperEngine
    voice: InstalledVoice
    profile: VoiceProfile | None
    split_first: Callable[[str], list[str]]
    notation: str = "ipa"

    @property
    def voice_id(self) -> str:
        return self.profile.voice_id if self.profile is not None else self.voice.voice_id

    @property
    def sample_rate_hz(self) -> int:
        return self.voice.sample_rate_hz

    def pieces(self, text: str) -> list[str]:
        return self.split_first(text)

    def speak(
        self, text: str, speaking_rate: float, stop: threading.Event
    ) -> Iterator[SpeechPiece]:
        if self.profile is not None:
            # Before the voice is busy: the base's calibration read (on first use)
            # takes the voice's lock, which the synthesis below holds between sentences.
            self.engine.prepare_match(self.voice)
        for piece in self.pieces(text):
            timings: list[list[Sound]] = []
            for audio, ends_sentence in self.engine.synthesize_marked(
                self.voice, piece, speaking_rate, stop, timings
            ):
                sounds = timings[-1] if timings else []
                if self.profile is not None:
                    length = len(audio)
                    audio = self.engine.match(audio, self.voice, self.profile)
                    # Matching may stretch the audio: the timings stretch with it.
                    stretch = len(audio) / max(1, length)
                    sounds = [(p, s * stretch, d * stretch) for p, s, d in sounds]
                yield audio, ends_sentence, sounds
            if stop.is_set():
                return


@dataclass
class MandarinSpeech(PiperSpeech):
    """A speaker of the Mandarin voice: it cuts its text into clauses itself
    and reports pinyin syllables."""

    notation: str = "pinyin"

    def pieces(self, text: str) -> list[str]:
        return [text]


@dataclass
class ClonedSpeech:
    """A voice cloned by XTTS: no phoneme timings (the animator reads the audio)."""

    engine: PiperEngine
    profile: VoiceProfile
    notation: str = "ipa"

    @property
    def voice_id(self) -> str:
        return self.profile.voice_id

    @property
    def sample_rate_hz(self) -> int:
        return self.engine.require_cloner().sample_rate_hz

    def speak(
        self, text: str, speaking_rate: float, stop: threading.Event
    ) -> Iterator[SpeechPiece]:
        for audio, ends_sentence in self.engine.synthesize_cloned(
            self.profile, text, speaking_rate, stop
        ):
            yield audio, ends_sentence, []
