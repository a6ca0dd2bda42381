"""The README is executed: every shell block marked `<!-- readme-test: live -->`
runs as written (bash, `set -euo pipefail`) against the shared live system,
with the sample files setup makes, so a statement that stops being true fails
here. Only the ports are moved to the test system's free ones. After it (and
every other system test), the session's log check finds every line JSON."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.processes import REPO, Supervisor

MARKER = "<!-- readme-test: live -->"
DEFAULT_PORTS = {
    "50050": "gateway",
    "50051": "asr",
    "50052": "chat",
    "50053": "synthesize",
    "50054": "animate",
}


def live_blocks(readme: str) -> list[tuple[int, str]]:
    """(line number, script) of every marked ```sh block."""
    lines = readme.splitlines()
    blocks = []
    for index, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        assert lines[index + 1].startswith("```sh"), f"line {index + 2}: the marker needs ```sh"
        end = lines.index("```", index + 2)
        blocks.append((index + 3, "\n".join(lines[index + 2 : end])))
    return blocks


def test_the_readme_marks_its_live_blocks() -> None:
    blocks = live_blocks((REPO / "README.md").read_text())
    scripts = "\n".join(script for _line, script in blocks)
    assert len(blocks) >= 8
    for command in (
        "talker ask",
        "talker voices add",
        "SubmitRender",
        "Recognize",
        "grep",
        "/v1/audio/transcriptions",
        "DownloadFile",
    ):
        assert command in scripts, command


def test_readme_blocks_run_against_a_live_system(system: Supervisor, tmp_path: Path) -> None:
    # The blocks run from a checkout-shaped folder whose var/ is the test system's.
    for name in (".venv", "Makefile"):
        (tmp_path / name).symlink_to(REPO / name)
    # A copy, not a link: supervisorctl finds the socket at supervisor/../var, which
    # through a link would lead back to the repository's own var/.
    shutil.copytree(REPO / "supervisor", tmp_path / "supervisor")
    (tmp_path / "var").symlink_to(system.var_dir)
    subprocess.run(
        [sys.executable, "-m", "gateway.samples", str(system.var_dir / "samples")],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )

    def moved(script: str) -> str:
        script = re.sub(
            r"127\.0\.0\.1:(5005[0-4])",
            lambda port: system.addresses[DEFAULT_PORTS[port[1]]],
            script,
        )
        # The web program's HTTP port (its 50055 is health only).
        return script.replace("127.0.0.1:8090", system.web_url.removeprefix("http://"))

    outputs = {}
    for line, script in live_blocks((REPO / "README.md").read_text()):
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", moved(script)],
            cwd=tmp_path,
            # `.venv/bin/talker` imports this tree's code, also from a worktree.
            env={**system.env, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, (
            f"README.md line {line}: the block failed ({result.returncode}):\n{script}\n"
            f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
        )
        outputs[line] = result.stdout + result.stderr
    everything = "\n".join(outputs.values())
    # What the README says of those outputs: the trace id's path through the logs...
    traced = [row for row in everything.splitlines() if "ops-check-1" in row]
    assert any(row.startswith("var/log/gateway.log:") for row in traced), traced[:5]
    assert any(row.startswith("var/log/chat.log:") for row in traced), traced[:5]
    # ...and the stages' model header (grpcurl -v prints response headers).
    assert "x-talker-model:" in everything
    # Long CLI work shows progress (voices add: upload, then the wait, on stderr).
    assert "checking the recording and making the voice" in everything
    # The answer files the commands wrote.
    assert (tmp_path / "answer.mp4").stat().st_size > 10_000
    assert (tmp_path / "hello.wav").read_bytes()[:4] == b"RIFF"
    # The web program's answers: speech, a transcript, a chat reply, a download.
    assert (tmp_path / "hello-web.wav").read_bytes()[:4] == b"RIFF"
    assert '"text": "' in everything and "Paris" in everything
    assert "identical to the archive" in everything
    rest = (tmp_path / "reply-rest.bin").read_bytes()
    assert rest and rest == (tmp_path / "reply.wav").read_bytes()[44:]
