"""Servicers stay thin: no function in a services/*/server.py is over 40
lines. A handler reads the request, checks it, calls the engine and streams
results back; anything longer belongs in the engine or a helper of its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVERS = sorted((REPO / "services").glob("*/server.py"))
MAX_LINES = 40


def long_functions(source: str, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function or method longer than `limit`, decorators excluded."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert node.end_lineno is not None
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found.append((node.name, lines))
    return found


def test_the_check_finds_a_long_function() -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES))
    source = f"class S:\n    async def Handler(self):\n{body.replace('    ', '        ')}"
    assert long_functions(source) == [("Handler", MAX_LINES + 1)]
    assert long_functions("def short():\n    return 1\n") == []


def test_there_are_servers_to_check() -> None:
    assert {p.parent.name for p in SERVERS} >= {"asr", "chat", "synthesize", "animate"}


@pytest.mark.parametrize("server", SERVERS, ids=lambda p: p.parent.name)
def test_no_servicer_function_is_over_40_lines(server: Path) -> None:
    assert long_functions(server.read_text()) == [], f"{server.relative_to(REPO)}"
