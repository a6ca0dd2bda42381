"""The WebRTC media side of the web program without a network: the reply's
audio and frames played out together (the frame shown is the one for the audio
position reached), barge-in dropping the rest, late chunks of a cut reply
ignored, and the microphone resampled to what Converse is told."""

from __future__ import annotations

import asyncio
import io

import av
import numpy as np
from PIL import Image

from web.rtc_media import (
    AUDIO_FRAME_SAMPLES,
    MIC_RATE_HZ,
    PLAYOUT_RATE_HZ,
    VIDEO_LEAD_MS,
    AvatarVideoTrack,
    MicResampler,
    Playout,
    ReplyAudioTrack,
)


def tone(seconds: float, value: int = 1000) -> bytes:
    return np.full(int(seconds * PLAYOUT_RATE_HZ), value, "<i2").tobytes()


def jpeg(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (shade, shade, shade)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_the_frame_shown_is_the_one_for_the_audio_played() -> None:
    changes: list[bool] = []
    playout = Playout(changes.append)
    playout.add_audio(0, 0, tone(1.0))
    for index in range(25):  # 25 fps: one frame per 40 ms
        playout.add_frame(0, index * 40, f"frame {index}".encode())
    assert playout.frame_now() == b"frame 0"  # nothing played: at rest
    for _ in range(10):  # 200 ms
        assert playout.take_audio(AUDIO_FRAME_SAMPLES) == tone(0.02)
    assert playout.speaking and changes == [True]
    # The frame for 200 ms, plus the lead that makes up for video's longer way.
    assert playout.frame_now() == f"frame {(200 + VIDEO_LEAD_MS) // 40}".encode()
    for _ in range(40):  # the rest of the reply, then silence
        playout.take_audio(AUDIO_FRAME_SAMPLES)
    playout.finish_turn(0)
    assert playout.take_audio(AUDIO_FRAME_SAMPLES) == bytes(AUDIO_FRAME_SAMPLES * 2)
    assert not playout.speaking and changes == [True, False]
    assert playout.frame_now() == b"frame 0"  # back at rest
    assert playout.sent_samples == {0: PLAYOUT_RATE_HZ}


def test_frames_arriving_out_of_order_are_shown_in_order() -> None:
    playout = Playout()
    playout.add_audio(0, 0, tone(0.2))
    for timestamp in (80, 0, 120, 40):
        playout.add_frame(0, timestamp, str(timestamp).encode())
    playout.take_audio(AUDIO_FRAME_SAMPLES)  # 20 ms
    shown = (20 + VIDEO_LEAD_MS) // 40 * 40
    assert playout.frame_now() == str(min(shown, 120)).encode()


def test_a_gap_in_the_reply_audio_is_silence_and_the_reply_goes_on() -> None:
    playout = Playout()
    playout.add_audio(0, PLAYOUT_RATE_HZ // 50, tone(0.02))  # the second 20 ms only
    assert playout.take_audio(AUDIO_FRAME_SAMPLES) == bytes(AUDIO_FRAME_SAMPLES * 2)
    assert playout.take_audio(AUDIO_FRAME_SAMPLES) == tone(0.02)
    # Underrun: the gateway is behind real time; silence, the position holds.
    assert playout.take_audio(AUDIO_FRAME_SAMPLES) == bytes(AUDIO_FRAME_SAMPLES * 2)
    assert playout.played == 2 * AUDIO_FRAME_SAMPLES and playout.speaking
    playout.add_audio(0, 2 * AUDIO_FRAME_SAMPLES, tone(0.02, 7))
    assert playout.take_audio(AUDIO_FRAME_SAMPLES) == tone(0.02, 7)


def test_barge_in_drops_the_rest_and_late_chunks_of_the_cut_reply() -> None:
    changes: list[bool] = []
    playout = Playout(changes.append)
    playout.add_audio(0, 0, tone(0.5))
    playout.take_audio(AUDIO_FRAME_SAMPLES)
    playout.stop()
    assert changes == [True, False]
    assert playout.take_audio(AUDIO_FRAME_SAMPLES) == bytes(AUDIO_FRAME_SAMPLES * 2)
    playout.add_audio(1, 0, tone(0.1, 5))  # the next turn's reply
    playout.add_audio(0, AUDIO_FRAME_SAMPLES * 10, tone(0.1))  # late, from the cut one
    playout.add_frame(0, 200, b"late")
    assert playout.take_audio(AUDIO_FRAME_SAMPLES) == tone(0.02, 5)
    assert b"late" not in playout.frames
    assert playout.turn == 1


def test_the_tracks_send_timed_frames_of_the_reply() -> None:
    async def run() -> tuple[list[av.AudioFrame], list[av.VideoFrame]]:
        playout = Playout()
        playout.idle = jpeg(30)
        playout.add_audio(0, 0, tone(0.04, 300))
        playout.add_frame(0, 0, jpeg(200))
        audio, video = ReplyAudioTrack(playout), AvatarVideoTrack(playout, 64, 48)
        before = await video.recv()  # nothing played yet: at rest
        sent = [await audio.recv() for _ in range(3)]
        return sent, [before, await video.recv()]

    sent, shown = asyncio.run(run())
    assert [frame.pts for frame in sent] == [0, AUDIO_FRAME_SAMPLES, 2 * AUDIO_FRAME_SAMPLES]
    assert all(frame.sample_rate == PLAYOUT_RATE_HZ for frame in sent)
    samples = [frame.to_ndarray().ravel() for frame in sent]
    assert (samples[0] == 300).all() and (samples[1] == 300).all() and (samples[2] == 0).all()
    rest, speaking = (frame.to_ndarray(format="gray").mean() for frame in shown)
    assert abs(rest - 30) < 8 and abs(speaking - 200) < 8
    assert shown[1].pts > shown[0].pts


def test_the_microphone_is_resampled_to_mono_16_khz() -> None:
    resampler = MicResampler()
    t = np.arange(PLAYOUT_RATE_HZ) / PLAYOUT_RATE_HZ
    wave = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2")
    stereo = np.stack([wave, wave]).T.reshape(1, -1)  # packed s16, as Opus decodes
    pcm = b""
    for start in range(0, PLAYOUT_RATE_HZ, AUDIO_FRAME_SAMPLES):
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(stereo[:, start * 2 : (start + AUDIO_FRAME_SAMPLES) * 2]),
            format="s16",
            layout="stereo",
        )
        frame.sample_rate = PLAYOUT_RATE_HZ
        pcm += resampler.pcm(frame)
    out = np.frombuffer(pcm, "<i2")
    # About one second at 16 kHz (the resampler holds back a few samples).
    assert abs(len(out) - MIC_RATE_HZ) < 100
    spectrum = np.abs(np.fft.rfft(out[: MIC_RATE_HZ // 2]))
    assert abs(np.argmax(spectrum) * 2 - 440) <= 2  # bins of 2 Hz: the tone survived
