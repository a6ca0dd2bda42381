"""The media side of a WebRTC session, no gRPC: the reply's audio and the
avatar's frames played out in real time as aiortc tracks, and the browser's
microphone turned into the raw PCM that Converse takes.

One `Playout` per session holds the reply being spoken. The audio track is the
clock: every 20 ms it takes the next 20 ms of reply audio (or silence), and the
video track shows the frame whose `timestamp_ms` matches the audio position
reached, so lips follow the voice whatever the network or the gateway's pace.
Both tracks are paced from one wall clock and leave in one WebRTC stream, so the
browser's own lip sync (RTCP sender reports) lines them up."""

from __future__ import annotations

import asyncio
import bisect
import fractions
import io
import logging
import time
from collections.abc import Callable
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import (
    VIDEO_CLOCK_RATE,
    VIDEO_TIME_BASE,
    MediaStreamError,
    MediaStreamTrack,
)

log = logging.getLogger("talker.web.rtc")

#: Reply audio is asked of the gateway at WebRTC's own Opus rate, so it is never resampled here.
PLAYOUT_RATE_HZ = 48_000
AUDIO_FRAME_SAMPLES = PLAYOUT_RATE_HZ // 50  # 20 ms, WebRTC's audio packet
#: What ASR works at (services/asr resamples anything else to it); sending it saves
#: three quarters of the bytes and ASR's own resampling.
MIC_RATE_HZ = 16_000
FPS = 25
#: Frames are chosen this far ahead of the audio played. A video frame spends
#: longer than an audio frame between here and the screen (VP8 encoding in Python
#: against Opus, a bigger jitter buffer), and aiortc's RTCP sender reports stamp
#: send time, not capture time, so the browser's lip sync does not make up for it.
#: Measured in headless chromium on the loaded 2-core host (the page's analyser for
#: the first sound, a canvas for the first mouth movement): without a lead the
#: mouth moved 160-230 ms after the sound; with 150 ms, 90 ms before it (a lag of
#: the sound people tolerate far better than the reverse), except in runs where
#: the browser's audio buffer had grown under load and the sound came ~0.5 s late.
VIDEO_LEAD_MS = 150
#: An idle face changes nothing, so VP8 makes it cheap; fewer of them still saves CPU.
IDLE_FPS = 10


def decode_frame(image: bytes) -> av.VideoFrame:
    from PIL import Image

    with Image.open(io.BytesIO(image)) as picture:
        rgb = np.asarray(picture.convert("RGB"))
    return av.VideoFrame.from_ndarray(rgb, format="rgb24")


def blank_frame(width: int = 512, height: int = 512) -> av.VideoFrame:
    # A dark slate, not black: the page shows it until the portrait's first frame.
    pixels = np.full((height, width, 3), (24, 28, 36), dtype=np.uint8)
    return av.VideoFrame.from_ndarray(pixels, format="rgb24")


class Playout:
    """The reply being spoken: its audio (s16 mono at PLAYOUT_RATE_HZ) and its
    frames by timestamp; `played` samples of it have gone out."""

    def __init__(self, on_speaking: Callable[[bool], None] | None = None) -> None:
        self.on_speaking = on_speaking or (lambda speaking: None)
        self.turn: int | None = None
        self.audio = bytearray()
        self.played = 0
        self.frame_times: list[int] = []
        self.frames: list[bytes | av.VideoFrame] = []
        #: The turn's reply is complete (finished or cut): once played, the avatar is idle.
        self.complete = False
        self.speaking = False
        #: Shown when no reply plays: the avatar at rest (or a reply's first frame).
        self.idle: bytes | av.VideoFrame | None = None
        #: Reply audio sent out so far, in samples, per turn (for tests and logs).
        self.sent_samples: dict[int, int] = {}
        #: When the first real sample of each turn went out (time.monotonic()).
        self.first_sample_at: dict[int, float] = {}

    def start_turn(self, turn: int) -> None:
        self.turn = turn
        self.audio.clear()
        self.played = 0
        self.frame_times.clear()
        self.frames.clear()
        self.complete = False

    def add_audio(self, turn: int, offset_samples: int, pcm: bytes) -> None:
        if turn != self.turn:
            if self.turn is not None and turn < self.turn:
                return  # a late chunk of a reply already cut
            self.start_turn(turn)
        start = offset_samples * 2
        if len(self.audio) < start:
            self.audio.extend(bytes(start - len(self.audio)))
        self.audio[start : start + len(pcm)] = pcm

    def add_frame(self, turn: int, timestamp_ms: int, image: bytes) -> None:
        if turn != self.turn:
            if self.turn is not None and turn < self.turn:
                return
            self.start_turn(turn)
        where = bisect.bisect(self.frame_times, timestamp_ms)
        self.frame_times.insert(where, timestamp_ms)
        self.frames.insert(where, image)
        if timestamp_ms == 0 and self.idle is None:
            self.idle = image

    def finish_turn(self, turn: int) -> None:
        if turn == self.turn:
            self.complete = True

    def stop(self) -> None:
        """Barge-in: what is left of the reply is dropped now."""
        if self.turn is not None:
            del self.audio[self.played * 2 :]
            self.complete = True
        self._set_speaking(False)

    def take_audio(self, samples: int) -> bytes:
        start = self.played * 2
        pcm = bytes(self.audio[start : start + samples * 2])
        if pcm:
            self.played += len(pcm) // 2
            if self.turn is not None:
                self.first_sample_at.setdefault(self.turn, time.monotonic())
                self.sent_samples[self.turn] = self.sent_samples.get(self.turn, 0) + len(pcm) // 2
            self._set_speaking(True)
        elif self.complete or self.turn is None:
            self._set_speaking(False)
        # An underrun mid-reply (the gateway behind real time) is padded with
        # silence; the frames wait for the audio, so lips stay in step.
        return pcm + bytes(samples * 2 - len(pcm))

    def frame_now(self) -> bytes | av.VideoFrame | None:
        """The frame that goes with the audio just played, or the idle face."""
        if self.speaking and self.frames:
            played_ms = self.played * 1000 // PLAYOUT_RATE_HZ + VIDEO_LEAD_MS
            where = bisect.bisect(self.frame_times, played_ms) - 1
            return self.frames[max(where, 0)]
        return self.idle

    def _set_speaking(self, speaking: bool) -> None:
        if speaking != self.speaking:
            self.speaking = speaking
            self.on_speaking(speaking)


class ReplyAudioTrack(MediaStreamTrack):
    """The avatar's voice: 20 ms of the reply (or silence) every 20 ms."""

    kind = "audio"

    def __init__(self, playout: Playout) -> None:
        super().__init__()
        self.playout = playout
        self._start: float | None = None
        self._pts = 0

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._pts += AUDIO_FRAME_SAMPLES
            wait = self._start + self._pts / PLAYOUT_RATE_HZ - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        pcm = self.playout.take_audio(AUDIO_FRAME_SAMPLES)
        frame = av.AudioFrame(format="s16", layout="mono", samples=AUDIO_FRAME_SAMPLES)
        frame.planes[0].update(pcm)
        frame.sample_rate = PLAYOUT_RATE_HZ
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, PLAYOUT_RATE_HZ)
        return frame


class AvatarVideoTrack(MediaStreamTrack):
    """The avatar's face: the reply's frame for the audio position reached, or the
    idle face between replies."""

    kind = "video"

    def __init__(self, playout: Playout, width: int = 512, height: int = 512) -> None:
        super().__init__()
        self.playout = playout
        self._start: float | None = None
        self._pts = 0
        self._blank = blank_frame(width, height)
        self._shown: Any = None
        self._decoded: av.VideoFrame = self._blank.reformat(format="yuv420p")

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            fps = FPS if self.playout.speaking else IDLE_FPS
            self._pts += VIDEO_CLOCK_RATE // fps
            wait = self._start + self._pts / VIDEO_CLOCK_RATE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        image = self.playout.frame_now()
        if image is not None and image is not self._shown:
            self._shown = image
            # JPEG is decoded only when shown: frames a barge-in drops cost nothing.
            decoded = image if isinstance(image, av.VideoFrame) else decode_frame(image)
            self._decoded = decoded.reformat(format="yuv420p")
        # One frame object shown again and again: aiortc encodes each before asking
        # for the next, so restamping it is safe and saves a conversion a tick.
        frame = self._decoded
        frame.pts = self._pts
        frame.time_base = VIDEO_TIME_BASE
        return frame


class MicResampler:
    """Browser microphone frames (Opus-decoded, 48 kHz, often stereo) to mono
    s16 PCM at MIC_RATE_HZ for Converse."""

    def __init__(self) -> None:
        self.resampler = av.AudioResampler(format="s16", layout="mono", rate=MIC_RATE_HZ)

    def pcm(self, frame: av.AudioFrame) -> bytes:
        out = bytearray()
        for resampled in self.resampler.resample(frame):
            out += resampled.to_ndarray().astype("<i2").tobytes()
        return bytes(out)
