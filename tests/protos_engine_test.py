"""The contracts: buf lint clean, and buf breaking catches a change that
would break generated clients (run on a throwaway copy of the protos)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.processes import REPO

BUF = REPO / "node_modules" / ".bin" / "buf"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def copy_protos(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "protos", tmp_path / "protos")
    shutil.copy(REPO / "buf.yaml", tmp_path / "buf.yaml")
    run("git", "init", "-q", cwd=tmp_path)
    run("git", "add", ".", cwd=tmp_path)
    run(
        "git",
        "-c",
        "user.email=ci@talker",
        "-c",
        "user.name=ci",
        "commit",
        "-qm",
        "base",
        cwd=tmp_path,
    )
    return tmp_path


def test_protos_are_lint_clean() -> None:
    result = run(str(BUF), "lint", cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_catches_a_deleted_field(tmp_path: Path) -> None:
    workspace = copy_protos(tmp_path)
    chat = workspace / "protos/talker/v1/chat.proto"
    chat.write_text(chat.read_text().replace("  string text = 2;\n", "  reserved 2;\n", 1))
    result = run(str(BUF), "breaking", "--against", ".git#ref=HEAD", cwd=workspace)
    assert result.returncode != 0
    assert (
        'Previously present field "2" with name "text" on message "ChatRequest" was deleted'
        in result.stdout
    )


def test_buf_breaking_accepts_an_added_field(tmp_path: Path) -> None:
    workspace = copy_protos(tmp_path)
    chat = workspace / "protos/talker/v1/chat.proto"
    chat.write_text(
        chat.read_text().replace(
            "  string user_id = 4;\n",
            "  string user_id = 4;\n  // A new optional hint.\n  string locale = 999;\n",
            1,
        )
    )
    result = run(str(BUF), "breaking", "--against", ".git#ref=HEAD", cwd=workspace)
    assert result.returncode == 0, result.stdout + result.stderr
