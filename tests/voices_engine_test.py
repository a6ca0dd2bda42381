"""Voices made from reference recordings: the quality gate, persistence, and
voice matching that measurably moves the built-in voice toward the reference."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile

from services.synthesize.config import SynthesizeSettings
from services.synthesize.server import build_program
from services.synthesize.voice_matching import VoiceMatcher, cosine
from services.synthesize.voice_profiles import assess_reference
from talker.v1 import audio_pb2, synthesize_pb2, synthesize_pb2_grpc
from tests.processes import InProcessServer
from tests.speech import SENTENCES, to_wav

REFERENCE_TEXT = " ".join(SENTENCES * 2)  # about 37 s of speech


def espeak_reference(voice: str, text: str = REFERENCE_TEXT) -> tuple[np.ndarray, int]:
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", "150", "--stdout", text], check=True, capture_output=True
    ).stdout
    audio, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    return audio, rate


@pytest.fixture(scope="module")
def reference() -> tuple[np.ndarray, int]:
    return espeak_reference("en-us+f3")


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("voices")


@pytest.fixture(scope="module")
def tts(voices_dir: Path) -> Iterator[synthesize_pb2_grpc.SynthesizeServiceStub]:
    server = InProcessServer(
        build_program(SynthesizeSettings(port=0, metrics_port=0, voices_dir=voices_dir))
    )
    server.start()
    with grpc.insecure_channel(server.address) as channel:
        yield synthesize_pb2_grpc.SynthesizeServiceStub(channel)
    server.stop()


def create(
    stub,
    audio_bytes: bytes,
    encoding=audio_pb2.AUDIO_ENCODING_WAV,
    rate=0,
    validate_only=False,
    language="",
):  # type: ignore[no-untyped-def]
    def requests():  # type: ignore[no-untyped-def]
        yield synthesize_pb2.CreateVoiceRequest(
            config=synthesize_pb2.CreateVoiceConfig(
                display_name="Test speaker",
                language=language,
                format=audio_pb2.AudioFormat(encoding=encoding, sample_rate_hz=rate),
                consent=True,
                validate_only=validate_only,
            )
        )
        for start in range(0, len(audio_bytes), 64_000):
            yield synthesize_pb2.CreateVoiceRequest(audio=audio_bytes[start : start + 64_000])

    return stub.CreateVoice(requests(), timeout=120).voice


def speak(stub, text: str, voice_id: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    request = synthesize_pb2.SynthesizeRequest(
        text=text, voice_id=voice_id, output_format=audio_pb2.AudioFormat(sample_rate_hz=16_000)
    )
    data = b"".join(
        r.chunk.audio for r in stub.Synthesize(request, timeout=60) if r.HasField("chunk")
    )
    return np.frombuffer(data, "<i2").astype(np.float32) / 32768


def test_quality_report_of_a_clean_sample(reference) -> None:
    audio, rate = reference
    report = assess_reference(audio, rate)
    assert report.acceptable, report.problems
    assert report.duration_s > 30 and report.snr_db > 25 and report.clipping_ratio == 0
    assert 0.6 < report.speech_ratio <= 1.0


def test_clean_sample_makes_a_voice_that_moves_toward_the_reference(tts, reference) -> None:
    audio, rate = reference
    voice = create(tts, to_wav(audio, rate))
    assert voice.voice_id.startswith("voice-") and voice.kind == synthesize_pb2.VOICE_KIND_MATCHED
    assert voice.quality.duration_ms > 30_000 and voice.quality.snr_db > 25
    assert voice.matched_voice_id == "en_US-joe-medium"
    # Held-out text, not the calibration sentence: similarity to the reference
    # speaker by a speaker encoder must rise over the unconverted base voice.
    matcher = VoiceMatcher()
    target = matcher.embed(audio, rate)
    text = "I would like to order a pizza with mushrooms and olives, please."
    base = cosine(matcher.embed(speak(tts, text, "en_US-joe-medium"), 16_000), target)
    matched = cosine(matcher.embed(speak(tts, text, voice.voice_id), 16_000), target)
    print(f"similarity to reference: base {base:.3f}, matched {matched:.3f}")
    assert matched > base


def test_voices_survive_a_restart_and_can_be_deleted(tts, reference, voices_dir: Path) -> None:
    audio, rate = reference
    voice = create(tts, to_wav(audio, rate))
    again = InProcessServer(
        build_program(SynthesizeSettings(port=0, metrics_port=0, voices_dir=voices_dir))
    )
    again.start()
    try:
        with grpc.insecure_channel(again.address) as channel:
            stub = synthesize_pb2_grpc.SynthesizeServiceStub(channel)
            listed = {
                v.voice_id: v for v in stub.ListVoices(synthesize_pb2.ListVoicesRequest()).voices
            }
            assert listed[voice.voice_id].display_name == "Test speaker"
            assert len(speak(stub, "Hello again.", voice.voice_id)) > 8_000
            stub.DeleteVoice(synthesize_pb2.DeleteVoiceRequest(voice_id=voice.voice_id))
            with pytest.raises(grpc.RpcError) as raised:
                stub.GetVoice(synthesize_pb2.GetVoiceRequest(voice_id=voice.voice_id))
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        again.stop()
    assert not list(voices_dir.glob("profiles/*.partial"))


def test_validate_only_reports_without_storing(tts, reference) -> None:
    audio, rate = reference
    before = len(tts.ListVoices(synthesize_pb2.ListVoicesRequest()).voices)
    voice = create(tts, to_wav(audio[: rate * 20], rate), validate_only=True)
    assert voice.voice_id == "" and voice.quality.duration_ms == pytest.approx(20_000, abs=50)
    assert any(
        "30 s or more" in w for w in voice.quality.warnings
    )  # borderline: accepted with a warning
    assert len(tts.ListVoices(synthesize_pb2.ListVoicesRequest()).voices) == before


def bad_references(reference: tuple[np.ndarray, int]) -> dict[str, tuple[bytes, str]]:
    audio, rate = reference
    rng = np.random.default_rng(3)
    return {
        "silence": (to_wav(np.zeros(rate * 35, np.float32), rate), "mostly silence or noise"),
        "noise": (
            to_wav((rng.standard_normal(rate * 35) * 0.2).astype(np.float32), rate),
            "mostly silence or noise",
        ),
        "clipped": (to_wav(np.clip(audio * 30, -1, 1), rate), "clipped"),
        "2 s long": (to_wav(audio[: rate * 2], rate), "2.0 s long"),
        "noisy": (
            to_wav(audio + (rng.standard_normal(len(audio)) * 0.08).astype(np.float32), rate),
            "above the background noise",
        ),
        "not audio": (b"RIFF....WAVEfmt this is not really a wav file" * 100, "could not be read"),
    }


@pytest.mark.parametrize("case", ["silence", "noise", "clipped", "2 s long", "noisy", "not audio"])
def test_poor_reference_is_refused_with_its_reason_and_advice(tts, reference, case: str) -> None:
    data, expected = bad_references(reference)[case]
    with pytest.raises(grpc.RpcError) as raised:
        create(tts, data)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in raised.value.details(), raised.value.details()
    if case != "not audio":
        assert "quiet room" in raised.value.details()
    assert len(speak(tts, "Still serving.", "en_US-joe-medium")) > 0
