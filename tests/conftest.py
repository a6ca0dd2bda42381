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
# Every test is marked with its ring. A test file's name says the heaviest ring
# of its tests (`*_engine_test.py`, `*_contract_test.py`, `*_system_test.py`):
# every test of a system file is `system` (real programs under supervisord, or
# processes it starts itself); in the other files a test that starts a servicer
# in-process and calls it through a real channel is `contract`, the rest
# `engine`. A test that needs more than its file's name says fails collection.
# `make test-fast` runs `-m "not system"`; `make test` runs all three.
RINGS = ("engine", "contract", "system")


def file_ring(path: Path) -> str:
    for ring in RINGS:
        if path.name.endswith(f"_{ring}_test.py"):
            return ring
    raise pytest.UsageError(
        f"{path.name}: a test file's name ends with _engine_test.py, _contract_test.py "
        "or _system_test.py, the heaviest ring of its tests."
    )


def ring_of(item: pytest.Item) -> str:
    named = file_ring(Path(str(item.fspath)))
    if named == "system":
        return "system"
    fixtures = set(getattr(item, "fixturenames", ()))
    needed = (
        "system"
        if "system" in fixtures
        else "contract"
        if "start_in_process" in fixtures
        else "engine"
    )
    if RINGS.index(needed) > RINGS.index(named):
        raise pytest.UsageError(
            f"{item.nodeid} is a {needed} test in a file named for the {named} ring; "
            f"move it or rename the file *_{needed}_test.py."
        )
    return needed


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(ring_of(item))
