"""Access to the gateway: TLS and API keys, on a second gateway in this process
that chains the real stages of the supervisord system."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import GatewaySettings
from gateway.server import build_program
from talker.v1 import talker_pb2, talker_pb2_grpc

KEY = "k-7f3a9c1e5b"


def self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def secured(system, start_in_process, tmp_path_factory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(folder)
    keys_file = folder / "keys.txt"
    keys_file.write_text("# one key a line\nk-second-key\n")
    settings = GatewaySettings(
        port=0,
        metrics_port=0,
        archive_dir=folder / "archive",
        api_keys=[KEY],
        api_keys_file=keys_file,
        tls_cert=cert,
        tls_key=key,
        **{
            f"{stage}_address": system.addresses[stage]
            for stage in ("asr", "chat", "synthesize", "animate")
        },
    )
    server = start_in_process(build_program, settings)
    credentials = grpc.ssl_channel_credentials(cert.read_bytes())
    channel = grpc.secure_channel(f"localhost:{server.program.port}", credentials)
    yield server, channel
    channel.close()


def ask(channel: grpc.Channel, metadata: list[tuple[str, str]]) -> list[talker_pb2.ConverseEvent]:
    stub = talker_pb2_grpc.TalkerServiceStub(channel)
    request = talker_pb2.AskRequest(text="Say hello.", mode=talker_pb2.REPLY_MODE_TEXT)
    return [r.event for r in stub.Ask(request, metadata=metadata, timeout=120)]


@pytest.mark.parametrize(
    ("metadata", "words"),
    [
        ([], "needs an API key"),
        ([("authorization", f"Basic {KEY}")], "Bearer"),
        ([("authorization", "Bearer not-the-key")], "not valid"),
        ([("authorization", f"Bearer {KEY}x")], "not valid"),
    ],
)
def test_calls_without_a_valid_key_are_refused(secured, metadata, words) -> None:  # type: ignore[no-untyped-def]
    _, channel = secured
    with pytest.raises(grpc.RpcError) as caught:
        ask(channel, metadata)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert words in caught.value.details()


@pytest.mark.parametrize("key", [KEY, "k-second-key"])
def test_a_valid_key_over_tls_gets_an_answer(secured, key: str) -> None:
    _, channel = secured
    events = ask(channel, [("authorization", f"Bearer {key}"), ("x-trace-id", "tls-ok")])
    assert events[0].started.trace_id == "tls-ok"
    assert events[-1].WhichOneof("event") == "turn_finished"


def test_health_answers_without_a_key_and_plaintext_is_refused(secured) -> None:  # type: ignore[no-untyped-def]
    server, channel = secured
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    plain = grpc.insecure_channel(f"127.0.0.1:{server.program.port}")
    with pytest.raises(grpc.RpcError) as caught:
        health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
    plain.close()
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
