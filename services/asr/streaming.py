"""Live recognition of one stream: VAD-gated utterances, interim and final
results, end-of-utterance and silence-timeout events. Plain Python; the
servicer feeds it 16 kHz float audio and forwards what it returns.

Latency design: the moment the VAD first hears silence after speech, the
utterance is decoded *speculatively*. If the silence lasts until the
end-of-utterance threshold and no speech came in between, that result is the
final one and is sent at once; otherwise it is dropped (and, when interim
results are on, shown as an interim). So the final arrives
max(end-of-utterance silence, VAD lag + decode time) after speech ends,
instead of their sum.

Accuracy design: interim results are greedy (cheap, for display only); the
speculative and final decodes, which the caller acts on, use the wider
`final_beam_size`. Measured on held-out espeak-ng and Piper clips, beam width
was what made streamed finals worse than whole-clip Recognize; the shortened
encoder window and the carried prompt were not (see bench/asr_bench.py).

Language: with language auto, Whisper's detection on half a second of audio
flips (an interim once came out in Indonesian). The language is detected once
per utterance, on the first decode with LANGUAGE_MIN_MS of audio, and held for
the rest of it; a shorter decode borrows the previous utterance's language or,
for an interim, is skipped.

Real time: decodes run on the audio path, so while one runs the device's
chunks wait. A stream that is behind (audio already waiting when a decode
would start: the caller says so through `waiting`, or more windows of the
same call remain) skips the optional decodes, interim and speculative, and
does them once it has caught up, on the newest audio; they are deferred, never
queued, so a busy host cannot stack them up. Only the final is always decoded.
An interim decodes at most the last INTERIM_WINDOW_MS of its utterance, so its
cost stays flat however long the utterance grows; the final decodes it whole.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter, Histogram

from services.asr.engine import SAMPLE_RATE_HZ, UtteranceText, VadStream, WhisperEngine
from services.common.metrics import LATENCY_BUCKETS

WINDOW = VadStream.WINDOW
WINDOW_MS = WINDOW * 1000 // SAMPLE_RATE_HZ  # 32 ms
PREROLL_MS = 320  # audio kept before speech onset, so the first phoneme is not cut
TAIL_MS = 200  # silence kept after speech for the decoder
MIN_SPEECH_MS = 96  # a shorter blip (a click, a cough) does not start an utterance
SPECULATE_AFTER_MS = 64
LANGUAGE_MIN_MS = 1500  # audio needed before an auto-detected language is trusted and held
NO_SPEECH_DROP = 0.8  # Whisper's no-speech probability above which a result is empty
# The shortest encoder window (engine.MIN_WINDOW_FRAMES): a longer interim would pay
# for a wider one, for text the final will replace anyway.
INTERIM_WINDOW_MS = 10_000

ENDPOINT_TO_FINAL_SECONDS = Histogram(
    "talker_asr_endpoint_to_final_seconds",
    "From the end-of-utterance decision to the final result being ready.",
    buckets=LATENCY_BUCKETS,
)
DEFERRED = Counter(
    "talker_asr_deferred_decodes_total",
    "Optional decodes (interim, speculative) put off because the stream was behind "
    "real time (audio already waiting); done later on the newest audio, or never.",
    ["kind"],
)


@dataclass(frozen=True)
class StreamOptions:
    language: str | None
    initial_prompt: str
    beam_size: int
    interim_results: bool
    interim_interval_ms: int
    end_of_utterance_silence_ms: int
    silence_timeout_s: float
    single_utterance: bool
    vad_threshold: float
    max_utterance_s: float
    speculative_results: bool = False
    final_beam_size: int = 0  # speculative and final decodes; 0 = beam_size


@dataclass(frozen=True)
class SpeechStarted:
    offset_ms: int


@dataclass(frozen=True)
class EndOfUtterance:
    offset_ms: int


@dataclass(frozen=True)
class SilenceTimeout:
    offset_ms: int


@dataclass(frozen=True)
class Result:
    text: str
    is_final: bool
    language: str
    start_ms: int
    end_ms: int
    utterance_index: int
    stability: float
    no_speech_probability: float = 0.0
    speculative: bool = False


StreamOutput = SpeechStarted | EndOfUtterance | SilenceTimeout | Result


@dataclass
class _Utterance:
    start_sample: int  # first sample of the audio kept (pre-roll included)
    onset_sample: int  # where the VAD heard speech begin; reported as start_ms
    audio: list[np.ndarray] = field(default_factory=list)
    samples: int = 0
    last_speech_end: int = 0  # absolute sample index just past the last speech window
    speech_since_interim_ms: int = 0
    silence_ms: int = 0
    interim_deferred: bool = False  # an interim fell due while the stream was behind
    speculation_deferred: bool = False  # so did the speculative decode, at the pause
    speculative: tuple[int, UtteranceText] | None = None  # (last_speech_end it covered, text)
    last_interim: str = ""
    language: str | None = None  # held once detected on enough audio

    def append(self, window: np.ndarray) -> None:
        self.audio.append(window)
        self.samples += len(window)

    def joined(self, end_sample: int | None = None) -> np.ndarray:
        audio = np.concatenate(self.audio) if self.audio else np.zeros(0, np.float32)
        if end_sample is not None:
            audio = audio[: max(0, end_sample - self.start_sample)]
        return audio


class StreamingRecognizer:
    """State of one live stream. `accept` and `finish` block while decoding;
    call them from a worker thread. `waiting` tells how many of the caller's
    audio messages are already waiting to be fed (more than 0: behind)."""

    def __init__(
        self,
        engine: WhisperEngine,
        options: StreamOptions,
        waiting: Callable[[], int] | None = None,
    ) -> None:
        assert engine.vad_session is not None
        self.engine = engine
        self.options = options
        self._waiting = waiting or (lambda: 0)
        self._windows_left = 0  # whole windows of the current `accept` not yet stepped
        #: Optional decodes put off because the stream was behind, by kind.
        self.deferred: dict[str, int] = {"interim": 0, "speculative": 0}
        self._vad = VadStream(engine.vad_session)
        self._pending = np.zeros(0, dtype=np.float32)
        self._samples_seen = 0
        self._preroll: deque[np.ndarray] = deque(maxlen=PREROLL_MS // WINDOW_MS)
        self._speech_run: list[np.ndarray] = []
        self._utterance: _Utterance | None = None
        self._idle_ms = 0
        self._utterance_index = 0
        self._finals: list[str] = []
        self._last_language: str | None = None  # the previous utterance's held language
        self.done = False

    @property
    def audio_ms(self) -> int:
        return self._samples_seen * 1000 // SAMPLE_RATE_HZ

    def accept(self, audio: np.ndarray) -> list[StreamOutput]:
        """Feed 16 kHz mono float samples; returns what happened, in order."""
        outputs: list[StreamOutput] = []
        if self.done:
            return outputs
        buffered = np.concatenate([self._pending, audio]) if len(self._pending) else audio
        whole = len(buffered) // WINDOW * WINDOW
        self._pending = buffered[whole:].copy()
        for start in range(0, whole, WINDOW):
            self._windows_left = (whole - start) // WINDOW - 1
            self._step(buffered[start : start + WINDOW], outputs)
            if self.done:
                break
        return outputs

    def finish(self) -> list[StreamOutput]:
        """The client stopped sending: the utterance in progress becomes final."""
        outputs: list[StreamOutput] = []
        if self.done:
            return outputs
        if self._utterance is not None:
            self._utterance.last_speech_end = self._samples_seen
            outputs.append(EndOfUtterance(self.audio_ms))
            outputs.append(self._final())
        self.done = True
        return outputs

    @property
    def behind(self) -> bool:
        """Audio after this window is already here: an optional decode now would
        only make the stream fall further behind real time."""
        return self._windows_left > 0 or self._waiting() > 0

    def _defer(self, kind: str) -> None:
        self.deferred[kind] += 1
        DEFERRED.labels(kind).inc()

    # ---- per window -----------------------------------------------------------
    def _step(self, window: np.ndarray, outputs: list[StreamOutput]) -> None:
        probability = self._vad.speech_probability(window)
        self._samples_seen += len(window)
        if self._utterance is None:
            self._idle_step(window, probability, outputs)
        else:
            self._speech_step(window, probability, outputs)

    def _idle_step(
        self, window: np.ndarray, probability: float, outputs: list[StreamOutput]
    ) -> None:
        if probability >= self.options.vad_threshold:
            self._speech_run.append(window)
            if len(self._speech_run) * WINDOW_MS >= MIN_SPEECH_MS:
                audio = [*self._preroll, *self._speech_run]
                start = self._samples_seen - sum(len(a) for a in audio)
                onset = self._samples_seen - len(self._speech_run) * WINDOW
                self._utterance = _Utterance(start_sample=start, onset_sample=onset)
                for piece in audio:
                    self._utterance.append(piece)
                self._utterance.last_speech_end = self._samples_seen
                self._utterance.speech_since_interim_ms = len(self._speech_run) * WINDOW_MS
                self._preroll.clear()
                self._speech_run = []
                self._idle_ms = 0
                outputs.append(SpeechStarted(onset * 1000 // SAMPLE_RATE_HZ))
            return
        for earlier in self._speech_run:
            self._preroll.append(earlier)
        self._speech_run = []
        self._preroll.append(window)
        self._idle_ms += WINDOW_MS
        if self._idle_ms >= self.options.silence_timeout_s * 1000:
            outputs.append(SilenceTimeout(self.audio_ms))
            self.done = True

    def _speech_step(
        self, window: np.ndarray, probability: float, outputs: list[StreamOutput]
    ) -> None:
        utterance = self._utterance
        assert utterance is not None
        utterance.append(window)
        options = self.options
        # Hysteresis as in Silero's own segmenter: speech continues down to threshold - 0.15.
        if probability >= options.vad_threshold - 0.15:
            utterance.silence_ms = 0
            utterance.speculation_deferred = False  # the pause is over: nothing to guess
            utterance.last_speech_end = self._samples_seen
            utterance.speech_since_interim_ms += WINDOW_MS
            if (
                options.interim_results
                and utterance.speech_since_interim_ms >= options.interim_interval_ms
            ):
                if self.behind:
                    if not utterance.interim_deferred:
                        utterance.interim_deferred = True
                        self._defer("interim")
                else:
                    utterance.speech_since_interim_ms = 0
                    utterance.interim_deferred = False
                    recent = utterance.joined()[-INTERIM_WINDOW_MS * SAMPLE_RATE_HZ // 1000 :]
                    self._interim(utterance, recent, "interim", outputs)
        else:
            utterance.silence_ms += WINDOW_MS
            speculate_now = utterance.silence_ms == SPECULATE_AFTER_MS // WINDOW_MS * WINDOW_MS
            if speculate_now and self.behind:
                utterance.speculation_deferred = True
                self._defer("speculative")
                speculate_now = False
            elif utterance.speculation_deferred and not self.behind:
                # Caught up while the pause lasts: the guess is still worth making, unless
                # the end of the utterance is decided on this very window (the final decodes).
                utterance.speculation_deferred = False
                speculate_now = utterance.silence_ms < options.end_of_utterance_silence_ms
            if speculate_now:
                text = self._decode(utterance, utterance.joined(), "speculative")
                assert text is not None  # only interims are ever skipped
                utterance.speculative = (utterance.last_speech_end, text)
                # A guess on a short fragment (the VAD dipped inside a word) may be in
                # a language detected on too little audio: shown as an interim only once
                # the language is known. A caller that asked for guesses gets it anyway,
                # since the final would say the same.
                known = options.language or utterance.language or self._last_language
                if options.speculative_results or (options.interim_results and known):
                    self._emit_interim(utterance, text, outputs, speculative=True)
            if utterance.silence_ms >= options.end_of_utterance_silence_ms:
                decided = time.perf_counter()
                outputs.append(EndOfUtterance(self.audio_ms))
                outputs.append(self._final())
                ENDPOINT_TO_FINAL_SECONDS.observe(time.perf_counter() - decided)
                return
        if utterance.samples >= options.max_utterance_s * SAMPLE_RATE_HZ:
            # Whisper sees 30 s at most: finalise here and carry straight on.
            utterance.last_speech_end = self._samples_seen
            outputs.append(self._final())
            if not self.done:
                self._utterance = _Utterance(
                    start_sample=self._samples_seen,
                    onset_sample=self._samples_seen,
                    last_speech_end=self._samples_seen,
                )

    # ---- results ------------------------------------------------------------
    def _prompt(self) -> str:
        context = " ".join([self.options.initial_prompt, *self._finals[-3:]]).strip()
        return context[-600:]

    def _decode(self, utterance: _Utterance, audio: np.ndarray, kind: str) -> UtteranceText | None:
        """Greedy for interims, `final_beam_size` for what the caller acts on.
        None: an interim too short to be sure of an undetected language."""
        options = self.options
        beam = options.beam_size if kind == "interim" else options.final_beam_size
        language = options.language or utterance.language
        enough = len(audio) >= LANGUAGE_MIN_MS * SAMPLE_RATE_HZ // 1000
        if language is None and not enough:
            if self._last_language is None and kind == "interim":
                return None
            language = self._last_language
        decoded = self.engine.transcribe_utterance(
            audio, language, self._prompt(), beam or options.beam_size, kind=kind
        )
        if options.language is None and utterance.language is None and enough:
            utterance.language = decoded.language
        return decoded

    def _interim(
        self, utterance: _Utterance, audio: np.ndarray, kind: str, outputs: list[StreamOutput]
    ) -> None:
        decoded = self._decode(utterance, audio, kind)
        if decoded is not None:
            self._emit_interim(utterance, decoded, outputs)

    def _emit_interim(
        self,
        utterance: _Utterance,
        decoded: UtteranceText,
        outputs: list[StreamOutput],
        speculative: bool = False,
    ) -> None:
        text = clean_text(decoded)
        # A speculative result is sent even when it repeats the last interim: it
        # is the caller's signal that the final will say this, if the pause lasts.
        if not text or (text == utterance.last_interim and not speculative):
            return
        stability = prefix_agreement(utterance.last_interim, text)
        utterance.last_interim = text
        outputs.append(
            Result(
                text=text,
                is_final=False,
                language=decoded.language,
                start_ms=utterance.onset_sample * 1000 // SAMPLE_RATE_HZ,
                end_ms=self.audio_ms,
                utterance_index=self._utterance_index,
                stability=stability,
                no_speech_probability=decoded.no_speech_probability,
                speculative=speculative,
            )
        )

    def _final(self) -> Result:
        utterance = self._utterance
        assert utterance is not None
        speculative = utterance.speculative
        if speculative is not None and speculative[0] == utterance.last_speech_end:
            decoded = speculative[1]
        else:
            end = min(
                utterance.start_sample + utterance.samples,
                utterance.last_speech_end + TAIL_MS * SAMPLE_RATE_HZ // 1000,
            )
            final = self._decode(utterance, utterance.joined(end), "final")
            assert final is not None  # only interims are ever skipped
            decoded = final
        text = clean_text(decoded)
        result = Result(
            text=text,
            is_final=True,
            language=decoded.language,
            start_ms=utterance.onset_sample * 1000 // SAMPLE_RATE_HZ,
            end_ms=utterance.last_speech_end * 1000 // SAMPLE_RATE_HZ,
            utterance_index=self._utterance_index,
            stability=1.0,
            no_speech_probability=decoded.no_speech_probability,
        )
        if text:
            self._finals.append(text)
            if self.options.language is None:
                self._last_language = utterance.language or decoded.language
        self._utterance_index += 1
        self._utterance = None
        self._idle_ms = 0
        if self.options.single_utterance:
            self.done = True
        return result


def clean_text(decoded: UtteranceText) -> str:
    """The text, or empty when Whisper itself judged the audio not to be speech."""
    if decoded.no_speech_probability > NO_SPEECH_DROP and decoded.avg_logprob < -1.0:
        return ""
    return decoded.text


def prefix_agreement(previous: str, current: str) -> float:
    """Share of the current interim's words already present, in order, in the
    previous interim: a cheap stability estimate."""
    old, new = previous.split(), current.split()
    if not new:
        return 0.0
    same = 0
    for a, b in zip(old, new, strict=False):
        if a != b:
            break
        same += 1
    return round(same / len(new), 3)
