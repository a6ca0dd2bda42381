"""Gateway: the latency of a spoken turn, end to end, every program a real
process under supervisord, and what the gateway itself adds per hop.

A device plays questions at real-time pace in 20 ms chunks (keeping the
microphone open with silence between them) and stamps each event as it
arrives; it asks the next question 0.3 s after the reply has played, as a
person would. Milestones are measured from the true end of speech (the last
audible sample of the question leaving the device).

Hop overhead: the same work called through the gateway and directly on the
stage, in pairs whose order alternates, in one run; the median of the paired
differences is what the gateway adds on that hop (its own parsing, checks,
forwarding and queueing)."""

from __future__ import annotations

import json
import os
import threading
import time

import grpc
import numpy as np

from bench.system import running_system
from bench.tables import percentile, print_table
from talker.v1 import (
    animate_pb2,
    animate_pb2_grpc,
    asr_pb2,
    asr_pb2_grpc,
    audio_pb2,
    chat_pb2,
    chat_pb2_grpc,
    synthesize_pb2,
    synthesize_pb2_grpc,
    talker_pb2,
    talker_pb2_grpc,
)
from tests.device import converse, pause, speech, wait_for
from tests.processes import Supervisor
from tests.speech import piper_speech, silence, speech_end_s, to_s16le

QUESTIONS = [
    "What is the capital of France?",
    "How are you today?",
    "What colour is the sky?",
    "Can you recommend a good book?",
    "What is two plus two?",
    "Where do penguins live?",
    "What is your name?",
    "Tell me something about the moon.",
    "What time is it in London?",
    "Do you like music?",
]
TURNS = int(os.environ.get("TALKER_BENCH_TURNS", "20"))
HOP_ROUNDS = int(os.environ.get("TALKER_BENCH_HOP_ROUNDS", "20"))
SETTLE_S = 0.2
MILESTONES = [
    ("final transcript", "transcript"),
    ("first reply token", "reply_delta"),
    ("first sentence", "reply_sentence"),
    ("first audio chunk", "reply_audio"),
    ("first video frame", "video_frame"),
]
S16_16K = audio_pb2.AudioFormat(
    encoding=audio_pb2.AUDIO_ENCODING_PCM_S16LE, sample_rate_hz=16000, channels=1
)


def trimmed(text: str) -> np.ndarray:
    """A question that ends exactly at its last audible sample."""
    audio = piper_speech(text)
    return audio[: int(speech_end_s(audio) * 16000)]


def listened(turn_index: int):  # type: ignore[no-untyped-def]
    """A predicate for the device: turn `turn_index` is over and its reply has
    played (a person asks the next question after hearing the answer, not
    while the avatar is still talking)."""
    first_audio: dict[str, float] = {}

    def done(received) -> bool:  # type: ignore[no-untyped-def]
        if received.event.turn_index != turn_index:
            return False
        if received.kind == "reply_audio":
            first_audio.setdefault("at", received.at)
        if received.kind in ("error", "interrupted"):
            return True
        if received.kind != "turn_finished":
            return False
        playing_from = first_audio.get("at", received.at)
        reply_s = received.event.turn_finished.reply_audio_ms / 1000
        return time.monotonic() >= playing_from + reply_s

    return done


def spoken_turns(stub: talker_pb2_grpc.TalkerServiceStub, avatar_id: str):  # type: ignore[no-untyped-def]
    config = talker_pb2.ConverseConfig(
        user_id="bench",
        scene="bench",
        mode=talker_pb2.REPLY_MODE_AUDIO_VIDEO,
        avatar_id=avatar_id,
        sampling=chat_pb2.SamplingParams(greedy=True, max_new_tokens=48),
    )
    steps: list = [pause(silence(0.5))]
    for n in range(TURNS):
        steps.append(speech(trimmed(QUESTIONS[n % len(QUESTIONS)])))
        steps += [wait_for(listened(n), 120), pause(silence(0.3))]
    session = converse(stub, config, steps, trace_id="bench-gateway", timeout_s=3600)
    if session.error is not None:
        raise SystemExit(f"gateway bench: the conversation failed: {session.error}")
    rows = []
    latencies: dict[str, list[float]] = {label: [] for label, _ in MILESTONES}
    finished = 0
    for n, speech_end in enumerate(session.speech_ends):
        turn_events = [r for r in session.events if r.event.turn_index == n]
        if not any(r.kind == "turn_finished" for r in turn_events):
            continue
        finished += 1
        for label, kind in MILESTONES:
            arrivals = [
                r.at
                for r in turn_events
                if r.kind == kind and (kind != "transcript" or r.event.transcript.is_final)
            ]
            if arrivals:
                latencies[label].append((arrivals[0] - speech_end) * 1000)
    for label, _ in MILESTONES:
        values = latencies[label]
        rows.append([label, len(values), percentile(values, 50), percentile(values, 95)])
    print_table(
        f"Spoken turns through the gateway: ms from the end of speech ({finished}/{TURNS} turns finished)",
        ["milestone", "turns", "p50 ms", "p95 ms"],
        rows,
    )
    audio_p50 = percentile(latencies["first audio chunk"], 50)
    audio_p95 = percentile(latencies["first audio chunk"], 95)
    video_p50 = percentile(latencies["first video frame"], 50)
    print(
        f"\ntargets: end of speech -> first audio {audio_p50:.0f} ms p50 (target < 1000), "
        f"{audio_p95:.0f} ms p95 (target < 1500); -> first video frame {video_p50:.0f} ms p50 "
        "(target < 1100)"
    )
    return session


def dump_turns(session, timelines: list[dict]) -> None:  # type: ignore[no-untyped-def]
    """Each turn's words and timeline, to TALKER_BENCH_TURNS_FILE (JSON lines), to
    see which turns are slow and why."""
    path = os.environ.get("TALKER_BENCH_TURNS_FILE")
    if not path:
        return
    finished = [r.event.turn_finished for r in session.events if r.kind == "turn_finished"]
    with open(path, "w") as out:
        for n, done in enumerate(finished):
            row = {"heard": done.user_text, "reply": done.reply_text}
            row.update(timelines[n] if n < len(timelines) else {})
            out.write(json.dumps(row) + "\n")


def reply_timelines(system: Supervisor) -> list[dict]:
    """Where a turn's time goes, from the gateway's own log: ms from the start of
    the reply pipeline (a speculative reply starts before the end of utterance)
    to each milestone, as the gateway saw them (held events included)."""
    values: dict[str, list[float]] = {}
    timelines = []
    for line in system.log("gateway").splitlines():
        if '"turn finished"' not in line:
            continue
        try:
            timeline = json.loads(line).get("reply_timeline") or {}
        except ValueError:
            continue
        timelines.append(timeline)
        for name, ms in timeline.items():
            values.setdefault(name, []).append(ms)
    order = [
        "speculation_lead_ms",
        "first_token_ms",
        "first_sentence_ms",
        "first_audio_ms",
        "first_frame_ms",
        "asr_final_ms",
    ]
    rows = [
        [
            name.removesuffix("_ms"),
            len(values[name]),
            percentile(values[name], 50),
            percentile(values[name], 95),
        ]
        for name in order
        if values.get(name)
    ]
    print_table(
        "Inside the gateway: ms from the start of the reply pipeline (speculation_lead: how "
        "long before the end of utterance a speculative reply began)",
        ["milestone", "turns", "p50 ms", "p95 ms"],
        rows,
    )
    return timelines


def timed_first(responses, want) -> float:  # type: ignore[no-untyped-def]
    """ms until the first response `want` accepts; the rest is drained."""
    started = time.perf_counter()
    first = None
    for response in responses:
        if first is None and want(response):
            first = (time.perf_counter() - started) * 1000
    assert first is not None, "the awaited response never came"
    return first


def event_is(kind: str):  # type: ignore[no-untyped-def]
    return lambda response: response.event.WhichOneof("event") == kind


def wait_for_archive(system: Supervisor, videos: int, timeout_s: float = 300) -> None:
    """Until the archive videos of the spoken turns are rendered: they render in
    the background, and would otherwise run under the hop measurements."""
    deadline = time.monotonic() + timeout_s
    while len(list((system.var_dir / "archive").rglob("*.mp4"))) < videos:
        if time.monotonic() > deadline:
            print(f"(archive still rendering after {timeout_s:.0f} s)")
            return
        time.sleep(1)


def hop_overhead(system: Supervisor, avatar_id: str) -> None:
    gateway = talker_pb2_grpc.TalkerServiceStub(grpc.insecure_channel(system.addresses["gateway"]))
    asr = asr_pb2_grpc.AsrServiceStub(grpc.insecure_channel(system.addresses["asr"]))
    chat = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(system.addresses["chat"]))
    tts = synthesize_pb2_grpc.SynthesizeServiceStub(
        grpc.insecure_channel(system.addresses["synthesize"])
    )
    animate = animate_pb2_grpc.AnimateServiceStub(
        grpc.insecure_channel(system.addresses["animate"])
    )
    sampling = chat_pb2.SamplingParams(greedy=True, max_new_tokens=8)
    sentence = "The capital of France is Paris."
    speech_pcm = to_s16le(piper_speech(sentence))
    pairs: dict[str, tuple[list[float], list[float]]] = {
        k: ([], []) for k in ("asr", "chat", "synthesize", "animate")
    }

    def animate_requests():  # type: ignore[no-untyped-def]
        yield animate_pb2.AnimateRequest(
            config=animate_pb2.AnimateConfig(avatar_id=avatar_id, format=S16_16K)
        )
        for offset in range(0, len(speech_pcm), 6400):
            yield animate_pb2.AnimateRequest(audio=speech_pcm[offset : offset + 6400])

    # ASR: the live path, a device streaming at real-time pace, from the end of
    # its speech to the final transcript (as in the spoken turns above).
    question = to_s16le(trimmed(QUESTIONS[0]))
    spoken = question + to_s16le(silence(0.8))
    chunks = [spoken[offset : offset + 640] for offset in range(0, len(spoken), 640)]
    speech_chunks = -(-len(question) // 640)

    def to_final(open_call, first, wrap, is_final) -> float:  # type: ignore[no-untyped-def]
        """ms from the end of speech to the final transcript, on a stream opened by
        `open_call` with `first`, then every chunk wrapped by `wrap`, in real time."""
        done = threading.Event()
        speech_end: list[float] = []

        def requests():  # type: ignore[no-untyped-def]
            yield first
            clock = time.monotonic()
            for index, chunk in enumerate(chunks):
                clock += 0.02
                time.sleep(max(0.0, clock - time.monotonic()))
                yield wrap(chunk)
                if index + 1 == speech_chunks:
                    speech_end.append(time.monotonic())
            done.wait(60)

        call = open_call(requests())
        try:
            for response in call:
                if is_final(response):
                    return (time.monotonic() - speech_end[0]) * 1000
        finally:
            done.set()
            call.cancel()
        raise AssertionError("no final transcript")

    def via_asr(n: int) -> float:
        config = talker_pb2.ConverseConfig(
            mode=talker_pb2.REPLY_MODE_TEXT, input_format=S16_16K, language="en", sampling=sampling
        )
        return to_final(
            gateway.Converse,
            talker_pb2.ConverseRequest(config=config),
            lambda chunk: talker_pb2.ConverseRequest(audio=chunk),
            lambda r: r.event.WhichOneof("event") == "transcript" and r.event.transcript.is_final,
        )

    def direct_asr(n: int) -> float:
        config = asr_pb2.StreamingRecognitionConfig(
            format=S16_16K,
            config=asr_pb2.RecognitionConfig(language="en"),
            speculative_results=True,  # as the gateway asks
        )
        return to_final(
            asr.StreamingRecognize,
            asr_pb2.StreamingRecognizeRequest(config=config),
            lambda chunk: asr_pb2.StreamingRecognizeRequest(audio=chunk),
            lambda r: r.WhichOneof("response") == "result" and r.result.is_final,
        )

    def via_chat(n: int) -> float:  # a fresh session each time, to the first token
        request = talker_pb2.AskRequest(
            text=QUESTIONS[0], mode=talker_pb2.REPLY_MODE_TEXT, sampling=sampling
        )
        return timed_first(gateway.Ask(request), event_is("reply_delta"))

    def direct_chat(n: int) -> float:
        request = chat_pb2.ChatRequest(session_id=f"hop-{n}", text=QUESTIONS[0], sampling=sampling)
        return timed_first(chat.Chat(request), lambda r: r.WhichOneof("response") == "delta")

    for n in range(HOP_ROUNDS):
        for hop, via, direct in (("asr", via_asr, direct_asr), ("chat", via_chat, direct_chat)):
            # Whichever goes second runs on a machine the first has just warmed (or
            # left threads spinning on): the order alternates, and each call starts
            # after a short pause, when the last one's work has settled.
            order = [(0, via), (1, direct)] if n % 2 == 0 else [(1, direct), (0, via)]
            for side, measure in order:
                time.sleep(SETTLE_S)
                pairs[hop][side].append(measure(n))
    # Apart from the rounds above: each of these turns leaves an archive video to
    # render in the background, which would otherwise run under the next asr/chat
    # pair and be counted as the gateway's overhead.
    for _ in range(HOP_ROUNDS):
        # Synthesize and Animate: one sentence to its first audio chunk / first frame.
        # Through the gateway their hop is measured inside the turn (first sentence ->
        # first audio, first audio -> first frame), as the client sees it.
        via = list(
            gateway.Ask(
                talker_pb2.AskRequest(
                    text="Say exactly: The capital of France is Paris.",
                    mode=talker_pb2.REPLY_MODE_AUDIO_VIDEO,
                    avatar_id=avatar_id,
                    output_sample_rate_hz=16000,
                    sampling=chat_pb2.SamplingParams(greedy=True, max_new_tokens=12),
                )
            )
        )
        timings = via[-1].event.turn_finished.timings
        if timings.first_audio_ms and timings.first_sentence_ms:
            pairs["synthesize"][0].append(timings.first_audio_ms - timings.first_sentence_ms)
        if timings.first_frame_ms and timings.first_audio_ms:
            pairs["animate"][0].append(timings.first_frame_ms - timings.first_audio_ms)
        direct = tts.Synthesize(
            synthesize_pb2.SynthesizeRequest(
                text=sentence, output_format=audio_pb2.AudioFormat(sample_rate_hz=16000)
            )
        )
        pairs["synthesize"][1].append(
            timed_first(direct, lambda r: r.WhichOneof("response") == "chunk")
        )
        pairs["animate"][1].append(timed_first(animate.Animate(animate_requests()), lambda r: True))
    rows = []
    for hop, (via_ms, direct_ms) in pairs.items():
        via50, direct50 = percentile(via_ms, 50), percentile(direct_ms, 50)
        # Each round measures both back to back: the median of the paired
        # differences cancels most of the machine's drift between rounds.
        paired = [v - d for v, d in zip(via_ms, direct_ms, strict=False)]
        rows.append([hop, len(via_ms), via50, direct50, percentile(paired, 50)])
    print_table(
        "Gateway overhead per hop: p50 ms through the gateway vs calling the stage directly",
        ["hop", "rounds", "via gateway p50", "direct p50", "overhead ms (paired median)"],
        rows,
    )
    print(
        "\nasr: a device streaming in real time (Converse vs StreamingRecognize), end of speech "
        "-> final transcript. chat: a text Ask vs Chat, to the first token (Ask's checks "
        "included). "
        "synthesize/animate: measured inside a live turn (sentence -> first audio, first audio "
        "-> first frame) while chat is still generating on the same 2 cores, vs an idle direct "
        "call: an upper bound on the hop's cost."
    )


def main() -> None:
    with running_system() as (system, avatar_id):
        stub = talker_pb2_grpc.TalkerServiceStub(grpc.insecure_channel(system.addresses["gateway"]))
        session = spoken_turns(stub, avatar_id)
        dump_turns(session, reply_timelines(system))
        if HOP_ROUNDS:
            wait_for_archive(system, len(session.of("turn_finished")))
            hop_overhead(system, avatar_id)


if __name__ == "__main__":
    main()
