"""A device for tests and benchmarks: it streams microphone audio to
Converse at real-time pace in 20 ms chunks, and records every event with the
moment it arrived. A script of steps says what to send, including "wait for
this event first" (to talk over a reply: barge-in)."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np

from talker.v1 import audio_pb2, talker_pb2, talker_pb2_grpc
from tests.speech import to_s16le

RATE_HZ = 16_000
CHUNK_MS = 20


@dataclass
class Received:
    at: float  # time.monotonic() on arrival
    event: talker_pb2.ConverseEvent

    @property
    def kind(self) -> str:
        return str(self.event.WhichOneof("event"))


@dataclass
class Session:
    """What one Converse call sent and received."""

    events: list[Received] = field(default_factory=list)
    #: time.monotonic() when the device sent the last sample of each speech clip.
    speech_ends: list[float] = field(default_factory=list)
    trace_id: str = ""
    error: grpc.RpcError | None = None

    def of(self, kind: str, turn: int | None = None) -> list[Received]:
        return [
            r
            for r in self.events
            if r.kind == kind and (turn is None or r.event.turn_index == turn)
        ]

    def first(self, kind: str, turn: int | None = None) -> Received:
        found = self.of(kind, turn)
        assert found, f"no {kind} event for turn {turn}: {[r.kind for r in self.events]}"
        return found[0]

    def finals(self) -> list[Received]:
        return [r for r in self.of("transcript") if r.event.transcript.is_final]


# A step: an array of audio to play (speech if marked), or a predicate to wait for.
Step = tuple[str, object]


def speech(audio: np.ndarray) -> Step:
    return ("speech", audio)


def pause(audio: np.ndarray) -> Step:
    return ("audio", audio)


def text(typed: str) -> Step:
    return ("text", typed)


def call(action: Callable[[], object]) -> Step:
    """Runs `action` at this point of the script (e.g. kill a program mid-reply)."""
    return ("call", action)


def wait_for(predicate: Callable[[Received], bool], timeout_s: float = 60) -> Step:
    return ("wait", (predicate, timeout_s))


def converse(
    stub: talker_pb2_grpc.TalkerServiceStub,
    config: talker_pb2.ConverseConfig,
    steps: list[Step],
    trace_id: str = "",
    timeout_s: float = 300,
    metadata: list[tuple[str, str]] | None = None,
) -> Session:
    """Plays the steps as a live device and returns everything that came back."""
    config_in = talker_pb2.ConverseConfig()
    config_in.CopyFrom(config)
    if not config_in.HasField("input_format"):
        config_in.input_format.CopyFrom(
            audio_pb2.AudioFormat(
                encoding=audio_pb2.AUDIO_ENCODING_PCM_S16LE, sample_rate_hz=RATE_HZ, channels=1
            )
        )
    session = Session(trace_id=trace_id)
    arrived: queue.Queue[Received] = queue.Queue()

    def requests() -> Iterator[talker_pb2.ConverseRequest]:
        yield talker_pb2.ConverseRequest(config=config_in)
        clock = time.monotonic()
        step_bytes = RATE_HZ * CHUNK_MS // 1000 * 2
        seen: list[Received] = []
        for kind, value in steps:
            if kind == "wait":
                # A microphone never stops: silence flows while the device waits.
                predicate, wait_s = value  # type: ignore[misc]
                deadline = time.monotonic() + wait_s
                while not any(predicate(r) for r in seen):
                    if time.monotonic() > deadline:
                        raise AssertionError("the awaited event never came")
                    clock += CHUNK_MS / 1000
                    delay = clock - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    yield talker_pb2.ConverseRequest(audio=bytes(step_bytes))
                    while not arrived.empty():
                        seen.append(arrived.get_nowait())
                continue
            if kind == "text":
                yield talker_pb2.ConverseRequest(text=value)  # type: ignore[arg-type]
                continue
            if kind == "call":
                value()  # type: ignore[operator]
                continue
            pcm = to_s16le(value)  # type: ignore[arg-type]
            for offset in range(0, len(pcm), step_bytes):
                clock += CHUNK_MS / 1000
                delay = clock - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                yield talker_pb2.ConverseRequest(audio=pcm[offset : offset + step_bytes])
            if kind == "speech":
                session.speech_ends.append(time.monotonic())

    pairs = list(metadata or [])
    if trace_id:
        pairs.append(("x-trace-id", trace_id))
    call = stub.Converse(requests(), metadata=pairs, timeout=timeout_s)
    try:
        for response in call:
            received = Received(time.monotonic(), response.event)
            session.events.append(received)
            arrived.put(received)
    except grpc.RpcError as error:
        session.error = error
    return session
