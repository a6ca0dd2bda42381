"""Chinese end to end, every program a real process under supervisord: a
question spoken by the Mandarin voice is heard in Chinese, answered in
Chinese, spoken by the Mandarin voice (which Whisper hears back as the reply)
and rendered into an archived mp4 whose record says so."""

from __future__ import annotations

import json
import time
from pathlib import Path

import av
import grpc
import numpy as np
import pytest

from talker.v1 import asr_pb2, asr_pb2_grpc, audio_pb2, chat_pb2, talker_pb2, talker_pb2_grpc
from tests.portrait import create_astronaut
from tests.speech import character_error_rate, chinese_question_wav, simplified_characters

QUESTION = "中国的首都是哪里？"


@pytest.fixture(scope="module")
def gateway(system) -> talker_pb2_grpc.TalkerServiceStub:  # type: ignore[no-untyped-def]
    return talker_pb2_grpc.TalkerServiceStub(grpc.insecure_channel(system.addresses["gateway"]))


def cjk_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum("\u4e00" <= c <= "\u9fff" for c in letters) / max(1, len(letters))


def test_a_spoken_chinese_question_gets_a_spoken_chinese_answer_and_video(system, gateway) -> None:  # type: ignore[no-untyped-def]
    avatar_id = create_astronaut(system.addresses["animate"])
    wav = chinese_question_wav(QUESTION)
    call = gateway.Ask(
        talker_pb2.AskRequest(
            audio=talker_pb2.AudioClip(
                format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_WAV), audio=wav
            ),
            mode=talker_pb2.REPLY_MODE_AUDIO_VIDEO,
            avatar_id=avatar_id,
            user_id="zh-user",
            scene="zh-test",
            output_sample_rate_hz=16000,
            sampling=chat_pb2.SamplingParams(greedy=True, max_new_tokens=60),
        ),
        metadata=[("x-trace-id", "test-chinese-turn")],
        timeout=600,
    )
    events = [response.event for response in call]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "turn_finished", kinds

    # Heard in Chinese.
    transcript = next(e.transcript for e in events if e.WhichOneof("event") == "transcript")
    heard = simplified_characters(transcript.text)
    print("heard:", transcript.text, transcript.language)
    assert transcript.language == "zh" and "首都" in heard, transcript

    # Answered in Chinese.
    finished = events[-1].turn_finished
    reply = finished.reply_text
    print("reply:", reply)
    assert cjk_share(reply) > 0.8 and "北京" in simplified_characters(reply), reply

    # Spoken in Chinese: Whisper hears the reply audio back as the reply.
    audio = b"".join(e.reply_audio.audio for e in events if e.WhichOneof("event") == "reply_audio")
    assert len(audio) > 16000  # over half a second of speech
    asr = asr_pb2_grpc.AsrServiceStub(grpc.insecure_channel(system.addresses["asr"]))
    back = asr.Recognize(
        asr_pb2.RecognizeRequest(
            format=audio_pb2.AudioFormat(
                encoding=audio_pb2.AUDIO_ENCODING_PCM_S16LE, sample_rate_hz=16000, channels=1
            ),
            audio=audio,
            config=asr_pb2.RecognitionConfig(language="zh"),
        ),
        timeout=120,
    )
    cer = character_error_rate([reply], [back.text])
    print(f"reply spoken and heard back: {back.text!r}, character error rate {cer:.2f}")
    assert cer <= 0.35, (reply, back.text)
    # The lips follow the Mandarin voice's own syllable timings (pinyin), on the reply's timeline.
    syllables = [
        p for e in events if e.WhichOneof("event") == "reply_audio" for p in e.reply_audio.phonemes
    ]
    assert syllables and {p.notation for p in syllables} == {"pinyin"}, syllables[:3]
    assert len(syllables) >= len([c for c in reply if "\u4e00" <= c <= "\u9fff"]) - 2
    audio_ms = len(audio) // 2 * 1000 // 16000
    assert syllables[-1].start_ms + syllables[-1].duration_ms <= audio_ms
    frames = [e for e in events if e.WhichOneof("event") == "video_frame"]
    assert frames and np.diff([f.video_frame.timestamp_ms for f in frames]).min() > 0

    # Archived as an mp4 (H.264 + AAC) with a Chinese record naming the Mandarin voice.
    video = Path(finished.archive_path)
    assert video.suffix == ".mp4", video
    deadline = time.monotonic() + 300  # archive videos render in the background, at low priority
    while not (video.is_file() and video.with_suffix(".json").is_file()):
        assert time.monotonic() < deadline, f"{video} was not archived"
        time.sleep(0.5)
    with av.open(str(video)) as container:
        codecs = {s.type: s.codec_context.name for s in container.streams}
    assert codecs == {"video": "h264", "audio": "aac"}, codecs
    record = json.loads(video.with_suffix(".json").read_text())
    assert record["trace_id"] == "test-chinese-turn" and record["language"] == "zh"
    assert record["reply_text"] == reply and "首都" in simplified_characters(record["user_text"])
    assert any("zh" in voice for voice in record["voices_used"]), record["voices_used"]
