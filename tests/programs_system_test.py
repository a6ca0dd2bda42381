"""Every program under the real supervisord: health through the standard
protocol, its service listed by the real grpcurl via reflection, and the
trace id returned in the response headers."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from operations.programs import PROGRAMS
from tests.processes import VENV_BIN

SERVICES = {
    "asr": "talker.v1.AsrService",
    "chat": "talker.v1.ChatService",
    "synthesize": "talker.v1.SynthesizeService",
    "animate": "talker.v1.AnimateService",
    "gateway": "talker.v1.TalkerService",
    # Serves HTTP; its gRPC port has health and reflection only.
    "web": "grpc.health.v1.Health",
}


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "grpcurl"), "-plaintext", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_program_serves_health_reflection_and_trace_ids(system, program: str) -> None:
    address = system.addresses[program]
    service = SERVICES[program]
    assert service in grpcurl(address, "list").stdout.split()
    health = grpcurl(
        "-v",
        "-H",
        f"x-trace-id: probe-{program}",
        "-d",
        json.dumps({"service": "" if program == "web" else service}),
        address,
        "grpc.health.v1.Health/Check",
    )
    assert '"status": "SERVING"' in health.stdout, health.stdout + health.stderr
    assert f"x-trace-id: probe-{program}" in health.stdout
    assert "RUNNING" in system.ctl("status", f"talker:{program}").stdout


def test_synthesize_through_grpcurl(system) -> None:
    result = grpcurl(
        "-d",
        json.dumps(
            {"text": "Hello from the operator.", "output_format": {"sample_rate_hz": 16000}}
        ),
        system.addresses["synthesize"],
        "talker.v1.SynthesizeService/Synthesize",
    )
    assert result.returncode == 0, result.stderr
    assert '"finished"' in result.stdout and '"sample_rate_hz": 16000' in result.stdout


def test_gateway_described_through_grpcurl(system) -> None:
    result = grpcurl(system.addresses["gateway"], "describe", "talker.v1.TalkerService")
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    assert "talker.v1.TalkerService is a service:" in result.stdout
    assert (
        "rpc Converse ( stream .talker.v1.ConverseRequest ) returns "
        "( stream .talker.v1.ConverseResponse );" in result.stdout
    )
    assert "rpc Ask ( .talker.v1.AskRequest ) returns ( stream .talker.v1.AskResponse );" in (
        result.stdout
    )


def test_text_ask_through_grpcurl_returns_the_trace_id_in_the_headers(system) -> None:
    trace_id = "grpcurl-ask-test"
    result = grpcurl(
        "-v",
        "-H",
        f"x-trace-id: {trace_id}",
        "-d",
        json.dumps(
            {
                "text": "What is the capital of France?",
                "mode": "REPLY_MODE_TEXT",
                "sampling": {"greedy": True, "max_new_tokens": 32},
            }
        ),
        system.addresses["gateway"],
        "talker.v1.TalkerService/Ask",
    )
    print(result.stdout)
    assert result.returncode == 0, result.stderr
    # -v prints the response headers before the messages, and the trailers after them.
    headers = result.stdout.split("Response headers received:", 1)[1].split("Response contents:")[0]
    assert f"x-trace-id: {trace_id}" in headers, headers
    messages = result.stdout.split("Response trailers received:")[0]
    assert f'"trace_id": "{trace_id}"' in messages
    last_event = messages.rsplit("Response contents:", 1)[1]
    assert '"turn_finished"' in last_event and '"reply_text"' in last_event, last_event


def test_chat_runs_at_a_lower_cpu_priority_than_the_stages_a_listener_waits_for(system) -> None:
    """Chat writes ahead of what is being spoken; on a small host speech synthesis
    and animation of the first sentence get the CPU first."""
    niceness = {}
    for program in ("asr", "chat", "synthesize", "animate", "gateway"):
        pid = int(system.ctl("pid", f"talker:{program}").stdout.strip())
        niceness[program] = os.getpriority(os.PRIO_PROCESS, pid)
        if program == "chat":
            # Every thread (torch's and gRPC's included), not only the first.
            threads = [int(thread) for thread in os.listdir(f"/proc/{pid}/task")]
            assert {os.getpriority(os.PRIO_PROCESS, thread) for thread in threads} == {5}
    assert niceness == {"asr": 0, "chat": 5, "synthesize": 0, "animate": 0, "gateway": 0}
