"""The gateway end to end, every program a real process under supervisord:
spoken questions in, answers out as text, audio, video and mp4; trace ids in
every log; barge-in; a stopped stage named within 2 s; bad ids refused."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
from datetime import UTC, datetime

import av
import grpc
import numpy as np
import pytest
from PIL import Image
from skimage import data

from gateway.samples import spoken_question
from services.common.health_probe import probe
from talker.v1 import (
    asr_pb2,
    audio_pb2,
    chat_pb2,
    chat_pb2_grpc,
    talker_pb2,
    talker_pb2_grpc,
)
from tests.device import converse, pause, speech, wait_for
from tests.portrait import create_astronaut
from tests.processes import VENV_BIN
from tests.speech import piper_speech, silence, to_s16le, to_wav, word_error_rate

PROGRAM_NAMES = ("asr", "chat", "synthesize", "animate", "gateway")
QUESTION = "What is the capital of France?"
STORY = "Tell me a long story about a dragon and a brave knight."


@pytest.fixture(scope="module")
def gateway(system) -> talker_pb2_grpc.TalkerServiceStub:  # type: ignore[no-untyped-def]
    channel = grpc.insecure_channel(system.addresses["gateway"])
    return talker_pb2_grpc.TalkerServiceStub(channel)


@pytest.fixture(scope="module")
def avatar_id(system) -> str:  # type: ignore[no-untyped-def]
    return create_astronaut(system.addresses["animate"])


def streams_of(path) -> dict[str, tuple[str, float]]:  # type: ignore[no-untyped-def]
    with av.open(str(path)) as container:
        return {
            s.type: (s.codec_context.name, float(s.duration * s.time_base))
            for s in container.streams
        }


def test_cli_turns_a_spoken_question_and_a_portrait_into_an_answer_video(system, tmp_path) -> None:
    question = tmp_path / "question.wav"
    question.write_bytes(spoken_question())
    portrait = tmp_path / "portrait.png"
    Image.fromarray(data.astronaut()).save(portrait)
    out = tmp_path / "answer.mp4"
    trace_id = "test-answer-video"
    result = subprocess.run(
        [
            str(VENV_BIN / "talker"),
            "--gateway", system.addresses["gateway"],
            "--animate", system.addresses["animate"],
            "--trace-id", trace_id,
            "ask", "--audio", str(question), "--portrait", str(portrait), "--out", str(out),
            "--user", "tester", "--scene", "cli-test",
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    print(result.stdout)
    assert result.returncode == 0, result.stderr
    # Whisper base has once heard "France" as "friends" on a fresh machine: the
    # test is about the path, not the model's ear.
    assert "capital of" in result.stdout.lower()
    streams = streams_of(out)
    assert streams["video"][0] == "h264" and streams["audio"][0] == "aac"
    assert abs(streams["video"][1] - streams["audio"][1]) <= 0.04, streams  # one frame at 25 fps

    # Archived under {root}/{date}/{user}_{timestamp}_{scene}.mp4 with its record, nothing partial.
    day = system.var_dir / "archive" / datetime.now(UTC).strftime("%Y-%m-%d")
    videos = sorted(day.glob("tester_*_cli-test.mp4"))
    assert len(videos) == 1, sorted(p.name for p in day.iterdir())
    record = json.loads(videos[0].with_suffix(".json").read_text())
    assert record["trace_id"] == trace_id and record["status"] == "finished"
    assert "capital of" in record["user_text"].lower() and record["reply_text"]
    assert record["timings_ms"]["first_audio_ms"] > 0 and record["avatar_id"]
    models = {stage: record["stages"][stage]["model"] for stage in record["stages"]}
    assert "whisper" in models["asr"] and "qwen2.5" in models["chat"], models
    assert "piper" in models["synthesize"] and "animator" in models["animate"], models
    assert record["voices_used"] == ["en_US-joe-medium"]  # named by Synthesize's trailer
    assert streams_of(videos[0])["video"][0] == "h264"
    assert not [p for p in day.iterdir() if ".partial" in p.name]

    # One grep of the trace id shows the whole path.
    for program in PROGRAM_NAMES:
        lines = [line for line in system.log(program).splitlines() if trace_id in line]
        assert lines, f"{trace_id} is not in the {program} log"
        assert all(json.loads(line)["trace_id"] == trace_id for line in lines)


def test_converse_streams_transcripts_reply_audio_and_video(gateway, avatar_id) -> None:
    config = talker_pb2.ConverseConfig(
        user_id="device-1",
        scene="kiosk",
        mode=talker_pb2.REPLY_MODE_AUDIO_VIDEO,
        avatar_id=avatar_id,
        interim_results=True,
        output_sample_rate_hz=16000,
        sampling=chat_pb2.SamplingParams(greedy=True, max_new_tokens=96),
    )
    steps = [pause(silence(0.5)), speech(piper_speech(STORY)), pause(silence(1.5))]
    session = converse(gateway, config, steps, trace_id="test-converse")
    assert session.error is None, session.error
    kinds = [r.kind for r in session.events]
    assert kinds[0] == "started" and kinds[-1] == "turn_finished", [
        str(r.event)[:300] for r in session.events if r.kind in ("error", "transcript")
    ]
    assert session.events[0].event.started.trace_id == "test-converse"
    speech_events = [r.event.speech.type for r in session.of("speech")]
    assert speech_events[:2] == [
        asr_pb2.SPEECH_EVENT_TYPE_SPEECH_STARTED,
        asr_pb2.SPEECH_EVENT_TYPE_END_OF_UTTERANCE,
    ]
    finals = session.finals()
    assert len(finals) == 1 and word_error_rate([STORY], [finals[0].event.transcript.text]) <= 0.2
    # The order of a turn: transcript, reply text, audio, video, the end.
    first = {
        k: kinds.index(k) for k in ("reply_delta", "reply_sentence", "reply_audio", "video_frame")
    }
    assert kinds.index("transcript") < first["reply_delta"] < first["reply_sentence"]
    # Speech may start on the opening clause, before the first sentence is complete.
    assert first["reply_delta"] < first["reply_audio"] < first["video_frame"]
    # Pipelined: the reply is spoken and shown while it is still being written.
    last_delta = len(kinds) - 1 - kinds[::-1].index("reply_delta")
    assert len(session.of("reply_sentence")) >= 2
    assert first["reply_audio"] < last_delta and first["video_frame"] < last_delta, kinds
    audio = session.of("reply_audio", turn=0)
    assert {r.event.reply_audio.format.sample_rate_hz for r in audio} == {16000}
    offsets = [r.event.reply_audio.offset_samples for r in audio]
    sizes = [len(r.event.reply_audio.audio) // 2 for r in audio]
    assert offsets == [sum(sizes[:i]) for i in range(len(sizes))]  # one timeline across sentences
    audio_ms = sum(sizes) / 16
    frames = session.of("video_frame", turn=0)
    stamps = [r.event.video_frame.timestamp_ms for r in frames]
    assert stamps == sorted(stamps) and abs(stamps[-1] - audio_ms) <= 80, (stamps[-1], audio_ms)
    finished = session.first("turn_finished").event.turn_finished
    assert finished.trace_id == "test-converse" and finished.reply_text
    assert abs(finished.reply_audio_ms - audio_ms) <= 1
    timings = finished.timings
    assert 0 < timings.first_token_ms <= timings.first_audio_ms <= timings.first_frame_ms
    assert finished.archive_path.endswith("_kiosk.mp4") and "device-1_" in finished.archive_path


def test_talking_over_the_reply_cuts_it(system, gateway) -> None:
    config = talker_pb2.ConverseConfig(
        user_id="device-2",
        mode=talker_pb2.REPLY_MODE_AUDIO,
        silence_timeout_s=300,  # a busy machine may think for a while; the device waits
        sampling=chat_pb2.SamplingParams(greedy=True, max_new_tokens=96),
    )
    # A sentence ASR hears reliably ("What colour is the sky?" was once "What colors the sky?").
    follow_up = "How far is the train station from here?"

    def reply_is_playing(received) -> bool:  # type: ignore[no-untyped-def]
        return received.kind == "reply_audio" and received.event.turn_index == 0

    steps = [
        speech(piper_speech(STORY)),
        pause(silence(1.0)),
        wait_for(reply_is_playing),
        speech(piper_speech(follow_up)),
        pause(silence(1.5)),
    ]
    session = converse(gateway, config, steps, trace_id="test-barge-in")
    assert session.error is None, session.error
    cut = session.first("interrupted", turn=0)
    assert not session.of("turn_finished", turn=0)
    assert cut.event.interrupted.text_sent and cut.event.interrupted.audio_sent_ms > 0
    # Nothing of the cut turn arrives after the cut.
    assert all(r.event.turn_index != 0 for r in session.events[session.events.index(cut) + 1 :])
    started_again = next(
        r
        for r in session.of("speech", turn=1)
        if r.event.speech.type == asr_pb2.SPEECH_EVENT_TYPE_SPEECH_STARTED
    )
    print(f"barge-in: interrupted {1000 * (cut.at - started_again.at):+.0f} ms after speech start")
    finished = session.first("turn_finished", turn=1).event.turn_finished
    assert word_error_rate([follow_up], [finished.user_text]) <= 0.25
    # The cut reached chat: its generation for the story was cancelled.
    chat_calls = [
        json.loads(line)
        for line in system.log("chat").splitlines()
        if "test-barge-in" in line and '"call finished"' in line
    ]
    codes = [c["code"] for c in chat_calls]  # (a dropped speculative guess is one more CANCELLED)
    assert "CANCELLED" in codes and codes[-1] == "OK", chat_calls


def test_a_wrong_guess_at_a_pause_is_dropped_without_a_trace(system, gateway) -> None:
    # A pause mid-question, longer than the speculation point (64 ms) and the guess's
    # decode but shorter than the end of the utterance (1.5 s here): the reply started
    # on the first half must vanish, and only the whole question be answered and
    # remembered. (A guess still decoding when speech resumes is never sent at all.)
    config = talker_pb2.ConverseConfig(
        user_id="device-3",
        mode=talker_pb2.REPLY_MODE_TEXT,
        sampling=chat_pb2.SamplingParams(greedy=True, max_new_tokens=24),
        end_of_utterance_silence_ms=1500,
    )
    steps = [
        speech(piper_speech("Please tell me")),
        pause(silence(1.0)),
        speech(piper_speech("the capital of France.")),
        pause(silence(2.5)),
    ]
    session = converse(gateway, config, steps, trace_id="test-guess")
    assert session.error is None, session.error
    finals = session.finals()
    assert len(finals) == 1 and "france" in finals[0].event.transcript.text.lower()
    assert [r.event.turn_index for r in session.of("turn_finished")] == [0]
    assert not session.of("interrupted") and not session.of("error")
    gateway_log = system.log("gateway")
    assert (
        '"speculative reply dropped"' in gateway_log
        or '"speculative reply confirmed"' in gateway_log
    )
    chat_stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(system.addresses["chat"]))
    session_id = session.first("started").event.started.session_id
    turns = chat_stub.GetSession(chat_pb2.GetSessionRequest(session_id=session_id)).session.turns
    assert len(turns) == 2 and "france" in turns[0].text.lower(), turns


def test_a_guess_held_when_the_call_ends_is_taken_back(system, gateway) -> None:
    """The device hangs up during a pause: the reply started on a guess is
    dropped, and no later message will carry the take-back, so the gateway
    sends one of its own. The session's history stays empty."""
    session_id, trace_id = "guess-at-hangup", "test-hangup"
    config = talker_pb2.ConverseConfig(
        session_id=session_id,
        mode=talker_pb2.REPLY_MODE_TEXT,
        input_format=audio_pb2.AudioFormat(
            encoding=audio_pb2.AUDIO_ENCODING_PCM_S16LE, sample_rate_hz=16_000, channels=1
        ),
        sampling=chat_pb2.SamplingParams(greedy=True, max_new_tokens=48),
    )
    hung_up = threading.Event()

    def requests():  # type: ignore[no-untyped-def]
        yield talker_pb2.ConverseRequest(config=config)
        pcm = to_s16le(np.concatenate([piper_speech("Please tell me"), silence(0.3)]))
        clock = time.monotonic()
        for offset in range(0, len(pcm), 640):  # 20 ms chunks in real time
            clock += 0.02
            time.sleep(max(0.0, clock - time.monotonic()))
            yield talker_pb2.ConverseRequest(audio=pcm[offset : offset + 640])
        hung_up.wait(60)  # the microphone stops: no end of utterance is ever reached

    def logged(program: str, event: str) -> bool:
        return any(
            trace_id in line and f'"{event}"' in line for line in system.log(program).splitlines()
        )

    chat_stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(system.addresses["chat"]))

    def history() -> list[chat_pb2.Turn]:
        try:
            request = chat_pb2.GetSessionRequest(session_id=session_id)
            return list(chat_stub.GetSession(request).session.turns)
        except grpc.RpcError:  # the guess's call has not made the session yet
            return []

    call = gateway.Converse(requests(), metadata=[("x-trace-id", trace_id)])
    deadline = time.monotonic() + 30
    while not logged("gateway", "speculative reply started"):
        assert time.monotonic() < deadline, "no guess was started at the pause"
        time.sleep(0.05)
    # Hang up once the guess's exchange is in the chat history (a guess cancelled
    # before chat stored anything leaves nothing to take back).
    deadline = time.monotonic() + 60
    while len(history()) < 2:
        assert time.monotonic() < deadline, "the guess never reached the chat history"
        time.sleep(0.05)
    call.cancel()
    hung_up.set()
    deadline = time.monotonic() + 15
    while not logged("chat", "speculative exchange taken back"):
        assert time.monotonic() < deadline, "the guess was never taken back"
        time.sleep(0.1)
    assert history() == []


def test_ask_with_text_streams_audio_and_returns_the_trace_id(system, gateway) -> None:
    call = gateway.Ask(
        talker_pb2.AskRequest(
            text=QUESTION,
            mode=talker_pb2.REPLY_MODE_AUDIO,
            sampling=chat_pb2.SamplingParams(greedy=True),  # a fact, not a sample
        ),
        metadata=[("x-trace-id", "test-ask-text")],
        timeout=120,
    )
    events = [response.event for response in call]
    assert ("x-trace-id", "test-ask-text") in call.initial_metadata()
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "turn_finished" and "reply_audio" in kinds
    assert "video_frame" not in kinds
    finished = events[-1].turn_finished
    assert "paris" in finished.reply_text.lower() and finished.archive_path.endswith(".wav")
    # The synthesizer's phoneme timings come along, on the turn's audio timeline (for the lips).
    chunks = [e.reply_audio for e in events if e.WhichOneof("event") == "reply_audio"]
    phonemes = [p for c in chunks for p in c.phonemes]
    assert phonemes, "Piper's phoneme timings reach the client with the reply audio"
    starts = [p.start_ms for p in phonemes]
    assert starts == sorted(starts)
    total_ms = chunks[-1].offset_ms + chunks[-1].duration_ms
    assert total_ms - 200 <= phonemes[-1].start_ms + phonemes[-1].duration_ms <= total_ms + 40
    # Per-stage latency histograms on the gateway's /metrics.
    port = system.metrics_ports["gateway"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        metrics = answer.read().decode()
    for milestone in ("first_token", "first_sentence", "first_audio", "total"):
        assert f'talker_gateway_turn_milestone_seconds_count{{milestone="{milestone}"}}' in metrics
    assert 'talker_gateway_turns_total{outcome="finished"}' in metrics


BAD_ASKS = [
    ({"text": "hi", "user_id": "../../etc"}, grpc.StatusCode.INVALID_ARGUMENT, "user_id"),
    ({"text": "hi", "scene": "a/b"}, grpc.StatusCode.INVALID_ARGUMENT, "scene"),
    ({"text": "hi", "session_id": "x\nforged log line"}, grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
    ({"text": "hi", "voice_id": "..%2f"}, grpc.StatusCode.INVALID_ARGUMENT, "voice_id"),
    ({"text": "hi", "voice_id": "nobody-speaks-like-this"}, grpc.StatusCode.NOT_FOUND, "voice"),
    ({"text": "hi", "mode": talker_pb2.REPLY_MODE_AUDIO_VIDEO}, grpc.StatusCode.INVALID_ARGUMENT, "avatar_id is required"),
    ({"text": "hi", "mode": talker_pb2.REPLY_MODE_AUDIO_VIDEO, "avatar_id": "no-such-face"}, grpc.StatusCode.NOT_FOUND, "avatar"),
    ({}, grpc.StatusCode.INVALID_ARGUMENT, "question is missing"),
    ({"text": "   "}, grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ({"text": "x" * 5000}, grpc.StatusCode.RESOURCE_EXHAUSTED, "characters"),
    ({"text": "hi", "fps": 500}, grpc.StatusCode.INVALID_ARGUMENT, "fps"),
    ({"text": "hi", "output_sample_rate_hz": 7}, grpc.StatusCode.INVALID_ARGUMENT, "output_sample_rate_hz"),
    ({"audio": talker_pb2.AudioClip(format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_WAV), audio=b"not a wav")}, grpc.StatusCode.INVALID_ARGUMENT, "audio"),
    ({"audio": talker_pb2.AudioClip(format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_WAV), audio=to_wav(silence(2.0), 16000))}, grpc.StatusCode.INVALID_ARGUMENT, "No speech"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "code", "words"), BAD_ASKS)
def test_bad_asks_are_refused_with_a_reason(gateway, fields, code, words) -> None:  # type: ignore[no-untyped-def]
    request = talker_pb2.AskRequest(mode=fields.pop("mode", talker_pb2.REPLY_MODE_AUDIO), **fields)
    with pytest.raises(grpc.RpcError) as caught:
        list(gateway.Ask(request, timeout=60))
    assert caught.value.code() is code, caught.value.details()
    assert words.lower() in caught.value.details().lower(), caught.value.details()


def pcm_config(**fields) -> talker_pb2.ConverseRequest:  # type: ignore[no-untyped-def]
    return talker_pb2.ConverseRequest(config=talker_pb2.ConverseConfig(**fields))


S16_16K = audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_PCM_S16LE, sample_rate_hz=16000)
BAD_STREAMS = [
    ([talker_pb2.ConverseRequest(audio=b"\x00\x00")], "first message"),
    ([pcm_config(input_format=S16_16K), pcm_config()], "only once"),
    ([pcm_config(mode=talker_pb2.REPLY_MODE_TEXT), talker_pb2.ConverseRequest(audio=b"\x00\x00")], "no input_format"),
    ([pcm_config(input_format=S16_16K), talker_pb2.ConverseRequest(audio=b"\x00\x00\x00")], "whole number"),
    ([pcm_config(user_id="a b")], "user_id"),
    ([], "before its first message"),
]  # fmt: skip


@pytest.mark.parametrize(("messages", "words"), BAD_STREAMS)
def test_bad_streams_are_refused_with_a_reason(gateway, messages, words) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as caught:
        list(gateway.Converse(iter(messages), timeout=60))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert words.lower() in caught.value.details().lower(), caught.value.details()


@pytest.mark.parametrize("stage", ["synthesize", "chat"])
def test_a_stopped_stage_is_named_within_2_s_and_the_next_turn_succeeds(
    system, gateway, stage
) -> None:
    request = talker_pb2.AskRequest(text=QUESTION, mode=talker_pb2.REPLY_MODE_AUDIO)
    assert "stop" in system.ctl("stop", f"talker:{stage}").stdout
    try:
        # The deadline is the check: a hang would end DEADLINE_EXCEEDED instead.
        with pytest.raises(grpc.RpcError) as caught:
            list(gateway.Ask(request, timeout=2.0, metadata=[("x-trace-id", f"test-down-{stage}")]))
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE, caught.value.details()
        details = caught.value.details()
        assert f"The {stage} (" in details and f"test-down-{stage}" in details, details
        # The gateway itself stays up; its service reports the missing stage.
        gateway_address = system.addresses["gateway"]
        assert probe(gateway_address) == "SERVING"
        assert probe(gateway_address, service="talker.v1.TalkerService") == "NOT_SERVING"
    finally:
        system.ctl("start", f"talker:{stage}")
    system.wait_status(system.addresses[stage], timeout_s=180)
    system.wait_status(system.addresses["gateway"], timeout_s=30)
    events = [r.event for r in gateway.Ask(request, timeout=120)]
    assert events[-1].WhichOneof("event") == "turn_finished"
    assert probe(system.addresses["gateway"], service="talker.v1.TalkerService") == "SERVING"


def test_question_as_raw_pcm_clip(gateway) -> None:
    pcm = (np.clip(piper_speech(QUESTION), -1, 1) * 32767).astype("<i2").tobytes()
    request = talker_pb2.AskRequest(
        audio=talker_pb2.AudioClip(format=S16_16K, audio=pcm), mode=talker_pb2.REPLY_MODE_TEXT
    )
    events = [response.event for response in gateway.Ask(request, timeout=120)]
    transcript = [e.transcript for e in events if e.WhichOneof("event") == "transcript"]
    assert len(transcript) == 1 and word_error_rate([QUESTION], [transcript[0].text]) <= 0.2
    assert events[-1].turn_finished.timings.asr_final_ms > 0
