"""The whole system for a benchmark: every program under the project's real
supervisord on free ports, all SERVING, with the test portrait as an avatar."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.portrait import create_astronaut
from tests.processes import Supervisor


@contextmanager
def running_system(env: dict[str, str] | None = None) -> Iterator[tuple[Supervisor, str]]:
    """Yields the running system and the id of the astronaut avatar on it."""
    with tempfile.TemporaryDirectory(prefix="talker-bench-") as folder:
        system = Supervisor(Path(folder), env)
        system.start()
        try:
            for address in system.addresses.values():
                system.wait_status(address, timeout_s=300)
            yield system, create_astronaut(system.addresses["animate"], "bench")
        finally:
            system.stop()
