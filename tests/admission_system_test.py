"""Admission control end to end: a real gateway process with capacity 2 in
front of the real stages. Two devices talk; a third caller is refused at once
with RESOURCE_EXHAUSTED, a sentence and a retry hint, while the two go on
with their next turns; once one hangs up, a new caller is admitted."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator

import grpc
import pytest

from services.common.errors import RETRY_AFTER_KEY
from talker.v1 import chat_pb2, talker_pb2, talker_pb2_grpc
from tests.device import Received, Session, call, converse, pause, speech, wait_for
from tests.processes import VENV_BIN, free_port, metric
from tests.speech import piper_speech, silence

CAPACITY = 2
RETRY_AFTER_S = 3
CONFIG = talker_pb2.ConverseConfig(
    user_id="admission",
    mode=talker_pb2.REPLY_MODE_TEXT,
    language="en",
    silence_timeout_s=600,  # the devices keep the line open, silent, between turns
    sampling=chat_pb2.SamplingParams(greedy=True, max_new_tokens=12),
)


@pytest.fixture(scope="module")
def small_gateway(system, tmp_path_factory) -> Iterator[tuple[str, int]]:  # type: ignore[no-untyped-def]
    """A second gateway process on the system's stages, admitting CAPACITY calls."""
    port, metrics_port = free_port(), free_port()
    var_dir = tmp_path_factory.mktemp("small-gateway")
    env = {
        **system.env,
        "TALKER_VAR_DIR": str(var_dir),
        "TALKER_GATEWAY_PORT": str(port),
        "TALKER_GATEWAY_METRICS_PORT": str(metrics_port),
        "TALKER_GATEWAY_MAX_CONVERSATIONS": str(CAPACITY),
        "TALKER_GATEWAY_BUSY_RETRY_AFTER_S": str(RETRY_AFTER_S),
        "TALKER_GATEWAY_ARCHIVE_MEDIA": "record",
        **{
            f"TALKER_GATEWAY_{stage.upper()}_ADDRESS": system.addresses[stage]
            for stage in ("asr", "chat", "synthesize", "animate")
        },
    }
    address = f"127.0.0.1:{port}"
    with (var_dir / "gateway.log").open("wb") as log:
        process = subprocess.Popen(
            [str(VENV_BIN / "python"), "-m", "gateway"], env=env, stdout=log, stderr=log
        )
        try:
            system.wait_status(address, timeout_s=120)
            yield address, metrics_port
        finally:
            process.terminate()
            process.wait(30)


def started(received: Received) -> bool:
    return received.kind == "started"


def finished(turn: int):  # type: ignore[no-untyped-def]
    def done(received: Received) -> bool:
        return received.kind in ("turn_finished", "error") and received.event.turn_index == turn

    return done


def device(
    stub: talker_pb2_grpc.TalkerServiceStub,
    admitted: threading.Event,
    go_on: threading.Event,
    hang_up: threading.Event,
    out: list[Session],
) -> threading.Thread:
    """Talks one turn, waits for `go_on`, talks a second turn, waits for `hang_up`."""
    steps = [
        wait_for(started, 60),
        call(admitted.set),
        pause(silence(0.3)),
        speech(piper_speech("What is the capital of France?")),
        wait_for(finished(0), 180),
        # A microphone never stops: silence flows while the device waits.
        wait_for(lambda _: go_on.is_set(), 180),
        speech(piper_speech("And what is the capital of Italy?")),
        wait_for(finished(1), 180),
        wait_for(lambda _: hang_up.is_set(), 400),
    ]

    def run() -> None:
        out.append(converse(stub, CONFIG, steps, timeout_s=600))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def refusal(stub: talker_pb2_grpc.TalkerServiceStub) -> grpc.RpcError:
    """A Converse that sends its config and then nothing: a full gateway must
    refuse it without waiting for audio (a 30 s deadline would end it otherwise)."""
    hold = threading.Event()

    def requests() -> Iterator[talker_pb2.ConverseRequest]:
        yield talker_pb2.ConverseRequest(config=CONFIG)
        hold.wait(60)

    try:
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Converse(requests(), timeout=30))
    finally:
        hold.set()
    return caught.value  # type: ignore[return-value]


def test_the_call_past_capacity_is_refused_while_the_others_go_on(small_gateway) -> None:  # type: ignore[no-untyped-def]
    address, metrics_port = small_gateway
    stub = talker_pb2_grpc.TalkerServiceStub(grpc.insecure_channel(address))
    admitted = [threading.Event() for _ in range(CAPACITY)]
    go_on = threading.Event()
    hang_ups = [threading.Event() for _ in range(CAPACITY)]
    sessions: list[list[Session]] = [[] for _ in range(CAPACITY)]
    threads = [device(stub, admitted[n], go_on, hang_ups[n], sessions[n]) for n in range(CAPACITY)]
    try:
        for event in admitted:
            assert event.wait(120), "a device within capacity was not admitted"

        error = refusal(stub)
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "busy" in error.details() and "Try again in 3 s" in error.details()
        trailers = dict(error.trailing_metadata() or ())
        assert trailers.get(RETRY_AFTER_KEY) == str(RETRY_AFTER_S * 1000)
        # An Ask needs a slot too.
        with pytest.raises(grpc.RpcError) as asked:
            list(stub.Ask(talker_pb2.AskRequest(text="Hello?"), timeout=30))
        assert asked.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert metric(metrics_port, "talker_gateway_conversations_refused_total") >= 1

        # The admitted conversations were not disturbed: each takes its next turn.
        go_on.set()
        hang_ups[0].set()
        threads[0].join(240)
        assert not threads[0].is_alive()
        first = sessions[0][0]
        assert first.error is None, first.error
        assert [r.event.turn_index for r in first.of("turn_finished")] == [0, 1]
        assert not first.of("error")

        # One slot is free again (the other device still talks): a new caller gets in.
        newcomer = converse(
            stub,
            CONFIG,
            [pause(silence(0.3)), speech(piper_speech("How are you?")), wait_for(finished(0), 180)],
            timeout_s=300,
        )
        assert newcomer.error is None, newcomer.error
        assert newcomer.of("turn_finished")
    finally:
        go_on.set()
        for event in hang_ups:
            event.set()
        for thread in threads:
            thread.join(240)
    second = sessions[1][0]
    assert second.error is None, second.error
    assert [r.event.turn_index for r in second.of("turn_finished")] == [0, 1]
