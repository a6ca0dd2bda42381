"""Audio in: raw PCM and container files decoded in memory (no temp files),
checked, mixed to mono float32 and resampled with soxr."""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass

import numpy as np
import soundfile
import soxr

from services.common.errors import InvalidInput
from talker.v1 import audio_pb2

MIN_SAMPLE_RATE_HZ = 4_000
MAX_SAMPLE_RATE_HZ = 192_000
MAX_CHANNELS = 8
# Float audio belongs in [-1, 1]; a little overshoot is normal after gain,
# a peak past this means integer samples were declared as float.
MAX_FLOAT_PEAK = 4.0

RAW_ENCODINGS = {
    audio_pb2.AUDIO_ENCODING_PCM_S16LE: ("<i2", 2),
    audio_pb2.AUDIO_ENCODING_PCM_F32LE: ("<f4", 4),
}
CONTAINER_ENCODINGS = {
    audio_pb2.AUDIO_ENCODING_WAV: "WAV",
    audio_pb2.AUDIO_ENCODING_FLAC: "FLAC",
    audio_pb2.AUDIO_ENCODING_OGG: "OGG",
}


def encoding_name(encoding: int) -> str:
    try:
        return audio_pb2.AudioEncoding.Name(encoding)
    except ValueError:
        return f"encoding {encoding}"


@dataclass(frozen=True)
class PcmLayout:
    """How raw PCM bytes are laid out."""

    encoding: int
    sample_rate_hz: int
    channels: int

    @property
    def dtype(self) -> str:
        return RAW_ENCODINGS[self.encoding][0]

    @property
    def bytes_per_frame(self) -> int:
        return RAW_ENCODINGS[self.encoding][1] * self.channels


def check_sample_rate(sample_rate_hz: int) -> None:
    if not MIN_SAMPLE_RATE_HZ <= sample_rate_hz <= MAX_SAMPLE_RATE_HZ:
        raise InvalidInput(
            f"sample_rate_hz is {sample_rate_hz}; it must be between "
            f"{MIN_SAMPLE_RATE_HZ} and {MAX_SAMPLE_RATE_HZ} Hz (for example 16000 or 48000)."
        )


def check_channels(channels: int) -> None:
    if not 1 <= channels <= MAX_CHANNELS:
        raise InvalidInput(f"channels is {channels}; it must be between 1 and {MAX_CHANNELS}.")


def raw_layout(encoding: int, sample_rate_hz: int, channels: int) -> PcmLayout:
    """Checks a raw PCM format and returns its layout. `channels` 0 means mono."""
    if encoding not in RAW_ENCODINGS:
        if encoding in CONTAINER_ENCODINGS:
            raise InvalidInput(
                f"{encoding_name(encoding)} is a file format; this call takes raw PCM "
                "(AUDIO_ENCODING_PCM_S16LE or AUDIO_ENCODING_PCM_F32LE)."
            )
        raise InvalidInput(
            f"The audio encoding is {encoding_name(encoding)}; use AUDIO_ENCODING_PCM_S16LE, "
            "AUDIO_ENCODING_PCM_F32LE, AUDIO_ENCODING_WAV, AUDIO_ENCODING_FLAC or AUDIO_ENCODING_OGG."
        )
    check_sample_rate(sample_rate_hz)
    channels = channels or 1
    check_channels(channels)
    return PcmLayout(encoding, sample_rate_hz, channels)


def decode_pcm(data: bytes, layout: PcmLayout, what: str = "the audio") -> np.ndarray:
    """Raw PCM bytes -> float32 mono samples in [-1, 1] at the layout's rate."""
    if len(data) % layout.bytes_per_frame:
        raise InvalidInput(
            f"{what} has {len(data)} bytes, which is not a whole number of "
            f"{layout.bytes_per_frame}-byte frames for {encoding_name(layout.encoding)} "
            f"with {layout.channels} channel(s)."
        )
    samples = np.frombuffer(data, dtype=layout.dtype)
    if layout.encoding == audio_pb2.AUDIO_ENCODING_PCM_S16LE:
        audio = samples.astype(np.float32) / 32768.0
    else:
        audio = samples.astype(np.float32)
        check_float_audio(audio, what)
    if layout.channels > 1:
        audio = audio.reshape(-1, layout.channels).mean(axis=1)
    return audio


def check_float_audio(audio: np.ndarray, what: str = "the audio") -> None:
    if audio.size and not np.isfinite(audio).all():
        raise InvalidInput(f"{what} contains NaN or infinite samples.")
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if peak > MAX_FLOAT_PEAK:
        raise InvalidInput(
            f"{what} has float samples up to {peak:.3g}, but float PCM must lie in [-1, 1]; "
            "was integer audio declared as AUDIO_ENCODING_PCM_F32LE?"
        )


def decode_clip(
    data: bytes, encoding: int, sample_rate_hz: int = 0, channels: int = 0
) -> tuple[np.ndarray, int]:
    """A whole clip (raw PCM or a WAV/FLAC/OGG file) -> (float32 mono, sample rate)."""
    if not data:
        raise InvalidInput("The audio is empty: send at least a fraction of a second of sound.")
    if encoding in CONTAINER_ENCODINGS:
        audio, rate = _decode_container(data, encoding)
        if sample_rate_hz and sample_rate_hz != rate:
            raise InvalidInput(
                f"sample_rate_hz says {sample_rate_hz} Hz but the {CONTAINER_ENCODINGS[encoding]} "
                f"file is {rate} Hz; leave sample_rate_hz at 0 for files."
            )
    else:
        layout = raw_layout(encoding, sample_rate_hz, channels)
        audio, rate = decode_pcm(data, layout), layout.sample_rate_hz
    if audio.size == 0:
        raise InvalidInput("The audio holds no samples.")
    return audio, rate


def _decode_container(data: bytes, encoding: int) -> tuple[np.ndarray, int]:
    expected = CONTAINER_ENCODINGS[encoding]
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as sound:
            if sound.format != expected:
                raise InvalidInput(
                    f"The audio was declared {expected} but is a {sound.format} file."
                )
            rate = int(sound.samplerate)
            check_sample_rate(rate)
            check_channels(int(sound.channels))
            audio = sound.read(dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        # libsndfile's own sentence, without soundfile's "Error opening <_io.BytesIO
        # object at 0x...>:" prefix: callers never see Python internals.
        reason = getattr(error, "error_string", "") or "not a readable file"
        raise InvalidInput(
            f"The audio could not be read as a {expected} file ({reason.rstrip('.')}). "
            "Check the bytes and the declared encoding."
        ) from None
    check_float_audio(audio, "the audio")
    return audio.mean(axis=1).astype(np.float32), rate


def resample(audio: np.ndarray, from_hz: int, to_hz: int) -> np.ndarray:
    if from_hz == to_hz:
        return audio.astype(np.float32, copy=False)
    return soxr.resample(audio, from_hz, to_hz, quality="HQ").astype(np.float32, copy=False)


class StreamResampler:
    """Resamples a stream chunk by chunk with no clicks at chunk borders."""

    def __init__(self, from_hz: int, to_hz: int) -> None:
        self._stream = (
            soxr.ResampleStream(from_hz, to_hz, 1, dtype="float32", quality="HQ")
            if from_hz != to_hz
            else None
        )

    def process(self, audio: np.ndarray, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return audio
        return self._stream.resample_chunk(audio, last=last)


# ---- audio out ----------------------------------------------------------------

OUTPUT_ENCODINGS = (
    audio_pb2.AUDIO_ENCODING_PCM_S16LE,
    audio_pb2.AUDIO_ENCODING_PCM_F32LE,
    audio_pb2.AUDIO_ENCODING_WAV,
)


def encode_samples(audio: np.ndarray, encoding: int) -> bytes:
    """Float mono samples -> raw PCM bytes (a WAV stream's data is s16le)."""
    if encoding == audio_pb2.AUDIO_ENCODING_PCM_F32LE:
        return np.clip(audio, -1.0, 1.0).astype("<f4").tobytes()
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def streaming_wav_header(sample_rate_hz: int, channels: int = 1) -> bytes:
    """A WAV header for s16le audio of unknown length: the RIFF and data sizes
    are 0xFFFFFFFF, which players and soundfile read as "until the end"."""
    byte_rate = sample_rate_hz * channels * 2
    return (
        b"RIFF"
        + (0xFFFFFFFF).to_bytes(4, "little")
        + b"WAVEfmt "
        + (16).to_bytes(4, "little")
        + (1).to_bytes(2, "little")  # PCM
        + channels.to_bytes(2, "little")
        + sample_rate_hz.to_bytes(4, "little")
        + byte_rate.to_bytes(4, "little")
        + (channels * 2).to_bytes(2, "little")
        + (16).to_bytes(2, "little")
        + b"data"
        + (0xFFFFFFFF).to_bytes(4, "little")
    )


def wav_bytes(pcm_s16le: bytes, sample_rate_hz: int) -> bytes:
    """Mono 16-bit PCM as a WAV file's bytes."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(sample_rate_hz)
        file.writeframes(pcm_s16le)
    return buffer.getvalue()
