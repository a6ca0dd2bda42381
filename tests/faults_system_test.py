"""Faults injected into a live conversation, every program a real process
under supervisord: `kill -9` each program in turn mid-reply; the client hears
UNAVAILABLE naming the stage (no hang), the program comes back SERVING, the
next turn succeeds, and the archive holds no partial file. Then supervisord
itself is restarted and everything comes back."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from services.common.health_probe import probe
from talker.v1 import chat_pb2, talker_pb2, talker_pb2_grpc
from tests.device import Received, call, converse, pause, speech, text, wait_for
from tests.portrait import create_astronaut
from tests.processes import Supervisor, serving_system
from tests.speech import piper_speech, silence

STORY = "Tell me a long story about a dragon and a brave knight."
CODE_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
# What has to be under way before the program is killed, so the kill lands mid-reply:
# synthesize dies as a sentence goes to it (between sentences no call is open, and
# a restart that ends before the next sentence leaves nothing to fail).
KILL_WHEN = {
    "chat": "reply_delta",
    "synthesize": "reply_sentence",
    "animate": "video_frame",
}


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    with serving_system(tmp_path_factory.mktemp("var")) as supervisor:
        yield supervisor


@pytest.fixture(scope="module")
def avatar_id(faulty: Supervisor) -> str:
    return create_astronaut(faulty.addresses["animate"])


def killer(system: Supervisor, program: str) -> Callable[[], None]:
    """kill -9 of the program as it runs now. The pid is looked up at once, so
    the kill itself is immediate when the script calls it (supervisorctl takes
    ~0.4 s, long enough for a stage to finish the work it should die in)."""
    pid = int(system.ctl("pid", f"talker:{program}").stdout.strip())
    return lambda: os.kill(pid, signal.SIGKILL)


def recovered(system: Supervisor, program: str) -> float:
    """Seconds until the program and the gateway's view of it are SERVING again."""
    started = time.monotonic()
    system.wait_status(system.addresses[program], timeout_s=180)
    system.wait_status(system.addresses["gateway"], timeout_s=60)
    deadline = time.monotonic() + 30
    while probe(system.addresses["gateway"], service="talker.v1.TalkerService") != "SERVING":
        assert time.monotonic() < deadline, "the gateway never saw the stage come back"
        time.sleep(0.1)
    return time.monotonic() - started


def next_turn_succeeds(system: Supervisor, avatar_id: str) -> None:
    stub = talker_pb2_grpc.TalkerServiceStub(grpc.insecure_channel(system.addresses["gateway"]))
    request = talker_pb2.AskRequest(
        text="What is the capital of France?",
        mode=talker_pb2.REPLY_MODE_AUDIO_VIDEO,
        avatar_id=avatar_id,
        sampling=chat_pb2.SamplingParams(greedy=True, max_new_tokens=24),
    )
    events = [r.event for r in stub.Ask(request, timeout=120)]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "turn_finished" and "video_frame" in kinds, kinds


def no_partial_files(system: Supervisor) -> None:
    archive = system.var_dir / "archive"
    partial = [p for p in archive.rglob("*") if ".partial" in p.name] if archive.exists() else []
    assert partial == []


@pytest.mark.parametrize("program", ["chat", "synthesize", "animate"])
def test_a_stage_killed_mid_reply_is_an_error_event_naming_it(faulty, avatar_id, program) -> None:  # type: ignore[no-untyped-def]
    stub = talker_pb2_grpc.TalkerServiceStub(grpc.insecure_channel(faulty.addresses["gateway"]))
    config = talker_pb2.ConverseConfig(
        mode=talker_pb2.REPLY_MODE_AUDIO_VIDEO,
        avatar_id=avatar_id,
        sampling=chat_pb2.SamplingParams(greedy=True, max_new_tokens=128),
    )

    def under_way(received: Received) -> bool:
        return received.kind == KILL_WHEN[program]

    def turn_over(received: Received) -> bool:
        return received.kind in ("turn_finished", "error")

    steps = [
        text(STORY),
        wait_for(under_way, 120),
        call(killer(faulty, program)),
        wait_for(turn_over, 30),
        pause(silence(0.2)),
    ]
    session = converse(stub, config, steps, trace_id=f"fault-{program}", timeout_s=120)
    assert session.error is None, session.error
    errors = session.of("error", turn=0)
    assert len(errors) == 1 and not session.of("turn_finished", turn=0), [
        r.kind
        for r in session.events
        if r.kind not in ("reply_delta", "reply_audio", "video_frame")
    ]
    error = errors[0].event.error
    assert error.code == CODE_UNAVAILABLE and f"The {program} (" in error.message, error
    assert error.trace_id == f"fault-{program}"
    seconds = recovered(faulty, program)
    print(f"{program}: killed mid-reply, SERVING again after {seconds:.1f} s")
    next_turn_succeeds(faulty, avatar_id)
    no_partial_files(faulty)


def test_asr_killed_mid_utterance_ends_the_call_naming_it(faulty, avatar_id) -> None:  # type: ignore[no-untyped-def]
    stub = talker_pb2_grpc.TalkerServiceStub(grpc.insecure_channel(faulty.addresses["gateway"]))
    config = talker_pb2.ConverseConfig(mode=talker_pb2.REPLY_MODE_TEXT)
    question = piper_speech(STORY)
    half = len(question) // 2
    steps = [
        speech(question[:half]),
        call(killer(faulty, "asr")),
        speech(question[half:]),
        pause(silence(2.0)),
    ]
    session = converse(stub, config, steps, trace_id="fault-asr", timeout_s=60)
    assert session.error is not None, [r.kind for r in session.events]
    assert session.error.code() is grpc.StatusCode.UNAVAILABLE
    assert "The asr (" in session.error.details() and "fault-asr" in session.error.details()
    seconds = recovered(faulty, "asr")
    print(f"asr: killed mid-utterance, SERVING again after {seconds:.1f} s")
    next_turn_succeeds(faulty, avatar_id)
    no_partial_files(faulty)


def test_gateway_killed_mid_reply_drops_the_call_and_comes_back(faulty, avatar_id) -> None:  # type: ignore[no-untyped-def]
    stub = talker_pb2_grpc.TalkerServiceStub(grpc.insecure_channel(faulty.addresses["gateway"]))
    config = talker_pb2.ConverseConfig(
        mode=talker_pb2.REPLY_MODE_AUDIO,
        sampling=chat_pb2.SamplingParams(greedy=True, max_new_tokens=128),
    )
    steps = [
        text(STORY),
        wait_for(lambda r: r.kind == "reply_audio", 120),
        call(killer(faulty, "gateway")),
        pause(silence(3.0)),
    ]
    session = converse(stub, config, steps, trace_id="fault-gateway", timeout_s=60)
    assert session.error is not None and session.error.code() is grpc.StatusCode.UNAVAILABLE
    seconds = recovered(faulty, "gateway")
    print(f"gateway: killed mid-reply, SERVING again after {seconds:.1f} s")
    next_turn_succeeds(faulty, avatar_id)
    no_partial_files(faulty)


def test_supervisord_restarted_as_a_whole_brings_every_program_back(faulty, avatar_id) -> None:  # type: ignore[no-untyped-def]
    faulty.stop()
    for address in faulty.addresses.values():
        assert probe(address, timeout_s=1) != "SERVING"
    faulty.start()
    for address in faulty.addresses.values():
        faulty.wait_status(address, timeout_s=240)
    # Avatars persisted across the restart; the whole chain works again.
    next_turn_succeeds(faulty, avatar_id)
    no_partial_files(faulty)
