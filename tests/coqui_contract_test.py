"""The Coqui XTTS cloning path, for real: a tiny XTTS model is built from a
Coqui config with random weights and saved to a folder as XTTS-v2 is laid out
(config.json, model.pth, vocab.json); the real SynthesizeService loads it from
that folder, clones a voice from a recording and streams speech from it.

Random weights make noise, not speech: these tests prove loading, conditioning,
persistence and streaming, not voice quality (no XTTS weights can be had here)."""

from __future__ import annotations

import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from services.synthesize.config import SynthesizeSettings
from services.synthesize.coqui import split_sentences
from services.synthesize.engine import PiperEngine
from services.synthesize.server import build_program
from talker.v1 import audio_pb2, synthesize_pb2, synthesize_pb2_grpc
from tests.processes import InProcessServer
from tests.speech import SENTENCES, espeak_speech, to_s16le

REFERENCE_RATE_HZ = 16_000
# Audio tokens the tiny GPT makes per sentence (one is 1024 samples at 22.05 kHz)
# and per streamed chunk: 12 tokens in chunks of 4 give three XTTS chunks.
MAX_AUDIO_TOKENS = 12
CHUNK_TOKENS = 4


def build_tiny_xtts(folder: Path) -> Path:
    """An XTTS model as small as its code allows: 2 GPT layers of width 64, a
    character vocabulary for English. The HiFi-GAN decoder and its speaker
    encoder have fixed sizes, so model.pth is still ~90 MB."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from TTS.tts.configs.xtts_config import XttsConfig
    from TTS.tts.layers.xtts.tokenizer import VoiceBpeTokenizer
    from TTS.tts.models.xtts import Xtts, XttsArgs

    folder.mkdir(parents=True, exist_ok=True)
    # The tokens XTTS's tokenizer and GPT look up by name.
    special = ["[STOP]", "[UNK]", "[SPACE]", "[START]", "[en]"]
    letters = list(string.ascii_lowercase + string.digits + ".,!?'-:;\"")
    vocab = {token: i for i, token in enumerate(special + letters)}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tokenizer.add_special_tokens(special)
    tokenizer.save(str(folder / "vocab.json"))
    args = XttsArgs(
        gpt_layers=2,
        gpt_n_model_channels=64,
        gpt_n_heads=4,
        gpt_max_audio_tokens=MAX_AUDIO_TOKENS,
        gpt_num_audio_tokens=1026,
        gpt_start_audio_token=1024,
        gpt_stop_audio_token=1025,
        gpt_use_perceiver_resampler=True,  # as XTTS-v2
        decoder_input_dim=64,
        d_vector_dim=512,  # fixed by the decoder's speaker encoder
    )
    config = XttsConfig(model_args=args, languages=["en"])
    torch.manual_seed(0)
    model = Xtts(config)
    model.tokenizer = VoiceBpeTokenizer(str(folder / "vocab.json"))
    model.init_models()
    with torch.no_grad():
        # Random weights could pick the stop token early; forbid it, so every
        # sentence runs to MAX_AUDIO_TOKENS and the chunk count is known.
        model.gpt.mel_head.bias[args.gpt_stop_audio_token] = -1e4
    torch.save({"model": model.state_dict()}, folder / "model.pth")
    config.save_json(str(folder / "config.json"))
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_xtts(tmp_path_factory.mktemp("xtts-tiny"))


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("voices")


def settings(voices_dir: Path, model_dir: Path | None) -> SynthesizeSettings:
    return SynthesizeSettings(
        port=0,
        metrics_port=0,
        voices_dir=voices_dir,
        coqui_model_dir=model_dir,
        coqui_stream_chunk_tokens=CHUNK_TOKENS,
    )


@pytest.fixture(scope="module")
def server(start_in_process, voices_dir: Path, model_dir: Path) -> InProcessServer:
    return start_in_process(build_program, settings(voices_dir, model_dir))


@pytest.fixture(scope="module")
def tts(server: InProcessServer) -> Iterator[synthesize_pb2_grpc.SynthesizeServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield synthesize_pb2_grpc.SynthesizeServiceStub(channel)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    audio = espeak_speech(" ".join(SENTENCES * 2), REFERENCE_RATE_HZ)
    assert len(audio) / REFERENCE_RATE_HZ > 30
    return audio


def create(stub, audio: np.ndarray, kind: int) -> synthesize_pb2.Voice:
    def requests() -> Iterator[synthesize_pb2.CreateVoiceRequest]:
        yield synthesize_pb2.CreateVoiceRequest(
            config=synthesize_pb2.CreateVoiceConfig(
                display_name="Cloned speaker",
                language="en",
                kind=kind,
                consent=True,
                format=audio_pb2.AudioFormat(
                    encoding=audio_pb2.AUDIO_ENCODING_PCM_S16LE,
                    sample_rate_hz=REFERENCE_RATE_HZ,
                    channels=1,
                ),
            )
        )
        data = to_s16le(audio)
        for start in range(0, len(data), 64_000):
            yield synthesize_pb2.CreateVoiceRequest(audio=data[start : start + 64_000])

    return stub.CreateVoice(requests(), timeout=120).voice


def speak(stub, voice_id: str, text: str, rate_hz: int) -> list[synthesize_pb2.SynthesizeResponse]:
    request = synthesize_pb2.SynthesizeRequest(
        text=text, voice_id=voice_id, output_format=audio_pb2.AudioFormat(sample_rate_hz=rate_hz)
    )
    return list(stub.Synthesize(request, timeout=120))


@pytest.fixture(scope="module")
def cloned(tts, reference: np.ndarray) -> synthesize_pb2.Voice:
    return create(tts, reference, synthesize_pb2.VOICE_KIND_CLONED)


def test_long_text_is_cut_under_the_model_limit() -> None:
    text = "Short one. " + "word, " * 30 + "end."
    pieces = split_sentences(text, 100)
    assert pieces[0] == "Short one." and all(len(p) <= 100 for p in pieces)
    assert " ".join(pieces).replace(" ", "") == text.replace(" ", "")


def test_cloning_a_voice_stores_its_conditioning(tts, cloned, voices_dir: Path) -> None:
    assert cloned.kind == synthesize_pb2.VOICE_KIND_CLONED
    assert cloned.voice_id.startswith("voice-") and cloned.language == "en"
    assert cloned.sample_rate_hz == 24_000 and not cloned.matched_voice_id
    assert cloned.quality.duration_ms > 30_000
    assert (voices_dir / "profiles" / f"{cloned.voice_id}.xtts.pt").is_file()
    kinds = {v.voice_id: v.kind for v in tts.ListVoices(synthesize_pb2.ListVoicesRequest()).voices}
    assert kinds[cloned.voice_id] == synthesize_pb2.VOICE_KIND_CLONED
    only_cloned = tts.ListVoices(
        synthesize_pb2.ListVoicesRequest(kind=synthesize_pb2.VOICE_KIND_CLONED)
    ).voices
    assert [v.voice_id for v in only_cloned] == [cloned.voice_id]
    got = tts.GetVoice(synthesize_pb2.GetVoiceRequest(voice_id=cloned.voice_id)).voice
    assert got.kind == synthesize_pb2.VOICE_KIND_CLONED


@pytest.fixture(scope="module")
def xtts_sentence(server: InProcessServer, cloned) -> list[tuple[np.ndarray, bool]]:
    """The engine ring: XTTS's own stream of one sentence, before the service re-chunks it."""
    engine = server.program.engine
    assert isinstance(engine, PiperEngine)
    profile = engine.profiles.get(cloned.voice_id)
    assert profile is not None
    return list(engine.synthesize_cloned(profile, "Hello there."))


def test_xtts_streams_several_chunks_per_sentence(xtts_sentence) -> None:
    audio = [a for a, ends in xtts_sentence if not ends]
    assert len(audio) == MAX_AUDIO_TOKENS // CHUNK_TOKENS
    assert [ends for _, ends in xtts_sentence] == [False] * len(audio) + [True]
    assert all(a.dtype == np.float32 and len(a) > 0 and np.isfinite(a).all() for a in audio)


@pytest.mark.parametrize("rate_hz", [16_000, 24_000])
def test_cloned_voice_streams_at_the_requested_rate(
    tts, cloned, xtts_sentence, rate_hz: int
) -> None:
    responses = speak(tts, cloned.voice_id, "Hello there. How are you?", rate_hz)
    chunks = [r.chunk for r in responses if r.HasField("chunk")]
    finished = responses[-1].finished
    assert len(chunks) > 1 and all(c.format.sample_rate_hz == rate_hz for c in chunks)
    assert next(c.sentence_index for c in chunks) == 0 and chunks[-1].sentence_index == 1
    assert finished.sentence_count == 2
    samples = sum(len(c.audio) // 2 for c in chunks)
    assert finished.sample_count == samples
    # The stop token is forbidden, so every sentence is as long as the engine's:
    # two of them, from XTTS's 24 kHz to the requested rate.
    expected = 2 * sum(len(a) for a, _ in xtts_sentence) * rate_hz / 24_000
    assert abs(samples - expected) <= 0.01 * expected
    audio = np.frombuffer(b"".join(c.audio for c in chunks), "<i2")
    assert np.abs(audio).max() > 0


def test_cloned_voice_survives_a_restart(cloned, voices_dir: Path, model_dir: Path) -> None:
    again = InProcessServer(build_program(settings(voices_dir, model_dir)))
    again.start()
    try:
        with grpc.insecure_channel(again.address) as channel:
            stub = synthesize_pb2_grpc.SynthesizeServiceStub(channel)
            listed = {
                v.voice_id: v for v in stub.ListVoices(synthesize_pb2.ListVoicesRequest()).voices
            }
            assert listed[cloned.voice_id].kind == synthesize_pb2.VOICE_KIND_CLONED
            assert listed[cloned.voice_id].display_name == "Cloned speaker"
            responses = speak(stub, cloned.voice_id, "Welcome back.", 22_050)
            assert responses[-1].finished.sample_count > 0
    finally:
        again.stop()


def test_without_a_coqui_model_cloning_is_refused(
    cloned, reference: np.ndarray, voices_dir: Path
) -> None:
    plain = InProcessServer(build_program(settings(voices_dir, None)))
    plain.start()
    try:
        with grpc.insecure_channel(plain.address) as channel:
            stub = synthesize_pb2_grpc.SynthesizeServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                create(stub, reference, synthesize_pb2.VOICE_KIND_CLONED)
            assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "needs a Coqui XTTS model" in raised.value.details()
            with pytest.raises(grpc.RpcError) as raised:
                speak(stub, cloned.voice_id, "Hello.", 24_000)
            assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "TALKER_SYNTHESIZE_COQUI_MODEL_DIR" in raised.value.details()
            # The service keeps serving its other voices.
            assert speak(stub, "", "Still here.", 24_000)[-1].finished.sample_count > 0
    finally:
        plain.stop()


def test_cloned_voice_refuses_text_in_another_script(tts, cloned) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        speak(tts, cloned.voice_id, "你好，今天天气很好。", 24_000)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot speak" in raised.value.details()


def test_deleting_a_cloned_voice_removes_its_conditioning(tts, reference, voices_dir) -> None:
    # Unset kind: this server has a cloning model, so it makes a clone.
    voice = create(tts, reference, synthesize_pb2.VOICE_KIND_UNSPECIFIED)
    assert voice.kind == synthesize_pb2.VOICE_KIND_CLONED
    stored = voices_dir / "profiles" / f"{voice.voice_id}.xtts.pt"
    assert stored.is_file()
    tts.DeleteVoice(synthesize_pb2.DeleteVoiceRequest(voice_id=voice.voice_id))
    assert not stored.exists()
    with pytest.raises(grpc.RpcError) as raised:
        speak(tts, voice.voice_id, "Hello.", 24_000)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_without_a_coqui_model_coqui_tts_is_never_imported(tmp_path: Path) -> None:
    """Importing TTS takes seconds: a server without a cloning model must not pay it."""
    script = (
        "import sys\n"
        "from services.synthesize.config import SynthesizeSettings\n"
        "from services.synthesize.engine import PiperEngine\n"
        f"PiperEngine(SynthesizeSettings(voices_dir={str(tmp_path)!r})).load()\n"
        "assert 'TTS' not in sys.modules, 'TTS was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
