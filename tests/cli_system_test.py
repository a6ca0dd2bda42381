"""What a person at a terminal (or a client) sees when things go wrong, on the
shared live system: one sentence, never Python internals (object addresses,
tracebacks); `--gateway` is obeyed; a voice that needs consent is refused
with a sentence saying how to give it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import grpc
import pytest

from tests.processes import REPO, VENV_BIN, Supervisor

INTERNALS = re.compile(r"object at 0x|Traceback|File \"|\.py\", line|<_io\.")


def talker(system: Supervisor, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "talker"), *args],
        # This tree's code, also from a worktree beside an editable install of another.
        env={**system.env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_health_asks_the_gateway_named_by_the_flag(system: Supervisor) -> None:
    unreachable = talker(system, "--gateway", "127.0.0.1:1", "health")
    assert unreachable.returncode != 0
    assert "127.0.0.1:1" in unreachable.stdout and "UNAVAILABLE" in unreachable.stdout
    assert "asr" not in unreachable.stdout  # only what was named
    reachable = talker(system, "--gateway", system.addresses["gateway"], "health")
    assert reachable.returncode == 0, reachable.stdout + reachable.stderr
    assert reachable.stdout.split()[:3] == ["gateway", system.addresses["gateway"], "SERVING"]


@pytest.mark.parametrize(
    ("command", "name"),
    [
        (("ask", "--audio"), "noise.wav"),
        (("voices", "add", "Noise", "--consent", "--wav"), "noise.wav"),
        (("avatars", "add"), "noise.png"),
    ],
)
def test_random_bytes_get_a_sentence_not_python_internals(
    system: Supervisor, tmp_path: Path, command: tuple[str, ...], name: str
) -> None:
    path = tmp_path / name
    path.write_bytes(os.urandom(48_000))
    result = talker(system, *command, str(path))
    assert result.returncode != 0
    # The last thing on the terminal (progress bars redraw with carriage returns).
    shown = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", result.stderr)
    message = re.split(r"[\r\n]+", shown.strip())[-1].strip()
    assert message.startswith("talker: INVALID_ARGUMENT: "), result.stderr
    assert not INTERNALS.search(result.stderr + result.stdout), result.stderr


def test_a_clone_without_consent_is_refused_with_how_to_give_it(system: Supervisor) -> None:
    from talker.v1 import audio_pb2, synthesize_pb2, synthesize_pb2_grpc

    def requests(consent: bool):  # type: ignore[no-untyped-def]
        yield synthesize_pb2.CreateVoiceRequest(
            config=synthesize_pb2.CreateVoiceConfig(
                display_name="Ana",
                kind=synthesize_pb2.VOICE_KIND_CLONED,
                consent=consent,
                format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_WAV),
            )
        )
        yield synthesize_pb2.CreateVoiceRequest(audio=b"RIFF" + bytes(4000))

    with grpc.insecure_channel(system.addresses["synthesize"]) as channel:
        stub = synthesize_pb2_grpc.SynthesizeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.CreateVoice(requests(consent=False), timeout=60)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "only with the speaker's consent" in str(refused.value.details())
        assert "--consent" in str(refused.value.details())
        # With consent the request gets past that check (to the next one: no cloning
        # model is configured on this system).
        with pytest.raises(grpc.RpcError) as no_model:
            stub.CreateVoice(requests(consent=True), timeout=60)
        assert no_model.value.code() is grpc.StatusCode.FAILED_PRECONDITION
