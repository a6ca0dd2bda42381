"""Engine ring: the audio path never waits for Whisper. While a decode runs
(here held on purpose, a fault injected), the VAD keeps taking audio and its
events come out at once; optional decodes (interim, speculative) do not pile
up: one waits at most and decodes the newest audio when it starts; the final
is always decoded; interims decode a bounded window."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from services.asr.engine import SAMPLE_RATE_HZ
from services.asr.streaming import (
    INTERIM_WINDOW_MS,
    WINDOW,
    EndOfUtterance,
    Result,
    SpeechStarted,
    StreamingRecognizer,
    StreamOptions,
)
from tests.asr_engine_test import feed_in_chunks, stream_options
from tests.speech import SENTENCES, VOICES, silence, speech_end_s, word_error_rate

CHUNK = SAMPLE_RATE_HZ * 20 // 1000  # a device's 20 ms chunk


def options(**overrides: object) -> StreamOptions:
    """The engine tests' stream options, with speculation and a final beam as the gateway asks."""
    settings: dict[str, object] = dict(
        silence_timeout_s=30.0, speculative_results=True, final_beam_size=5
    )
    return stream_options(**{**settings, **overrides})


@dataclass
class Decodes:
    """The real engine, with every decode it is asked for written down; while
    `held` is set, a decode that starts waits for `release` (a slow host)."""

    engine: object
    calls: list[tuple[str, int]] = field(default_factory=list)  # (kind, samples decoded)
    held: bool = False
    started: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def __getattr__(self, name: str) -> object:
        return getattr(self.engine, name)

    def transcribe_utterance(self, audio, language, prompt, beam_size=0, kind="final"):  # type: ignore[no-untyped-def]
        self.calls.append((kind, len(audio)))
        self.started.set()
        if self.held:
            assert self.release.wait(60)
        return self.engine.transcribe_utterance(audio, language, prompt, beam_size, kind)  # type: ignore[attr-defined]

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.calls]


def feed(recognizer: StreamingRecognizer, audio: np.ndarray) -> list[list[object]]:
    """Every chunk as soon as the last was taken; what each `accept` returned."""
    return [recognizer.accept(audio[s : s + CHUNK]) for s in range(0, len(audio), CHUNK)]


def test_events_come_out_while_a_decode_is_held_and_the_final_follows(asr_engine) -> None:
    decodes = Decodes(asr_engine, held=True)
    recognizer = StreamingRecognizer(decodes, options())  # type: ignore[arg-type]
    lead_in, speech = silence(0.4), VOICES["piper"](SENTENCES[2])
    returned = feed(recognizer, np.concatenate([lead_in, speech, silence(1.0)]))
    assert decodes.started.wait(30), "the first interim was asked for"
    # The whole clip went through the VAD while the first decode could not finish:
    # speech start and end of utterance were given by the very calls that fed them.
    started_at = next(
        i for i, out in enumerate(returned) if any(isinstance(o, SpeechStarted) for o in out)
    )
    ended_at = next(
        i for i, out in enumerate(returned) if any(isinstance(o, EndOfUtterance) for o in out)
    )
    assert started_at * CHUNK < len(lead_in) + 0.3 * SAMPLE_RATE_HZ
    assert ended_at * CHUNK < len(lead_in) + len(speech) + 1.0 * SAMPLE_RATE_HZ
    assert not any(isinstance(o, Result) for out in returned for o in out)
    # Nothing piled up behind the held decode: the final only, ahead of anything optional.
    decodes.held = False
    decodes.release.set()
    later = recognizer.wait(120)
    results = [o for o in later if isinstance(o, Result)]
    assert decodes.kinds() == ["interim", "final"], decodes.kinds()
    assert recognizer.deferred["interim"] + recognizer.deferred["speculative"] >= 1
    # The held interim still shows, between the end of the utterance (already out)
    # and the final that waited for it.
    assert [r.is_final for r in results] == [False, True]
    assert results[0].end_ms < results[1].end_ms
    assert word_error_rate([SENTENCES[2]], [results[1].text]) <= 0.3
    assert recognizer.finished is False  # the stream goes on: it was not finished
    recognizer.finish()
    assert recognizer.finished
    recognizer.close()


def test_an_interim_put_off_decodes_the_newest_audio_once(asr_engine) -> None:
    decodes = Decodes(asr_engine, held=True)
    speech = VOICES["piper"](SENTENCES[2])
    lead_in = silence(0.4)
    recognizer = StreamingRecognizer(
        decodes,  # type: ignore[arg-type]
        options(speculative_results=False, interim_interval_ms=300),
    )
    audio = np.concatenate([lead_in, speech, silence(1.0)])
    # The first interim falls due and is held (waited for: on a busy host the
    # decoder thread may start it late, and it would then decode all there is)...
    first_part = len(lead_in) + int(0.6 * SAMPLE_RATE_HZ)
    feed(recognizer, audio[:first_part])
    assert decodes.started.wait(30)
    # ...then the rest of 1.8 s of speech goes in while it is held...
    fed_until = len(lead_in) + int(1.8 * SAMPLE_RATE_HZ)
    feed(recognizer, audio[first_part:fed_until])
    decodes.held = False
    decodes.release.set()
    recognizer.wait(60)
    interims = [n for kind, n in decodes.calls if kind == "interim"]
    # ...then the one interim that waited decodes everything heard by then, once.
    assert len(interims) == 2, decodes.calls
    assert fed_until - 0.35 * SAMPLE_RATE_HZ <= interims[1] <= fed_until + 2 * WINDOW
    assert recognizer.deferred["interim"] >= 3
    outputs = feed_in_chunks(recognizer, audio[fed_until:])
    assert [o.is_final for o in outputs if isinstance(o, Result)][-1]
    recognizer.close()


def test_interims_decode_a_bounded_window_and_the_final_the_whole_utterance(
    asr_engine,
) -> None:
    decodes = Decodes(asr_engine)
    recognizer = StreamingRecognizer(
        decodes,  # type: ignore[arg-type]
        options(
            interim_interval_ms=2000, speculative_results=False, end_of_utterance_silence_ms=1500
        ),
    )
    # One long utterance: sentences back to back, the short gaps inside it kept.
    speech = np.concatenate([VOICES["piper"](s) for s in SENTENCES])
    assert len(speech) > 1.3 * INTERIM_WINDOW_MS * SAMPLE_RATE_HZ // 1000
    outputs = feed_in_chunks(recognizer, np.concatenate([silence(0.4), speech, silence(2.0)]))
    window = INTERIM_WINDOW_MS * SAMPLE_RATE_HZ // 1000
    interims = [n for kind, n in decodes.calls if kind == "interim"]
    # The final is the last decode of the whole utterance (a guess at its last pause, or
    # a decode at its end).
    whole = [n for kind, n in decodes.calls if kind != "interim"]
    assert interims and max(interims) == window, interims
    assert whole and whole[-1] > window
    final = [o for o in outputs if isinstance(o, Result) and o.is_final]
    assert len(final) == 1 and word_error_rate([" ".join(SENTENCES)], [final[0].text]) <= 0.2
    recognizer.close()


def test_a_guess_being_decoded_at_the_end_of_the_utterance_becomes_its_final(
    asr_engine,
) -> None:
    decodes = Decodes(asr_engine)
    recognizer = StreamingRecognizer(
        decodes,  # type: ignore[arg-type]
        options(interim_results=False, speculative_results=True),
    )
    lead_in, speech = silence(0.4), VOICES["piper"](SENTENCES[3])
    # Cut while the voice still sounds: the pause (and the guess at it) comes below.
    speech = speech[: int((speech_end_s(speech) - 0.03) * SAMPLE_RATE_HZ)]
    feed_in_chunks(recognizer, np.concatenate([lead_in, speech]))
    decodes.calls.clear()
    decodes.started.clear()
    decodes.held = True  # the guess at the pause is slow: the end of utterance comes first
    returned = feed(recognizer, silence(0.2))
    assert decodes.started.wait(30), "a guess is made at the pause"
    returned += feed(recognizer, silence(0.8))
    assert any(isinstance(o, EndOfUtterance) for out in returned for o in out)
    decodes.held = False
    decodes.release.set()
    results = [o for o in recognizer.wait(60) if isinstance(o, Result)]
    # One decode served both: no second decode of the same audio for the final.
    assert decodes.kinds() == ["speculative"], decodes.kinds()
    assert [r.is_final for r in results] == [True]
    assert word_error_rate([SENTENCES[3]], [results[0].text]) <= 0.3
    recognizer.close()
