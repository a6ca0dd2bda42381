"""The TypeScript client (clients/node), generated from protos/ at test time,
runs its two examples against the live gateway under supervisord: a spoken
WAV streamed to Converse at real-time pace with an avatar, and a typed Ask.
Their output (transcript, reply text, audio bytes, frames, trace id) is
printed into the test log."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.samples import QUESTION, spoken_question
from tests.portrait import create_astronaut

REPO = Path(__file__).resolve().parent.parent
CLIENT = REPO / "clients" / "node"
# A short greedy reply keeps the turn quick on two cores; the client path is what is tested.
REPLY_OPTIONS = ["--greedy", "--max-new-tokens", "48"]
SUMMARY_KEYS = ("transcript", "reply text", "audio bytes", "frames", "trace id")

pytestmark = pytest.mark.skipif(
    not (shutil.which("node") and shutil.which("npm")),
    reason="node and npm are needed for the TypeScript client test (`make system-deps` installs them)",
)


def run(*args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture(scope="module")
def examples() -> Path:
    """Installs the client's packages (the Makefile's target) and builds it: protos -> ts-proto -> tsc."""
    if not (CLIENT / "node_modules" / ".installed").exists():
        installed = run("make", "-s", "clients/node/node_modules/.installed", timeout_s=300)
        assert installed.returncode == 0, installed.stdout + installed.stderr
    built = run("npm", "run", "--silent", "--prefix", str(CLIENT), "build", timeout_s=300)
    assert built.returncode == 0, built.stdout + built.stderr
    return CLIENT / "dist" / "examples"


@pytest.fixture(scope="module")
def avatar_id(system) -> str:  # type: ignore[no-untyped-def]
    return create_astronaut(system.addresses["animate"])


def summary_of(
    result: subprocess.CompletedProcess[str], capsys: pytest.CaptureFixture[str]
) -> dict[str, str]:
    """The closing lines the examples print: `transcript: ...`, `audio bytes: N`, ...
    The whole output goes to the test log, passed or not."""
    with capsys.disabled():
        print(f"\n$ {' '.join(result.args)}\n{result.stdout}{result.stderr}")
    assert result.returncode == 0, result.stderr
    tail = result.stdout.splitlines()[-len(SUMMARY_KEYS) :]
    assert [line.split(":", 1)[0] for line in tail] == list(SUMMARY_KEYS), tail
    return {key: line[len(key) + 1 :].strip() for key, line in zip(SUMMARY_KEYS, tail, strict=True)}


def test_node_converse_streams_a_wav_and_gets_transcript_audio_and_video(
    system, examples: Path, avatar_id: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    question = tmp_path / "question.wav"
    question.write_bytes(spoken_question())
    trace_id = "node-converse-test"
    result = run(
        "node", str(examples / "converse.js"),
        "--address", system.addresses["gateway"],
        "--trace-id", trace_id,
        "--avatar", avatar_id,
        "--user", "node-device", "--scene", "node-test",
        *REPLY_OPTIONS,
        str(question),
        timeout_s=600,
    )  # fmt: skip
    summary = summary_of(result, capsys)
    assert "capital of" in summary["transcript"].lower(), summary  # not the model's ear
    assert summary["reply text"], summary
    assert int(summary["audio bytes"]) > 0 and int(summary["frames"]) > 0, summary
    assert summary["trace id"] == trace_id
    # The events came as they happened: the call began, speech was heard, a final transcript.
    assert "started: session" in result.stdout and f"trace {trace_id}" in result.stdout
    assert "transcript (final)" in result.stdout and "finished (" in result.stdout


def test_node_ask_answers_a_typed_question_with_audio(
    system, examples: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace_id = "node-ask-test"
    result = run(
        "node", str(examples / "ask.js"),
        "--address", system.addresses["gateway"],
        "--trace-id", trace_id,
        "--user", "node-backend", "--scene", "node-test",
        *REPLY_OPTIONS,
        QUESTION,
        timeout_s=600,
    )  # fmt: skip
    summary = summary_of(result, capsys)
    assert "capital of france" in summary["transcript"].lower(), summary
    assert summary["reply text"], summary
    assert int(summary["audio bytes"]) > 0, summary
    assert summary["frames"] == "0"  # AUDIO mode: no avatar, no frames
    assert summary["trace id"] == trace_id
