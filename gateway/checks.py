"""The checks of a call's input the gateway makes before any stage works on it:
typed text, a recorded clip's length, and the reply options of Ask and Converse.
Each refusal is a sentence that says what to send instead."""

from __future__ import annotations

import io

import soundfile

from pipeline.turns import ReplyOptions
from services.common.audio import raw_layout
from services.common.errors import InvalidInput, LimitExceeded
from services.common.ids import check_id
from talker.v1 import audio_pb2, talker_pb2


def checked_text(raw: str, max_chars: int, what: str) -> str:
    """A typed question, stripped; empty or too long is refused with a reason."""
    text = raw.strip()
    if not text:
        raise InvalidInput(f"{what} is empty: send what the user typed.")
    if len(text) > max_chars:
        raise LimitExceeded(f"{what} has {len(text)} characters; at most {max_chars} are accepted.")
    return text


def clip_seconds(clip: talker_pb2.AudioClip) -> float:
    fmt = clip.format
    if fmt.encoding in (audio_pb2.AUDIO_ENCODING_PCM_S16LE, audio_pb2.AUDIO_ENCODING_PCM_F32LE):
        layout = raw_layout(fmt.encoding, fmt.sample_rate_hz, fmt.channels)
        return len(clip.audio) / layout.bytes_per_frame / layout.sample_rate_hz
    try:
        info = soundfile.info(io.BytesIO(clip.audio))
    except Exception:  # not a readable file: ASR will say exactly why
        return 0.0
    return float(info.frames) / info.samplerate if info.samplerate else 0.0


MAX_FPS = 60
MIN_RATE_HZ, MAX_RATE_HZ = 8000, 48000


def reply_options(
    request: talker_pb2.ConverseConfig | talker_pb2.AskRequest, render_mp4: bool = False
) -> ReplyOptions:
    """Checks the reply settings shared by ConverseConfig and AskRequest."""
    mode = request.mode or talker_pb2.REPLY_MODE_AUDIO
    if mode not in talker_pb2.ReplyMode.values():
        raise InvalidInput(f"mode {mode} is not a ReplyMode; use TEXT, AUDIO or AUDIO_VIDEO.")
    voice_id = request.voice_id
    if voice_id:
        check_id(voice_id, "voice_id")
    avatar_id = request.avatar_id
    if avatar_id:
        check_id(avatar_id, "avatar_id")
    if (mode == talker_pb2.REPLY_MODE_AUDIO_VIDEO or render_mp4) and not avatar_id:
        raise InvalidInput(
            "avatar_id is required to show video (REPLY_MODE_AUDIO_VIDEO or render_mp4): "
            "create one with AnimateService.CreateAvatar."
        )
    rate = request.output_sample_rate_hz
    if rate and not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:
        raise InvalidInput(
            f"output_sample_rate_hz is {rate}; use {MIN_RATE_HZ} to {MAX_RATE_HZ} (0 = the voice's own)."
        )
    if request.fps > MAX_FPS:
        raise InvalidInput(f"fps is {request.fps}; use 1 to {MAX_FPS} (0 = 25).")
    if request.jpeg_quality > 100:
        raise InvalidInput(f"jpeg_quality is {request.jpeg_quality}; use 1 to 100 (0 = default).")
    return ReplyOptions(
        mode=mode,
        voice_id=voice_id,
        avatar_id=avatar_id,
        output_sample_rate_hz=rate,
        frame_encoding=request.frame_encoding,
        fps=request.fps or 25,
        jpeg_quality=request.jpeg_quality,
        sampling=request.sampling if request.HasField("sampling") else None,
        render_mp4=render_mp4,
    )
