"""ASR: whole-clip cost through gRPC vs faster-whisper called directly on the
same model and clip (the overhead ratio), and live-stream latency from the end
of speech to the final result, with audio sent in 20 ms chunks at real-time pace."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import grpc
import numpy as np

from bench.tables import percentile, print_table
from services.asr.config import AsrSettings
from services.asr.server import build_program
from talker.v1 import asr_pb2, asr_pb2_grpc, audio_pb2
from tests.processes import InProcessServer
from tests.speech import SENTENCES, VOICES, silence, speech_end_s, to_s16le, word_error_rate

RATE = 16_000
CHUNK_S = 0.02
EXTRA_SENTENCES = [
    "Turn off the lights in the kitchen.",
    "What is the capital of France?",
    "Set an alarm for tomorrow morning.",
    "Where did you put my keys?",
]


def clip_overhead(server: InProcessServer, stub: asr_pb2_grpc.AsrServiceStub, rounds: int) -> None:
    clip = np.concatenate([VOICES["piper"](s) for s in SENTENCES[:4]] + [silence(0.5)])
    duration = len(clip) / RATE
    request = asr_pb2.RecognizeRequest(
        format=audio_pb2.AudioFormat(
            encoding=audio_pb2.AUDIO_ENCODING_PCM_S16LE, sample_rate_hz=RATE
        ),
        audio=to_s16le(clip),
        config=asr_pb2.RecognitionConfig(language="en"),
    )
    # The baseline is the very call the engine makes, on the server's own model.
    engine = server.program.engine
    pcm = np.frombuffer(request.audio, "<i2").astype(np.float32) / 32768.0
    direct, through = [], []
    stub.Recognize(request, timeout=120)  # warm both paths
    for _ in range(rounds):  # interleaved, so machine noise hits both alike
        started = time.perf_counter()
        segments, _info = engine.model.transcribe(
            pcm, language="en", beam_size=engine.settings.clip_beam_size, vad_filter=True
        )
        list(segments)
        direct.append(time.perf_counter() - started)
        started = time.perf_counter()
        stub.Recognize(request, timeout=120)
        through.append(time.perf_counter() - started)
    ratio = percentile(through, 50) / percentile(direct, 50)
    print_table(
        f"Whole clip, {duration:.1f} s of speech, beam {engine.settings.clip_beam_size}, {rounds} rounds",
        ["path", "p50 s", "p95 s", "RTF p50"],
        [
            [
                "faster-whisper direct",
                percentile(direct, 50),
                percentile(direct, 95),
                percentile(direct, 50) / duration,
            ],
            [
                "gRPC Recognize",
                percentile(through, 50),
                percentile(through, 95),
                percentile(through, 50) / duration,
            ],
        ],
    )
    print(f"gRPC overhead (p50 ratio - 1): {100 * (ratio - 1):+.1f}%  (target < 5%)")


def paced_requests(
    audio: np.ndarray,
    config: asr_pb2.StreamingRecognitionConfig,
    speech_end: float,
    marks: dict[str, float],
    half_close_at_speech_end: bool,
) -> Iterator[asr_pb2.StreamingRecognizeRequest]:
    yield asr_pb2.StreamingRecognizeRequest(config=config)
    step = int(CHUNK_S * RATE)
    started = time.perf_counter()
    for index, start in enumerate(range(0, len(audio), step)):
        delay = started + index * CHUNK_S - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield asr_pb2.StreamingRecognizeRequest(audio=to_s16le(audio[start : start + step]))
        chunk_end = (start + step) / RATE
        if chunk_end >= speech_end and "speech_end" not in marks:
            marks["speech_end"] = time.perf_counter() - (chunk_end - speech_end)
            if half_close_at_speech_end:
                return


def stream_latency(
    stub: asr_pb2_grpc.AsrServiceStub, eou_ms: int, half_close: bool
) -> dict[str, list[float]]:
    sentences = [*SENTENCES, *EXTRA_SENTENCES]
    latencies, decode_after_eou, hypotheses, references = [], [], [], []
    for voice in ("piper", "espeak"):
        for sentence in sentences:
            speech = VOICES[voice](sentence)
            audio = np.concatenate([silence(0.4), speech, silence(1.5 if not half_close else 0)])
            speech_end = 0.4 + speech_end_s(speech)
            config = asr_pb2.StreamingRecognitionConfig(
                format=audio_pb2.AudioFormat(
                    encoding=audio_pb2.AUDIO_ENCODING_PCM_S16LE, sample_rate_hz=RATE
                ),
                config=asr_pb2.RecognitionConfig(language="en"),
                end_of_utterance_silence_ms=eou_ms,
                single_utterance=True,
            )
            marks: dict[str, float] = {}
            final_text, eou_at = None, None
            for response in stub.StreamingRecognize(
                paced_requests(audio, config, speech_end, marks, half_close), timeout=60
            ):
                now = time.perf_counter()
                if response.event.type == asr_pb2.SPEECH_EVENT_TYPE_END_OF_UTTERANCE:
                    eou_at = now
                if response.result.is_final:
                    final_text = response.result.text
                    latencies.append(now - marks["speech_end"])
                    if eou_at is not None:
                        decode_after_eou.append(now - eou_at)
                    break
            references.append(sentence)
            hypotheses.append(final_text or "")
    return {
        "latency": latencies,
        "wer": [word_error_rate(references, hypotheses)],
    }


def main() -> None:
    rounds = int(os.environ.get("BENCH_ROUNDS", "7"))
    settings = AsrSettings(port=0, metrics_port=0)
    server = InProcessServer(build_program(settings))
    server.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = asr_pb2_grpc.AsrServiceStub(channel)
            clip_overhead(server, stub, rounds)
            rows = []
            for label, eou_ms, half_close in [
                (
                    f"end-of-utterance silence {settings.end_of_utterance_silence_ms} ms (default)",
                    settings.end_of_utterance_silence_ms,
                    False,
                ),
                ("end-of-utterance silence 300 ms", 300, False),
                ("client half-closes at end of speech (push-to-talk)", 500, True),
            ]:
                result = stream_latency(stub, eou_ms, half_close)
                lat = [1000 * x for x in result["latency"]]
                rows.append(
                    [label, len(lat), percentile(lat, 50), percentile(lat, 95), result["wer"][0]]
                )
            print_table(
                "Streaming: end of speech -> final result (20 ms chunks at real-time pace)",
                ["endpointing", "utterances", "p50 ms", "p95 ms", "WER"],
                rows,
            )
            print("target: p50 < 300 ms")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
