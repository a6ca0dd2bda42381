"""Live recognition of one stream: VAD-gated utterances, interim and final
results, end-of-utterance and silence-timeout events. Plain Python; the
servicer feeds it 16 kHz float audio and forwards what it returns.

Real time: the audio path never waits for Whisper. `accept` runs only the
VAD (well under a millisecond per 32 ms window), so speech-started and
end-of-utterance events leave as soon as the audio that decides them has
come, however long a decode takes or however busy the host is. Decodes run
on the stream's own decoder thread: the final of an utterance always, ahead
of anything optional; the optional ones (interim, speculative) never queue up
behind each other: one waits at most, the newest asked for, and it decodes
the newest audio when it starts. An interim decodes at most the last
INTERIM_WINDOW_MS of its utterance, so its cost stays flat however long the
utterance grows; the final decodes the whole of it.

Order: results are given in stream order. An end of utterance is followed by
its final; anything the VAD decides after that (the next utterance's start)
waits behind the final until it is decoded. An interim that was decoding when
its utterance ended comes between the two (on a busy host it can be the only
interim a short utterance gets, and the final waited for it anyway); a guess
decoded after the end was decided is not shown: it fills the final instead.

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
"""

from __future__ import annotations

import threading
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
    "Optional decodes (interim, speculative) never made because the stream's decoder "
    "was busy and a newer one replaced them, or the utterance ended first.",
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


@dataclass(eq=False)
class _Utterance:
    index: int
    start_sample: int  # first sample of the audio kept (pre-roll included)
    onset_sample: int  # where the VAD heard speech begin; reported as start_ms
    audio: list[np.ndarray] = field(default_factory=list)
    samples: int = 0
    last_speech_end: int = 0  # absolute sample index just past the last speech window
    speech_since_interim_ms: int = 0
    silence_ms: int = 0
    # Decoder side (under the recognizer's lock):
    final: _FinalSlot | None = None  # asked for: nothing optional of it is shown any more
    speculative: tuple[int, UtteranceText] | None = None  # (last_speech_end it covered, text)
    speculating: int | None = None  # last_speech_end of a guess being decoded now
    last_interim: str = ""
    language: str | None = None  # held once detected on enough audio

    def append(self, window: np.ndarray) -> None:
        self.audio.append(window)
        self.samples += len(window)

    def joined(self, end_sample: int | None = None) -> np.ndarray:
        pieces = list(self.audio)  # a snapshot: the audio path appends while a decode reads
        audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        if end_sample is not None:
            audio = audio[: max(0, end_sample - self.start_sample)]
        return audio


@dataclass(eq=False)  # found in the outputs by identity
class _FinalSlot:
    """The place of an utterance's final among the outputs, filled once decoded."""

    utterance: _Utterance
    end_sample: int  # the audio the final covers
    decided: float  # time.perf_counter() of the end-of-utterance decision
    result: Result | None = None


@dataclass
class _Job:
    kind: str  # "interim", "speculative" or "final"
    utterance: _Utterance
    speech_end: int = 0  # speculative: the last_speech_end it covers


class StreamingRecognizer:
    """State of one live stream. `accept` and `finish` run the VAD only and
    never wait for a decode; what they return is what is ready by then. Results
    decoded later are taken with `take` (`on_ready` is called, from the decoder
    thread, whenever there is something to take) or `wait`. `finished`: nothing
    more will come. `close` stops the decoder thread."""

    def __init__(
        self,
        engine: WhisperEngine,
        options: StreamOptions,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        assert engine.vad_session is not None
        self.engine = engine
        self.options = options
        self._on_ready = on_ready or (lambda: None)
        #: Optional decodes never made (replaced by a newer one, or their utterance ended).
        self.deferred: dict[str, int] = {"interim": 0, "speculative": 0}
        self._vad = VadStream(engine.vad_session)
        self._pending = np.zeros(0, dtype=np.float32)
        self._samples_seen = 0
        self._preroll: deque[np.ndarray] = deque(maxlen=PREROLL_MS // WINDOW_MS)
        self._speech_run: list[np.ndarray] = []
        self._utterance: _Utterance | None = None
        self._idle_ms = 0
        self._utterance_index = 0
        self.done = False  # no more audio is taken
        # Shared with the decoder thread:
        self._lock = threading.Condition()
        self._outputs: deque[StreamOutput | _FinalSlot] = deque()
        self._finals_wanted: deque[_Job] = deque()
        self._optional: _Job | None = None
        self._decoding = False
        self._closed = False
        self._final_texts: list[str] = []
        self._last_language: str | None = None  # the previous utterance's held language
        self._decoder: threading.Thread | None = None
        self._failure: BaseException | None = None  # a decode that failed ends the stream

    @property
    def audio_ms(self) -> int:
        return self._samples_seen * 1000 // SAMPLE_RATE_HZ

    # ---- the audio path (the caller's thread) ----------------------------------------
    def accept(self, audio: np.ndarray) -> list[StreamOutput]:
        """Feed 16 kHz mono float samples; returns what is ready, in order."""
        if not self.done:
            buffered = np.concatenate([self._pending, audio]) if len(self._pending) else audio
            whole = len(buffered) // WINDOW * WINDOW
            self._pending = buffered[whole:].copy()
            for start in range(0, whole, WINDOW):
                self._step(buffered[start : start + WINDOW])
                if self.done:
                    break
        return self.take()

    def finish(self) -> list[StreamOutput]:
        """The client stopped sending: the utterance in progress becomes final."""
        if not self.done:
            if self._utterance is not None:
                self._utterance.last_speech_end = self._samples_seen
                self._end_utterance(EndOfUtterance(self.audio_ms))
            self.stop()
        return self.take()

    def take(self) -> list[StreamOutput]:
        """The outputs ready now, in stream order (a final still decoding holds back
        what comes after it)."""
        ready: list[StreamOutput] = []
        with self._lock:
            if self._failure is not None:
                raise self._failure
            while self._outputs:
                head = self._outputs[0]
                if isinstance(head, _FinalSlot):
                    if head.result is None:
                        break
                    ready.append(head.result)
                else:
                    ready.append(head)
                self._outputs.popleft()
        return ready

    def wait(self, timeout: float | None = None) -> list[StreamOutput]:
        """Waits until the decoder has nothing to do, then takes what is ready."""
        with self._lock:
            self._lock.wait_for(
                lambda: (
                    self._closed or not (self._decoding or self._finals_wanted or self._optional)
                ),
                timeout,
            )
        return self.take()

    @property
    def finished(self) -> bool:
        """No more audio is taken and every output has been taken."""
        with self._lock:
            return self.done and not self._outputs and not self._finals_wanted

    def stop(self) -> None:
        """No more audio is taken; an optional decode not yet started is dropped."""
        with self._lock:
            self.done = True
            if self._optional is not None:
                self._drop_optional()
            self._lock.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def _emit(self, output: StreamOutput | _FinalSlot) -> None:
        with self._lock:
            self._outputs.append(output)

    def _step(self, window: np.ndarray) -> None:
        probability = self._vad.speech_probability(window)
        self._samples_seen += len(window)
        if self._utterance is None:
            self._idle_step(window, probability)
        else:
            self._speech_step(window, probability)

    def _idle_step(self, window: np.ndarray, probability: float) -> None:
        if probability >= self.options.vad_threshold:
            self._speech_run.append(window)
            if len(self._speech_run) * WINDOW_MS >= MIN_SPEECH_MS:
                audio = [*self._preroll, *self._speech_run]
                start = self._samples_seen - sum(len(a) for a in audio)
                onset = self._samples_seen - len(self._speech_run) * WINDOW
                utterance = _Utterance(self._utterance_index, start, onset)
                self._utterance_index += 1
                for piece in audio:
                    utterance.append(piece)
                utterance.last_speech_end = self._samples_seen
                utterance.speech_since_interim_ms = len(self._speech_run) * WINDOW_MS
                self._utterance = utterance
                self._preroll.clear()
                self._speech_run = []
                self._idle_ms = 0
                self._emit(SpeechStarted(onset * 1000 // SAMPLE_RATE_HZ))
            return
        for earlier in self._speech_run:
            self._preroll.append(earlier)
        self._speech_run = []
        self._preroll.append(window)
        self._idle_ms += WINDOW_MS
        if self._idle_ms >= self.options.silence_timeout_s * 1000:
            self._emit(SilenceTimeout(self.audio_ms))
            self.stop()

    def _speech_step(self, window: np.ndarray, probability: float) -> None:
        utterance = self._utterance
        assert utterance is not None
        utterance.append(window)
        options = self.options
        # Hysteresis as in Silero's own segmenter: speech continues down to threshold - 0.15.
        if probability >= options.vad_threshold - 0.15:
            if utterance.silence_ms:
                self._pause_over()
            utterance.silence_ms = 0
            utterance.last_speech_end = self._samples_seen
            utterance.speech_since_interim_ms += WINDOW_MS
            if (
                options.interim_results
                and utterance.speech_since_interim_ms >= options.interim_interval_ms
                and self._language_known_by(utterance)
            ):
                utterance.speech_since_interim_ms = 0
                self._want(_Job("interim", utterance))
        else:
            utterance.silence_ms += WINDOW_MS
            if utterance.silence_ms == SPECULATE_AFTER_MS // WINDOW_MS * WINDOW_MS:
                self._want(_Job("speculative", utterance, utterance.last_speech_end))
            if utterance.silence_ms >= options.end_of_utterance_silence_ms:
                self._end_utterance(EndOfUtterance(self.audio_ms))
                return
        if utterance.samples >= options.max_utterance_s * SAMPLE_RATE_HZ:
            # Whisper sees 30 s at most: finalise here and carry straight on.
            utterance.last_speech_end = self._samples_seen
            self._end_utterance(None)
            if not self.done:
                self._utterance = _Utterance(
                    self._utterance_index,
                    self._samples_seen,
                    self._samples_seen,
                    last_speech_end=self._samples_seen,
                )
                self._utterance_index += 1

    def _language_known_by(self, utterance: _Utterance) -> bool:
        """An interim falls due only once it can say which language it is in: a
        language asked for, the last utterance's, or LANGUAGE_MIN_MS of audio to
        detect it on (so a short question's one interim comes as soon as it can,
        not at the next interval)."""
        if self.options.language is not None:
            return True
        if utterance.samples >= LANGUAGE_MIN_MS * SAMPLE_RATE_HZ // 1000:
            return True
        with self._lock:
            return self._last_language is not None

    def _end_utterance(self, event: EndOfUtterance | None) -> None:
        """The event, then the utterance's final in its place: from the guess that
        covers it, from the guess being decoded now, or from a decode of its own."""
        utterance = self._utterance
        assert utterance is not None
        end = min(
            utterance.start_sample + utterance.samples,
            utterance.last_speech_end + TAIL_MS * SAMPLE_RATE_HZ // 1000,
        )
        slot = _FinalSlot(utterance, end, time.perf_counter())
        with self._lock:
            if event is not None:
                self._outputs.append(event)
            self._outputs.append(slot)
            utterance.final = slot
            if self._optional is not None and self._optional.utterance is utterance:
                self._drop_optional()
            guess = utterance.speculative
            if guess is not None and guess[0] == utterance.last_speech_end:
                self._fill_final(slot, guess[1])
            elif utterance.speculating != utterance.last_speech_end:
                self._finals_wanted.append(_Job("final", utterance))
                self._start_decoder()
            # else: the guess being decoded covers it and fills the slot when done.
            self._lock.notify_all()
        self._utterance = None
        self._idle_ms = 0
        if self.options.single_utterance:
            self.stop()

    def _want(self, job: _Job) -> None:
        """An optional decode: it replaces the one waiting, if any."""
        with self._lock:
            if self._optional is not None:
                if self._optional.kind == "speculative" and job.kind == "interim":
                    return  # the guess is worth more than an interim of the same audio
                self._drop_optional()
            self._optional = job
            self._start_decoder()
            self._lock.notify_all()

    def _pause_over(self) -> None:
        """Speech again: a guess at the pause that has not started is not worth making."""
        with self._lock:
            waiting = self._optional
            if waiting is not None and waiting.kind == "speculative":
                self._drop_optional()

    def _drop_optional(self) -> None:
        assert self._optional is not None
        kind = self._optional.kind
        self.deferred[kind] += 1
        DEFERRED.labels(kind).inc()
        self._optional = None

    def _start_decoder(self) -> None:
        if self._decoder is None:
            self._decoder = threading.Thread(
                target=self._decode_loop, name="asr-stream-decoder", daemon=True
            )
            self._decoder.start()

    # ---- the decoder thread -------------------------------------------------------------
    def _decode_loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(
                    lambda: (
                        self._closed
                        or self.done
                        or bool(self._finals_wanted)
                        or self._optional is not None
                    )
                )
                if self._closed or not (self._finals_wanted or self._optional):
                    return  # closed, or the stream is over and nothing is left to decode
                optional, self._optional = self._optional, None
                if self._finals_wanted:
                    job = self._finals_wanted.popleft()
                    self._optional = optional  # still wanted, after the final
                else:
                    assert optional is not None
                    job = optional
                self._decoding = True
                if job.kind == "speculative":
                    job.utterance.speculating = job.speech_end
            try:
                self._run(job)
            except Exception as error:  # the caller hears of it at its next take()
                with self._lock:
                    self._failure = error
                    self._closed = True
            finally:
                with self._lock:
                    self._decoding = False
                    job.utterance.speculating = None
                    self._lock.notify_all()
            self._on_ready()

    def _run(self, job: _Job) -> None:
        utterance = job.utterance
        if job.kind == "final":
            assert utterance.final is not None
            decoded = self._decode(utterance, utterance.joined(utterance.final.end_sample), "final")
            assert decoded is not None  # only interims are ever skipped
            with self._lock:
                self._fill_final(utterance.final, decoded)
        elif job.kind == "speculative":
            audio = utterance.joined()
            decoded = self._decode(utterance, audio, "speculative")
            assert decoded is not None
            with self._lock:
                utterance.speculative = (job.speech_end, decoded)
                slot = utterance.final
                if slot is not None:
                    if slot.result is None and utterance.last_speech_end == job.speech_end:
                        self._fill_final(slot, decoded)
                    return
                if utterance.last_speech_end != job.speech_end:
                    return  # speech went on while it decoded: the guess is stale
                # A guess on a short fragment (the VAD dipped inside a word) may be in a
                # language detected on too little audio: shown as an interim only once the
                # language is known. A caller that asked for guesses gets it anyway, since
                # the final would say the same.
                options = self.options
                known = options.language or utterance.language or self._last_language
                if options.speculative_results or (options.interim_results and known):
                    self._emit_interim(utterance, decoded, len(audio), speculative=True)
        else:
            audio = utterance.joined()
            recent = audio[-INTERIM_WINDOW_MS * SAMPLE_RATE_HZ // 1000 :]
            decoded = self._decode(utterance, recent, "interim")
            if decoded is not None:
                with self._lock:
                    slot = utterance.final
                    if slot is None:
                        self._emit_interim(utterance, decoded, len(audio))
                    elif slot.result is None:
                        self._emit_interim(utterance, decoded, len(audio), before=slot)

    def _prompt(self) -> str:
        with self._lock:
            context = " ".join([self.options.initial_prompt, *self._final_texts[-3:]]).strip()
        return context[-600:]

    def _decode(self, utterance: _Utterance, audio: np.ndarray, kind: str) -> UtteranceText | None:
        """Greedy for interims, `final_beam_size` for what the caller acts on.
        None: an interim too short to be sure of an undetected language."""
        options = self.options
        beam = options.beam_size if kind == "interim" else options.final_beam_size
        with self._lock:
            language = options.language or utterance.language
            last_language = self._last_language
        enough = len(audio) >= LANGUAGE_MIN_MS * SAMPLE_RATE_HZ // 1000
        if language is None and not enough:
            if last_language is None and kind == "interim":
                return None
            language = last_language
        decoded = self.engine.transcribe_utterance(
            audio, language, self._prompt(), beam or options.beam_size, kind=kind
        )
        with self._lock:
            if options.language is None and utterance.language is None and enough:
                utterance.language = decoded.language
        return decoded

    def _emit_interim(
        self,
        utterance: _Utterance,
        decoded: UtteranceText,
        samples: int,
        speculative: bool = False,
        before: _FinalSlot | None = None,
    ) -> None:
        """Under the lock. `samples`: how much of the utterance the decode heard;
        `before`: the final it must come ahead of (it is appended otherwise)."""
        text = clean_text(decoded)
        # A speculative result is sent even when it repeats the last interim: it
        # is the caller's signal that the final will say this, if the pause lasts.
        if not text or (text == utterance.last_interim and not speculative):
            return
        stability = prefix_agreement(utterance.last_interim, text)
        utterance.last_interim = text
        result = Result(
            text=text,
            is_final=False,
            language=decoded.language,
            start_ms=utterance.onset_sample * 1000 // SAMPLE_RATE_HZ,
            end_ms=(utterance.start_sample + samples) * 1000 // SAMPLE_RATE_HZ,
            utterance_index=utterance.index,
            stability=stability,
            no_speech_probability=decoded.no_speech_probability,
            speculative=speculative,
        )
        if before is None:
            self._outputs.append(result)
        else:
            self._outputs.insert(self._outputs.index(before), result)

    def _fill_final(self, slot: _FinalSlot, decoded: UtteranceText) -> None:
        """Under the lock."""
        utterance = slot.utterance
        text = clean_text(decoded)
        slot.result = Result(
            text=text,
            is_final=True,
            language=decoded.language,
            start_ms=utterance.onset_sample * 1000 // SAMPLE_RATE_HZ,
            end_ms=utterance.last_speech_end * 1000 // SAMPLE_RATE_HZ,
            utterance_index=utterance.index,
            stability=1.0,
            no_speech_probability=decoded.no_speech_probability,
        )
        if text:
            self._final_texts.append(text)
            if self.options.language is None:
                self._last_language = utterance.language or decoded.language
        ENDPOINT_TO_FINAL_SECONDS.observe(time.perf_counter() - slot.decided)


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
