"""Load: N devices talking to one host at once, every program a real process
under supervisord. For N = 1, 2, 4, 8 devices (BENCH_LOAD_DEVICES), each opens
a Converse call and asks BENCH_LOAD_TURNS spoken questions (audio and video
replies), the next one after it has heard the answer, as a person would. The
devices' first questions are spread over one turn's length (BENCH_LOAD_SPREAD_S),
so they collide as independent callers do, not all on the same instant. Per N: how many were
admitted and how many refused (RESOURCE_EXHAUSTED and its retry hint), first
audio and first video frame from the end of speech (p50/p95, and p50 against
one device's in the same run), and fairness (the slowest device's p50 over
the fastest's).

The gateway runs with its default capacity unless BENCH_LOAD_CAPACITY is set;
set it high (e.g. 64) to see what the host does unrefused, which is how the
default was chosen: the largest N whose first audio (p50 and p95) stays
within twice one device's."""

from __future__ import annotations

import os
import threading
import time

import grpc

from bench.gateway_bench import QUESTIONS, listened, trimmed
from bench.system import running_system
from bench.tables import percentile, print_table
from gateway.config import GatewaySettings
from services.common.errors import RETRY_AFTER_KEY
from talker.v1 import chat_pb2, talker_pb2, talker_pb2_grpc
from tests.device import Session, converse, pause, speech, wait_for
from tests.speech import silence

DEVICES = [int(n) for n in os.environ.get("BENCH_LOAD_DEVICES", "1,2,4,8").split(",")]
TURNS = int(os.environ.get("BENCH_LOAD_TURNS", "3"))
# About one spoken turn on this host (question, answer, the pause after it).
SPREAD_S = float(os.environ.get("BENCH_LOAD_SPREAD_S", "6"))


def device_steps(index: int, count: int) -> list:  # type: ignore[type-arg]
    steps: list = [pause(silence(0.5 + SPREAD_S * index / count))]  # type: ignore[type-arg]
    for n in range(TURNS):
        steps.append(speech(trimmed(QUESTIONS[(index + n) % len(QUESTIONS)])))
        steps += [wait_for(listened(n), 300), pause(silence(0.3))]
    return steps


def run_devices(
    stub: talker_pb2_grpc.TalkerServiceStub, avatar_id: str, count: int
) -> list[Session]:
    config = talker_pb2.ConverseConfig(
        user_id="load",
        scene="load",
        mode=talker_pb2.REPLY_MODE_AUDIO_VIDEO,
        avatar_id=avatar_id,
        language="en",
        sampling=chat_pb2.SamplingParams(greedy=True, max_new_tokens=48),
    )
    sessions: list[Session | None] = [None] * count

    def run(index: int) -> None:
        sessions[index] = converse(
            stub,
            config,
            device_steps(index, count),
            trace_id=f"load-{count}-{index}",
            timeout_s=1800,
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [s for s in sessions if s is not None]


def first_after(session: Session, kind: str) -> list[float]:
    """ms from each question's end of speech to the turn's first `kind` event."""
    values = []
    for n, speech_end in enumerate(session.speech_ends):
        arrivals = [r.at for r in session.of(kind, n)]
        if arrivals and session.of("turn_finished", n):
            values.append((arrivals[0] - speech_end) * 1000)
    return values


def refused(session: Session) -> bool:
    error = session.error
    return error is not None and error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def main() -> None:
    capacity = os.environ.get("BENCH_LOAD_CAPACITY")
    env = {"TALKER_GATEWAY_MAX_CONVERSATIONS": capacity} if capacity else {}
    effective = int(capacity) if capacity else GatewaySettings().max_conversations
    rows = []
    baseline = None
    refusals_from = None
    hints: set[str] = set()
    with running_system(env) as (system, avatar_id):
        stub = talker_pb2_grpc.TalkerServiceStub(grpc.insecure_channel(system.addresses["gateway"]))
        for count in DEVICES:
            started = time.monotonic()
            sessions = run_devices(stub, avatar_id, count)
            took = time.monotonic() - started
            admitted = [s for s in sessions if not refused(s)]
            turned_away = [s for s in sessions if refused(s)]
            for session in turned_away:
                trailers = dict(session.error.trailing_metadata() or ())  # type: ignore[union-attr]
                hints.add(trailers.get(RETRY_AFTER_KEY, "none"))
            failed = [s for s in admitted if s.error is not None or s.of("error")]
            audio = [v for s in admitted for v in first_after(s, "reply_audio")]
            frames = [v for s in admitted for v in first_after(s, "video_frame")]
            per_device = [percentile(first_after(s, "reply_audio"), 50) for s in admitted]
            per_device = [v for v in per_device if v == v]  # no NaN: a device with no turn
            p50 = percentile(audio, 50)
            if baseline is None:
                baseline = p50
            if turned_away and refusals_from is None:
                refusals_from = count
            turns = sum(len(s.of("turn_finished")) for s in admitted)
            cut = sum(len(s.of("interrupted")) for s in admitted)
            rows.append(
                [
                    count,
                    len(admitted),
                    len(turned_away),
                    len(failed),
                    f"{turns}/{len(admitted) * TURNS}",
                    cut,
                    p50,
                    percentile(audio, 95),
                    p50 / baseline if baseline else float("nan"),
                    percentile(frames, 50),
                    percentile(frames, 95),
                    max(per_device) / min(per_device) if per_device else float("nan"),
                    took,
                ]
            )
            print(f"  {count} devices: done in {took:.0f} s; load average {os.getloadavg()[0]:.1f}")
    print_table(
        f"Load: N devices talking at once, {TURNS} spoken questions each, audio + video "
        f"replies; gateway capacity {effective}; ms from the end of speech",
        [
            "devices",
            "admitted",
            "refused",
            "failed",
            "turns",
            "interrupted",
            "first audio p50",
            "first audio p95",
            "p50 / 1 device",
            "first frame p50",
            "first frame p95",
            "fairness (slowest/fastest device p50)",
            "wall s",
        ],
        rows,
    )
    # rows[0] is one device: the baseline of both percentiles.
    within = [
        row[0]
        for row in rows
        if row[2] == 0 and row[6] <= 2 * rows[0][6] and row[7] <= 2 * rows[0][7]  # type: ignore[operator]
    ]
    print(
        "largest N with first audio p50 and p95 within 2x one device's: "
        f"{max(within, default='none')}"  # type: ignore[type-var]
    )
    print(
        f"refusals begin at N = {refusals_from or 'none of ' + str(DEVICES)}; retry hints "
        f"({RETRY_AFTER_KEY}): {sorted(hints) or 'none given'}; load average at the end "
        f"{os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
