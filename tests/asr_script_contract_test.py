"""Chinese transcripts in one script, as configured, through the real
AsrService: Recognize and StreamingRecognize alike."""

from __future__ import annotations

import re

import grpc
import opencc
import pytest

from services.asr.script import ChineseScript
from talker.v1 import asr_pb2, asr_pb2_grpc, audio_pb2
from tests.asr_contract_test import recognize, stream_requests
from tests.speech import CHINESE_QUESTIONS, chinese_question_wav, mandarin_speech, to_s16le

WAV = audio_pb2.AUDIO_ENCODING_WAV
S16 = audio_pb2.AUDIO_ENCODING_PCM_S16LE
TO_SIMPLIFIED = opencc.OpenCC("t2s").convert
TO_TRADITIONAL = opencc.OpenCC("s2t").convert
# 国, 个 and 几 are written differently in the two scripts.
QUESTIONS = [CHINESE_QUESTIONS[0], CHINESE_QUESTIONS[1]]


def han(text: str) -> str:
    return "".join(re.findall(r"[\u4e00-\u9fff]", text))


@pytest.fixture(scope="module")
def traditional_stub(start_in_process):  # type: ignore[no-untyped-def]
    from services.asr.config import AsrSettings
    from services.asr.server import build_program

    server = start_in_process(
        build_program, AsrSettings(port=0, metrics_port=0, chinese_script="traditional")
    )
    with grpc.insecure_channel(server.address) as channel:
        yield asr_pb2_grpc.AsrServiceStub(channel)


def test_mixed_script_text_is_written_in_one() -> None:
    heard = "这个週末我們去公園"  # as Whisper writes it: both scripts in one sentence
    assert ChineseScript("simplified")(heard, "zh") == "这个周末我们去公园"
    assert ChineseScript("traditional")(heard, "zh") == "這個週末我們去公園"
    assert ChineseScript("as_heard")(heard, "zh") == heard
    assert ChineseScript("simplified")("Zhou's 週", "en") == "Zhou's 週"  # only Chinese


@pytest.mark.parametrize("question", QUESTIONS)
def test_recognize_writes_chinese_in_the_configured_script(
    asr_stub, traditional_stub, question: str
) -> None:
    wav = chinese_question_wav(question)
    simplified = recognize(asr_stub, wav, WAV, language="zh")
    traditional = recognize(traditional_stub, wav, WAV, language="zh")
    heard_simplified, heard_traditional = han(simplified.text), han(traditional.text)
    assert len(heard_simplified) >= 4, simplified.text
    # Each entirely in its script, and the same words.
    assert heard_simplified == TO_SIMPLIFIED(heard_simplified), simplified.text
    assert heard_traditional == TO_TRADITIONAL(heard_traditional), traditional.text
    assert heard_simplified != heard_traditional
    assert TO_SIMPLIFIED(heard_traditional) == heard_simplified
    assert all(han(s.text) == TO_SIMPLIFIED(han(s.text)) for s in simplified.segments)


def test_streamed_chinese_finals_are_in_the_configured_script(traditional_stub) -> None:
    audio = to_s16le(mandarin_speech(QUESTIONS[0], 16_000, "Aiyue"))
    config = asr_pb2.StreamingRecognitionConfig(
        format=audio_pb2.AudioFormat(encoding=S16, sample_rate_hz=16_000),
        config=asr_pb2.RecognitionConfig(language="zh"),
        interim_results=True,
    )
    responses = list(
        traditional_stub.StreamingRecognize(
            stream_requests(audio + bytes(64_000), config, 640, pace_s=0.02), timeout=120
        )
    )
    results = [r.result for r in responses if r.HasField("result") and han(r.result.text)]
    assert any(r.is_final for r in results), responses
    for result in results:
        assert han(result.text) == TO_TRADITIONAL(han(result.text)), result.text
