"""System ring for chat: the real chat program under the real supervisord,
reached with the real grpcurl binary."""

from __future__ import annotations

import json
import subprocess
import time

from tests.processes import VENV_BIN


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "grpcurl"), "-plaintext", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_chat_is_serving_and_listed_through_reflection(system) -> None:
    address = system.addresses["chat"]
    assert "talker.v1.ChatService" in grpcurl(address, "list").stdout.split()
    health = grpcurl(
        "-d", '{"service": "talker.v1.ChatService"}', address, "grpc.health.v1.Health/Check"
    )
    assert json.loads(health.stdout)["status"] == "SERVING"


def test_grpcurl_chat_streams_a_reply_with_the_trace_id(system) -> None:
    address = system.addresses["chat"]
    request = json.dumps(
        {
            "session_id": "ops-check",
            "text": "What is the capital of France?",
            "sampling": {"greedy": True},
        }
    )
    result = grpcurl(
        "-v", "-H", "x-trace-id: chat-trace-7", "-d", request, address, "talker.v1.ChatService/Chat"
    )
    assert result.returncode == 0, result.stderr
    assert "x-trace-id: chat-trace-7" in result.stdout
    assert '"finish_reason": "FINISH_REASON_STOP"' in result.stdout
    assert "Paris" in result.stdout
    # "call finished" is logged as the call closes, a moment after grpcurl has its answer.
    deadline = time.monotonic() + 10
    while True:
        traced = [
            json.loads(line) for line in system.log("chat").splitlines() if "chat-trace-7" in line
        ]
        events = {entry["event"] for entry in traced}
        if events >= {"reply finished", "call finished"} or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert events >= {"reply finished", "call finished"}, events
