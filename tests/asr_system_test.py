"""System ring: the real ASR program under the project's real supervisord,
called over real ports, with the real grpcurl binary."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.processes import VENV_BIN
from tests.speech import VOICES, to_wav, word_error_rate

GRPCURL = str(VENV_BIN / "grpcurl")


def grpcurl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GRPCURL, "-plaintext", *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def test_health_is_serving_through_the_standard_protocol(system) -> None:
    address = system.addresses["asr"]
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "talker.v1.AsrService"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as raised:
            stub.Check(health_pb2.HealthCheckRequest(service="talker.v1.Nope"), timeout=5)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_supervisorctl_reports_the_program_running(system) -> None:
    supervisor = system
    supervisor.wait_running("talker:asr")
    status = supervisor.ctl("status")
    assert "talker:asr" in status.stdout and "RUNNING" in status.stdout, status.stdout


def test_grpcurl_lists_and_describes_through_reflection(system) -> None:
    address = system.addresses["asr"]
    listed = grpcurl(address, "list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {
        "talker.v1.AsrService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    described = grpcurl(address, "describe", "talker.v1.AsrService")
    assert (
        "rpc StreamingRecognize ( stream .talker.v1.StreamingRecognizeRequest )" in described.stdout
    )
    health = grpcurl(
        "-d", '{"service": "talker.v1.AsrService"}', address, "grpc.health.v1.Health/Check"
    )
    assert json.loads(health.stdout)["status"] == "SERVING"


def test_grpcurl_recognize_with_trace_id_reaches_the_log(system) -> None:
    supervisor, address = system, system.addresses["asr"]
    sentence = "Please tell me the weather in Paris tomorrow."
    body = json.dumps(
        {
            "format": {"encoding": "AUDIO_ENCODING_WAV"},
            "audio": base64.b64encode(to_wav(VOICES["piper"](sentence), 16_000)).decode(),
            "config": {"language": "en"},
        }
    )
    result = grpcurl(
        "-v",
        "-H",
        "x-trace-id: grpcurl-trace-42",
        "-d",
        "@",
        address,
        "talker.v1.AsrService/Recognize",
        stdin=body,
    )
    assert result.returncode == 0, result.stderr
    assert "x-trace-id: grpcurl-trace-42" in result.stdout
    payload = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    assert word_error_rate([sentence], [payload["text"]]) <= 0.15
    traced = [
        json.loads(line)
        for line in supervisor.log("asr").splitlines()
        if "grpcurl-trace-42" in line
    ]
    assert traced and all(entry["trace_id"] == "grpcurl-trace-42" for entry in traced)


def test_bad_input_through_grpcurl_gets_a_sentence(system) -> None:
    address = system.addresses["asr"]
    body = json.dumps(
        {"format": {"encoding": "AUDIO_ENCODING_PCM_S16LE", "sample_rate_hz": 0}, "audio": "AAAA"}
    )
    result = grpcurl("-d", "@", address, "talker.v1.AsrService/Recognize", stdin=body)
    assert result.returncode != 0
    assert "InvalidArgument" in result.stderr and "sample_rate_hz is 0" in result.stderr


def test_sigterm_drains_and_supervisord_restarts_a_killed_program(system) -> None:
    supervisor, address = system, system.addresses["asr"]
    stopped = supervisor.ctl("stop", "talker:asr")
    assert "stopped" in stopped.stdout, stopped.stdout
    log = supervisor.log("asr")
    assert '"event": "termination requested; draining"' in log and '"event": "stopped"' in log
    supervisor.ctl("start", "talker:asr")
    supervisor.wait_status(address)
    pid = int(supervisor.ctl("pid", "talker:asr").stdout.strip())
    os.kill(pid, signal.SIGKILL)
    supervisor.wait_status(address, timeout_s=120)
    assert int(supervisor.ctl("pid", "talker:asr").stdout.strip()) != pid
