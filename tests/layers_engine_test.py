"""The tree keeps its layers (pyproject's [tool.importlinter]): the check passes on
the tree as it is and fails on a copy of it with one import pointing upward."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.processes import REPO

PACKAGES = ("operations", "web", "gateway", "jobs", "pipeline", "services")
LINT_IMPORTS = Path(REPO) / ".venv" / "bin" / "lint-imports"


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-logo", "--no-cache"],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def copy_tree(target: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(
            Path(REPO) / package, target / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(Path(REPO) / "pyproject.toml", target / "pyproject.toml")
    return target


def test_the_tree_keeps_its_layers() -> None:
    result = lint_imports(Path(REPO))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path)
    # The shared runtime reaching up into the pipeline above it.
    ids = tree / "services" / "common" / "ids.py"
    ids.write_text(ids.read_text() + "\nfrom pipeline.config import STAGES  # noqa\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert "services.common.ids -> pipeline.config" in result.stdout


def test_the_gateway_and_the_worker_do_not_import_each_other(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path)
    worker = tree / "jobs" / "worker.py"
    worker.write_text(worker.read_text() + "\nfrom gateway.config import GatewaySettings  # noqa\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "jobs.worker -> gateway.config" in result.stdout
