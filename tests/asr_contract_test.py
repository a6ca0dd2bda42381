"""Contract ring: the real AsrService in-process on a free port, called
through a real gRPC channel."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from talker.v1 import asr_pb2, audio_pb2
from tests.processes import free_port
from tests.speech import SENTENCES, VOICES, silence, to_s16le, to_wav, word_error_rate

S16 = audio_pb2.AUDIO_ENCODING_PCM_S16LE
F32 = audio_pb2.AUDIO_ENCODING_PCM_F32LE
WAV = audio_pb2.AUDIO_ENCODING_WAV


def recognize(stub, audio: bytes, encoding: int, rate: int = 0, channels: int = 0, **config):  # type: ignore[no-untyped-def]
    return stub.Recognize(
        asr_pb2.RecognizeRequest(
            format=audio_pb2.AudioFormat(encoding=encoding, sample_rate_hz=rate, channels=channels),
            audio=audio,
            config=asr_pb2.RecognitionConfig(**config),
        ),
        timeout=60,
    )


def stream_requests(
    audio: bytes, config: asr_pb2.StreamingRecognitionConfig, chunk_bytes: int, pace_s: float = 0
) -> Iterator[asr_pb2.StreamingRecognizeRequest]:
    yield asr_pb2.StreamingRecognizeRequest(config=config)
    for start in range(0, len(audio), chunk_bytes):
        yield asr_pb2.StreamingRecognizeRequest(audio=audio[start : start + chunk_bytes])
        if pace_s:
            time.sleep(pace_s)


def test_recognize_wav_at_44k_reports_text_language_and_segments(asr_stub) -> None:
    sentence = SENTENCES[1]
    audio = VOICES["piper"](sentence, rate_hz=44_100)
    response = recognize(asr_stub, to_wav(audio, 44_100), WAV)
    assert word_error_rate([sentence], [response.text]) <= 0.15
    assert response.language == "en"
    assert response.segments and response.segments[-1].end_ms <= response.audio_duration_ms
    assert abs(response.audio_duration_ms - len(audio) / 44.1) < 50


def test_recognize_raw_stereo_float_with_word_times(asr_stub) -> None:
    sentence = SENTENCES[0]
    mono = VOICES["espeak"](sentence, rate_hz=22_050)
    stereo = np.stack([mono, mono], axis=1).astype("<f4").tobytes()
    response = recognize(asr_stub, stereo, F32, 22_050, 2, language="en", word_timestamps=True)
    assert word_error_rate([sentence], [response.text]) <= 0.15
    words = [w for s in response.segments for w in s.words]
    assert len(words) >= 8 and all(w.end_ms >= w.start_ms for w in words)


def test_trace_id_is_echoed_in_response_headers(asr_stub) -> None:
    audio = to_s16le(VOICES["piper"]("Hello there."))
    request = asr_pb2.RecognizeRequest(
        format=audio_pb2.AudioFormat(encoding=S16, sample_rate_hz=16_000), audio=audio
    )
    _, call = asr_stub.Recognize.with_call(request, metadata=[("x-trace-id", "trace-abc123")])
    assert ("x-trace-id", "trace-abc123") in call.initial_metadata()
    _, call = asr_stub.Recognize.with_call(request, metadata=[("x-trace-id", "../../etc/passwd")])
    made = dict(call.initial_metadata())["x-trace-id"]
    assert made != "../../etc/passwd" and len(made) == 32


def test_stream_of_20ms_chunks_gives_interims_end_of_utterance_and_final(asr_stub) -> None:
    # Six utterances, Piper and espeak-ng in turn: the WER bar is for the whole
    # stream, as in the engine tests (one sentence alone is too few words).
    voices = ["piper", "espeak"] * 3
    pieces = [silence(0.3)]
    for voice, sentence in zip(voices, SENTENCES, strict=True):
        pieces += [VOICES[voice](sentence), silence(1.2)]
    config = asr_pb2.StreamingRecognitionConfig(
        format=audio_pb2.AudioFormat(encoding=S16, sample_rate_hz=16_000),
        config=asr_pb2.RecognitionConfig(language="en"),
        interim_results=True,
    )
    audio = to_s16le(np.concatenate(pieces))
    # At a device's pace: audio sent faster than real time is always waiting, and a
    # stream behind real time skips its interims (tests/asr_realtime_engine_test.py).
    responses = list(
        asr_stub.StreamingRecognize(stream_requests(audio, config, 640, 0.02), timeout=120)
    )
    events = [r.event.type for r in responses if r.WhichOneof("response") == "event"]
    results = [r.result for r in responses if r.WhichOneof("response") == "result"]
    finals = [r for r in results if r.is_final]
    assert any(not r.is_final for r in results), "no interim results"
    assert events.count(asr_pb2.SPEECH_EVENT_TYPE_SPEECH_STARTED) == len(SENTENCES)
    assert events.count(asr_pb2.SPEECH_EVENT_TYPE_END_OF_UTTERANCE) == len(SENTENCES)
    assert [f.utterance_index for f in finals] == list(range(len(SENTENCES)))
    wer = word_error_rate(SENTENCES, [f.text for f in finals])
    print(f"streaming WER {wer:.3f}", *[f.text for f in finals], sep="\n")
    assert wer <= 0.15


def test_stream_at_48k_is_resampled_and_half_close_flushes(asr_stub) -> None:
    sentence = SENTENCES[3]
    audio = VOICES["piper"](sentence, rate_hz=48_000)  # no trailing silence: half-close ends it
    config = asr_pb2.StreamingRecognitionConfig(
        format=audio_pb2.AudioFormat(encoding=S16, sample_rate_hz=48_000),
        config=asr_pb2.RecognitionConfig(language="auto"),
    )
    responses = list(
        asr_stub.StreamingRecognize(stream_requests(to_s16le(audio), config, 3_000), timeout=60)
    )
    finals = [r.result for r in responses if r.result.is_final]
    assert len(finals) == 1 and finals[0].language == "en"
    assert word_error_rate([sentence], [finals[0].text]) <= 0.15


def test_silent_stream_times_out_with_an_event(asr_stub) -> None:
    config = asr_pb2.StreamingRecognitionConfig(
        format=audio_pb2.AudioFormat(encoding=S16, sample_rate_hz=16_000), silence_timeout_s=1
    )
    responses = list(
        asr_stub.StreamingRecognize(stream_requests(to_s16le(silence(5)), config, 640), timeout=30)
    )
    assert [r.event.type for r in responses] == [asr_pb2.SPEECH_EVENT_TYPE_SILENCE_TIMEOUT]


def test_stream_that_sends_nothing_times_out_in_wall_time(asr_stub) -> None:
    config = asr_pb2.StreamingRecognitionConfig(
        format=audio_pb2.AudioFormat(encoding=S16, sample_rate_hz=16_000), silence_timeout_s=1
    )

    def config_then_wait():  # type: ignore[no-untyped-def]
        yield asr_pb2.StreamingRecognizeRequest(config=config)
        time.sleep(3)

    started = time.monotonic()
    responses = list(asr_stub.StreamingRecognize(config_then_wait(), timeout=30))
    assert [r.event.type for r in responses] == [asr_pb2.SPEECH_EVENT_TYPE_SILENCE_TIMEOUT]
    assert time.monotonic() - started < 2.9


# ---- bad input: each gets its sentence, and the service keeps serving ---------------


def stream_error(asr_stub, requests: list[asr_pb2.StreamingRecognizeRequest]) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as raised:
        list(asr_stub.StreamingRecognize(iter(requests), timeout=30))
    return raised.value


S16_CONFIG = asr_pb2.StreamingRecognitionConfig(
    format=audio_pb2.AudioFormat(encoding=S16, sample_rate_hz=16_000)
)
BAD_CLIPS = {
    "unknown encoding": (dict(encoding=9, rate=16_000), b"\0\0" * 100, "encoding"),
    "unspecified encoding": (
        dict(encoding=0, rate=16_000),
        b"\0\0" * 100,
        "AUDIO_ENCODING_UNSPECIFIED",
    ),
    "rate 0": (dict(encoding=S16, rate=0), b"\0\0" * 100, "sample_rate_hz is 0"),
    "absurd rate": (
        dict(encoding=S16, rate=10_000_000),
        b"\0\0" * 100,
        "sample_rate_hz is 10000000",
    ),
    "odd byte count": (dict(encoding=S16, rate=16_000), b"\0" * 301, "301 bytes"),
    "empty audio": (dict(encoding=S16, rate=16_000), b"", "empty"),
    "not audio": (
        dict(encoding=WAV),
        b"<html>this is not a wav file</html>" * 20,
        "could not be read",
    ),
    "NaN floats": (dict(encoding=F32, rate=16_000), np.full(1600, np.nan, "<f4").tobytes(), "NaN"),
    "inf floats": (
        dict(encoding=F32, rate=16_000),
        np.full(1600, np.inf, "<f4").tobytes(),
        "NaN or infinite",
    ),
    "int as float": (
        dict(encoding=F32, rate=16_000),
        np.full(1600, 3000.0, "<f4").tobytes(),
        "[-1, 1]",
    ),
    "too many channels": (
        dict(encoding=S16, rate=16_000, channels=64),
        b"\0\0" * 64,
        "channels is 64",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CLIPS))
def test_bad_clip_gets_invalid_argument_and_service_keeps_serving(asr_stub, case: str) -> None:
    fmt, audio, expected = BAD_CLIPS[case]
    with pytest.raises(grpc.RpcError) as raised:
        recognize(asr_stub, audio, fmt["encoding"], fmt.get("rate", 0), fmt.get("channels", 0))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in raised.value.details(), raised.value.details()
    assert_still_serving(asr_stub)


def test_unknown_language_gets_invalid_argument(asr_stub) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        recognize(asr_stub, b"\0\0" * 1600, S16, 16_000, language="xx")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Unknown language 'xx'" in raised.value.details()
    assert_still_serving(asr_stub)


def test_clip_over_the_duration_limit_is_resource_exhausted(asr_stub) -> None:
    too_long = b"\0\0" * (16_000 * 61)  # the fixture allows 60 s
    with pytest.raises(grpc.RpcError) as raised:
        recognize(asr_stub, too_long, S16, 16_000)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at most 60 s" in raised.value.details()
    assert_still_serving(asr_stub)


def test_clip_over_the_message_size_limit_is_refused(asr_stub) -> None:
    huge = b"\0\0" * (20 * 1024 * 1024)  # 40 MB, over the 32 MB message bound
    with pytest.raises(grpc.RpcError) as raised:
        recognize(asr_stub, huge, S16, 16_000)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_still_serving(asr_stub)


STREAM_CASES = {
    "audio before config": (
        [asr_pb2.StreamingRecognizeRequest(audio=b"\0\0" * 320)],
        "first message of a stream must carry `config`",
    ),
    "config twice": (
        [asr_pb2.StreamingRecognizeRequest(config=S16_CONFIG)] * 2,
        "only the first message may carry config",
    ),
    "no messages": ([], "ended before its first message"),
    "odd chunk": (
        [
            asr_pb2.StreamingRecognizeRequest(config=S16_CONFIG),
            asr_pb2.StreamingRecognizeRequest(audio=b"\0" * 641),
        ],
        "audio chunk 1 has 641 bytes",
    ),
    "container on a stream": (
        [
            asr_pb2.StreamingRecognizeRequest(
                config=asr_pb2.StreamingRecognitionConfig(
                    format=audio_pb2.AudioFormat(encoding=WAV)
                )
            )
        ],
        "takes raw PCM",
    ),
    "bad endpoint silence": (
        [
            asr_pb2.StreamingRecognizeRequest(
                config=asr_pb2.StreamingRecognitionConfig(
                    format=S16_CONFIG.format, end_of_utterance_silence_ms=20
                )
            )
        ],
        "end_of_utterance_silence_ms is 20",
    ),
    "NaN chunk": (
        [
            asr_pb2.StreamingRecognizeRequest(
                config=asr_pb2.StreamingRecognitionConfig(
                    format=audio_pb2.AudioFormat(encoding=F32, sample_rate_hz=16_000)
                )
            ),
            asr_pb2.StreamingRecognizeRequest(audio=np.full(320, np.nan, "<f4").tobytes()),
        ],
        "audio chunk 1 contains NaN",
    ),
}


@pytest.mark.parametrize("case", sorted(STREAM_CASES))
def test_bad_stream_gets_invalid_argument_and_service_keeps_serving(asr_stub, case: str) -> None:
    requests, expected = STREAM_CASES[case]
    error = stream_error(asr_stub, requests)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.details(), error.details()
    assert_still_serving(asr_stub)


def assert_still_serving(asr_stub) -> None:  # type: ignore[no-untyped-def]
    sentence = "Good morning, how are you?"
    response = recognize(asr_stub, to_s16le(VOICES["piper"](sentence)), S16, 16_000, language="en")
    assert word_error_rate([sentence], [response.text]) <= 0.2


def test_metrics_endpoint_counts_calls_by_code(start_in_process) -> None:
    from services.asr.config import AsrSettings
    from services.asr.server import build_program
    from talker.v1 import asr_pb2_grpc

    server = start_in_process(build_program, AsrSettings(port=0, metrics_port=free_port()))
    with grpc.insecure_channel(server.address) as channel:
        stub = asr_pb2_grpc.AsrServiceStub(channel)
        with pytest.raises(grpc.RpcError):
            recognize(stub, b"", S16, 16_000)
    url = f"http://127.0.0.1:{server.program.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert (
        'talker_grpc_requests_total{code="INVALID_ARGUMENT",'
        'method="/talker.v1.AsrService/Recognize"}' in text
    )
    assert "talker_grpc_request_duration_seconds_bucket" in text
    assert "talker_grpc_in_flight" in text
    assert "process_resident_memory_bytes" in text
    assert "process_cpu_seconds_total" in text
    assert "talker_ready 1.0" in text
