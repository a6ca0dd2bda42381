"""Engine ring: a stream that falls behind real time does not make it worse.
The optional decodes (interim, speculative) are put off while audio is
already waiting, and done once, on the newest audio, when the stream has
caught up; interims decode a bounded window; the final is always decoded."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from services.asr.engine import SAMPLE_RATE_HZ
from services.asr.streaming import (
    INTERIM_WINDOW_MS,
    WINDOW,
    Result,
    StreamingRecognizer,
    StreamOptions,
)
from tests.asr_engine_test import stream_options
from tests.speech import SENTENCES, VOICES, silence, word_error_rate

CHUNK = SAMPLE_RATE_HZ * 20 // 1000  # a device's 20 ms chunk


def options(**overrides: object) -> StreamOptions:
    """The engine tests' stream options, with speculation and a final beam as the gateway asks."""
    settings: dict[str, object] = dict(
        silence_timeout_s=30.0, speculative_results=True, final_beam_size=5
    )
    return stream_options(**{**settings, **overrides})


@dataclass
class Decodes:
    """The real engine, with every decode it is asked for written down."""

    engine: object
    calls: list[tuple[str, int]] = field(default_factory=list)  # (kind, samples decoded)

    def __getattr__(self, name: str) -> object:
        return getattr(self.engine, name)

    def transcribe_utterance(self, audio, language, prompt, beam_size=0, kind="final"):  # type: ignore[no-untyped-def]
        self.calls.append((kind, len(audio)))
        return self.engine.transcribe_utterance(audio, language, prompt, beam_size, kind)  # type: ignore[attr-defined]

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.calls]


def feed(recognizer: StreamingRecognizer, audio: np.ndarray, fed: list[int]) -> list:  # type: ignore[type-arg]
    outputs = []
    for start in range(0, len(audio), CHUNK):
        fed[0] = start + CHUNK
        outputs.extend(recognizer.accept(audio[start : start + CHUNK]))
    return outputs


def test_a_stream_behind_real_time_skips_interims_and_guesses_but_not_the_final(
    asr_engine,
) -> None:
    decodes = Decodes(asr_engine)
    # Audio is always waiting: the host never lets this stream catch up.
    recognizer = StreamingRecognizer(decodes, options(), waiting=lambda: 3)  # type: ignore[arg-type]
    audio = np.concatenate([silence(0.4), VOICES["piper"](SENTENCES[2]), silence(1.0)])
    outputs = feed(recognizer, audio, [0])
    results = [o for o in outputs if isinstance(o, Result)]
    assert decodes.kinds() == ["final"]
    # Put off once per utterance, not once per interval: nothing piles up.
    assert recognizer.deferred == {"interim": 1, "speculative": 1}
    assert [r.is_final for r in results] == [True]
    assert word_error_rate([SENTENCES[2]], [results[0].text]) <= 0.3


def test_a_stream_that_catches_up_decodes_once_on_the_newest_audio(asr_engine) -> None:
    decodes = Decodes(asr_engine)
    speech = VOICES["piper"](SENTENCES[2])
    lead_in = silence(0.4)
    # Behind until 1.8 s of speech have been fed, then keeping up.
    caught_up_at = len(lead_in) + int(1.8 * SAMPLE_RATE_HZ)
    fed = [0]
    recognizer = StreamingRecognizer(
        decodes,  # type: ignore[arg-type]
        options(speculative_results=False),
        waiting=lambda: 1 if fed[0] < caught_up_at else 0,
    )
    outputs = feed(recognizer, np.concatenate([lead_in, speech, silence(1.0)]), fed)
    interims = [(kind, n) for kind, n in decodes.calls if kind == "interim"]
    assert interims, "a stream that keeps up gets interims"
    # The first interim decodes everything heard up to the moment it caught up...
    first = interims[0][1]
    assert caught_up_at - 0.5 * SAMPLE_RATE_HZ <= first <= caught_up_at + 2 * WINDOW
    # ...once: the ones put off were not queued up behind it.
    assert recognizer.deferred["interim"] == 1
    assert all(b - a >= 0.45 * SAMPLE_RATE_HZ for (_, a), (_, b) in itertools.pairwise(interims))
    assert [o.is_final for o in outputs if isinstance(o, Result)][-1]


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
    outputs = feed(recognizer, np.concatenate([silence(0.4), speech, silence(2.0)]), [0])
    window = INTERIM_WINDOW_MS * SAMPLE_RATE_HZ // 1000
    interims = [n for kind, n in decodes.calls if kind == "interim"]
    # The final is the last decode of the whole utterance (a guess at its last pause, or
    # a decode at its end).
    whole = [n for kind, n in decodes.calls if kind != "interim"]
    assert interims and max(interims) == window, interims
    assert whole and whole[-1] > window
    final = [o for o in outputs if isinstance(o, Result) and o.is_final]
    assert len(final) == 1 and word_error_rate([" ".join(SENTENCES)], [final[0].text]) <= 0.2
