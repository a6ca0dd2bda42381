"""The whole system for a benchmark: every program under the project's real
supervisord on free ports, all SERVING, with the test portrait as an avatar."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.portrait import create_astronaut
from tests.processes import Supervisor, serving_system


@contextmanager
def running_system(env: dict[str, str] | None = None) -> Iterator[tuple[Supervisor, str]]:
    """Yields the running system and the id of the astronaut avatar on it."""
    with (
        tempfile.TemporaryDirectory(prefix="talker-bench-") as folder,
        serving_system(
            Path(os.environ.get("TALKER_BENCH_VAR_DIR") or folder), env, timeout_s=300
        ) as system,
    ):
        yield system, create_astronaut(system.addresses["animate"], "bench")
