"""Shared fixtures: real models, real servers on real ports."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Model caches are shared across runs (building them is slow, and they are
# keyed by content); everything else a test writes goes to its tmp_path.
os.environ.setdefault("TALKER_CACHE_DIR", str(Path(__file__).resolve().parent.parent / "var/cache"))

from services.common.runtime import GrpcProgram
from services.common.settings import ServiceSettings
from tests.processes import InProcessServer, Supervisor, serving_system


@pytest.fixture(scope="session")
def start_in_process() -> Iterator[
    Callable[[Callable[..., GrpcProgram], ServiceSettings], InProcessServer]
]:
    servers: list[InProcessServer] = []

    def start(build: Callable[..., GrpcProgram], settings: ServiceSettings) -> InProcessServer:
        server = InProcessServer(build(settings))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def asr_server(start_in_process) -> InProcessServer:  # type: ignore[no-untyped-def]
    from services.asr.config import AsrSettings
    from services.asr.server import build_program

    settings = AsrSettings(port=0, metrics_port=0, max_clip_s=60, max_stream_s=120)
    return start_in_process(build_program, settings)


@pytest.fixture(scope="session")
def asr_channel(asr_server: InProcessServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(asr_server.address) as channel:
        yield channel


@pytest.fixture(scope="session")
def asr_stub(asr_channel: grpc.Channel):  # type: ignore[no-untyped-def]
    from talker.v1 import asr_pb2_grpc

    return asr_pb2_grpc.AsrServiceStub(asr_channel)


@pytest.fixture(scope="session")
def asr_engine():  # type: ignore[no-untyped-def]
    """The Whisper engine on its own, no gRPC: loaded once per session."""
    from services.asr.config import AsrSettings
    from services.asr.engine import WhisperEngine

    engine = WhisperEngine(AsrSettings())
    engine.load()
    return engine


@pytest.fixture(scope="session")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    """Every program under the project's real supervisord, on free ports, all SERVING."""
    with serving_system(tmp_path_factory.mktemp("var")) as supervisor:
        yield supervisor


# ---- test rings ------------------------------------------------------------------
# Every test is marked with its ring, from what it stands on: `system` if it
# needs real programs under supervisord (the `system` fixture, or a file that
# starts processes itself), `contract` if it starts a servicer in-process and
# calls it through a real channel, `engine` otherwise. `make test-fast` runs
# `-m "not system"`; `make test` runs all three.
SYSTEM_FILES = {"watchdog_test.py", "jobs_queue_test.py", "prometheus_test.py"}


def ring_of(item: pytest.Item) -> str:
    fixtures = set(getattr(item, "fixturenames", ()))
    name = Path(str(item.fspath)).name
    if "system" in fixtures or name.endswith("_system_test.py") or name in SYSTEM_FILES:
        return "system"
    if "start_in_process" in fixtures or name.endswith("_contract_test.py"):
        return "contract"
    return "engine"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(ring_of(item))
