"""Every line a program writes is JSON: log records, Python warnings, stray
prints and progress bars, bytes a C library writes to file descriptor 2, an
uncaught exception, a refused setting. And the readiness metric and the
default memory ceiling the alert rules depend on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from services.common.runtime import GrpcProgram
from services.common.settings import ServiceSettings, available_memory_bytes
from tests.processes import REPO, InProcessServer

PROGRAM = textwrap.dedent(
    """
    import logging, os, sys, warnings
    from tqdm import tqdm
    from services.common.logs import configure_logging

    configure_logging("demo")
    logging.getLogger("demo").info("a record", extra={"answer": 42})
    print("a stray print")
    warnings.warn("an old API", DeprecationWarning)
    for _ in tqdm(range(3), desc="converting tensors", file=sys.stderr):
        pass
    os.write(2, b"ggml_init: a C library talking to fd 2\\n")
    raise RuntimeError("the end")
    """
)


def run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    # Another test (or the caller's shell) may have set TQDM_DISABLE; the bar must draw here.
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", code, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_every_line_a_program_writes_is_json() -> None:
    result = run(PROGRAM)
    assert result.returncode == 1  # the uncaught exception still ends it
    lines = (result.stdout + result.stderr).splitlines()
    records = [json.loads(line) for line in lines]  # raises on any line that is not JSON
    assert all(r["program"] == "demo" and r["ts"].endswith("Z") for r in records)
    events = {r["event"]: r for r in records}
    assert events["a record"]["answer"] == 42
    assert events["a stray print"]["logger"] == "stdout"
    assert any("an old API" in e and r["logger"] == "py.warnings" for e, r in events.items())
    bar = [r for r in records if "converting tensors" in r["event"]]
    assert bar and all(r["logger"] == "stderr" for r in bar)
    assert events["ggml_init: a C library talking to fd 2"]["logger"] == "stderr"
    crash = events["uncaught exception; exiting"]
    assert crash["level"] == "critical" and "RuntimeError: the end" in crash["exception"]


def test_a_refused_setting_is_one_json_record() -> None:
    code = (
        "from services.common.runtime import run_program\n"
        "from services.asr.config import AsrSettings\n"
        "run_program(AsrSettings, lambda settings: None)\n"
    )
    result = run(code, "--port", "99999999")
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).splitlines()
    records = [json.loads(line) for line in lines]
    refused = [r for r in records if r["level"] == "critical"]
    assert len(refused) == 1 and "invalid setting" in refused[0]["event"]
    assert "port" in refused[0]["event"]


def test_memory_ceiling_defaults_to_a_share_of_the_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    total = available_memory_bytes()
    assert total > 2**28
    assert ServiceSettings().memory_limit_bytes() == int(total * 0.5)
    monkeypatch.setenv("TALKER_MEMORY_LIMIT_SHARE", "0.25")
    assert ServiceSettings().memory_limit_bytes() == int(total * 0.25)
    assert ServiceSettings(memory_limit_mb=0).memory_limit_bytes() == 0  # off
    assert ServiceSettings(memory_limit_mb=300).memory_limit_bytes() == 300 * 2**20


def test_talker_ready_follows_health_when_a_condition_sets_in() -> None:
    program = GrpcProgram(
        ServiceSettings(port=0, metrics_port=0, memory_limit_mb=0),
        [],
        lambda server: None,
        lambda: None,
    )
    server = InProcessServer(program)
    server.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def status() -> int:
                return health.Check(health_pb2.HealthCheckRequest(), timeout=5).status

            assert status() == health_pb2.HealthCheckResponse.SERVING
            assert REGISTRY.get_sample_value("talker_ready") == 1
            server._run(program.set_condition("memory", True))
            assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
            assert REGISTRY.get_sample_value("talker_ready") == 0  # the not-serving alert sees it
            server._run(program.set_condition("memory", False))
            assert status() == health_pb2.HealthCheckResponse.SERVING
            assert REGISTRY.get_sample_value("talker_ready") == 1
    finally:
        server.stop()
