"""The shared runtime: settings, graceful shutdown, NOT_SERVING while loading."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.asr.config import AsrSettings
from services.asr.server import build_program
from services.common.runtime import GrpcProgram
from talker.v1 import asr_pb2, asr_pb2_grpc, audio_pb2
from tests.processes import InProcessServer
from tests.speech import SENTENCES, VOICES, silence, to_s16le, word_error_rate


def test_settings_come_from_environment_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TALKER_ASR_MAX_STREAMS", "7")
    monkeypatch.setenv("TALKER_ASR_PORT", "6100")
    settings = AsrSettings.load(["--port", "6001", "--end-of-utterance-silence-ms", "300"])
    assert (settings.port, settings.max_streams, settings.end_of_utterance_silence_ms) == (
        6001,
        7,
        300,
    )
    assert settings.host == "127.0.0.1"  # internal services bind to loopback by default
    with pytest.raises(SystemExit):
        AsrSettings.load(["--end-of-utterance-silence-ms", "50"])  # below its bound


def test_health_is_not_serving_and_calls_unavailable_until_the_model_loads() -> None:
    release = threading.Event()
    program = GrpcProgram(
        AsrSettings(port=0, metrics_port=0),
        ["talker.v1.AsrService"],
        lambda server: asr_pb2_grpc.add_AsrServiceServicer_to_server(
            asr_pb2_grpc.AsrServiceServicer(), server
        ),
        lambda: release.wait(30),  # a model that takes as long as the test wants
    )
    server = InProcessServer(program)
    server._run(program.start())
    try:
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as raised:
                asr_pb2_grpc.AsrServiceStub(channel).Recognize(
                    asr_pb2.RecognizeRequest(), timeout=5
                )
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "still loading" in raised.value.details()
            release.set()
            server._run(program.wait_ready())
            status = health.Check(
                health_pb2.HealthCheckRequest(service="talker.v1.AsrService"), timeout=5
            ).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        server.stop()


def test_sigterm_drain_lets_a_live_stream_finish_and_refuses_new_calls() -> None:
    server = InProcessServer(build_program(AsrSettings(port=0, metrics_port=0)))
    server.start()
    sentence = SENTENCES[2]
    audio = to_s16le(np.concatenate([VOICES["piper"](sentence), silence(1.0)]))
    config = asr_pb2.StreamingRecognitionConfig(
        format=audio_pb2.AudioFormat(
            encoding=audio_pb2.AUDIO_ENCODING_PCM_S16LE, sample_rate_hz=16_000
        ),
        config=asr_pb2.RecognitionConfig(language="en"),
    )
    stopping = threading.Event()

    def requests():  # type: ignore[no-untyped-def]
        yield asr_pb2.StreamingRecognizeRequest(config=config)
        for index, start in enumerate(range(0, len(audio), 640)):
            if index == 25:
                stopping.set()  # the drain begins while this stream is half sent
            yield asr_pb2.StreamingRecognizeRequest(audio=audio[start : start + 640])
            time.sleep(0.005)

    stop_thread = threading.Thread(
        target=lambda: (stopping.wait(30), server._run(server.program.stop(20)))
    )
    stop_thread.start()
    with grpc.insecure_channel(server.address) as channel:
        stub = asr_pb2_grpc.AsrServiceStub(channel)
        finals = [
            r.result.text
            for r in stub.StreamingRecognize(requests(), timeout=60)
            if r.result.is_final
        ]
        with pytest.raises(grpc.RpcError) as raised:
            stub.Recognize(asr_pb2.RecognizeRequest(), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    stop_thread.join(30)
    server.loop.call_soon_threadsafe(server.loop.stop)
    assert len(finals) == 1 and word_error_rate([sentence], finals) <= 0.15


def test_stale_partial_files_are_removed_and_fresh_ones_kept(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os

    from services.common.cache_files import remove_stale_partials

    old_file = tmp_path / "model.bin.1.partial"
    old_dir = tmp_path / "weights.partial-42"
    fresh = tmp_path / "model.bin.2.partial"
    kept = tmp_path / "model.bin"
    old_file.write_bytes(b"x")
    old_dir.mkdir()
    (old_dir / "shard").write_bytes(b"x")
    fresh.write_bytes(b"x")
    kept.write_bytes(b"x")
    an_hour_ago = time.time() - 3600
    for path in (old_file, old_dir):
        os.utime(path, (an_hour_ago, an_hour_ago))
    os.utime(kept, (an_hour_ago, an_hour_ago))
    assert remove_stale_partials(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.bin.2.partial"]


def test_no_gpu_means_no_gpu_series_and_no_effect_on_serving() -> None:
    from prometheus_client import REGISTRY

    from services.common.gpu import GpuMonitor

    monitor = GpuMonitor()
    if monitor.available:  # a GPU host: the readings must be real and sane
        readings = monitor.read()
        assert readings and all(
            r.memory_total > 0 and 0 <= r.memory_fraction <= 1 for r in readings
        )
        return
    assert monitor.unavailable_reason  # why: no library, no driver or no device
    assert monitor.read() == []
    assert REGISTRY.get_sample_value("talker_gpu_available") == 0
    assert REGISTRY.get_sample_value("talker_gpu_memory_used_bytes", {"gpu": "0"}) is None
