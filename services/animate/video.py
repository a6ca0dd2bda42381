"""The mp4 writer: H.264 + AAC in memory (no temp file), long audio rendered
in 30-50 s video segments cut at silences and joined by copying packets (no
re-encoding); the audio is encoded once for the whole clip, so joins add no
AAC priming gaps."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import av
import numpy as np

from services.animate.animator import SAMPLE_RATE_HZ
from services.animate.engine import Animator
from services.common.audio import resample
from services.common.runtime import lower_cpu_priority

SEGMENT_OVER_S = 60.0  # longer audio is rendered in segments
SEGMENT_TARGET_S = (30.0, 50.0)  # each cut lands in the quietest spot of this window
PROGRESS_EVERY = 25  # frames


@dataclass
class RenderedVideo:
    mp4: bytes
    frame_count: int
    segment_count: int


def segment_cuts(audio: np.ndarray, rate: int, fps: int) -> list[int]:
    """Sample offsets that cut `audio` into 30-50 s segments at its quietest
    moments, each on a frame boundary; [0, len] when it is short."""
    hop = rate // fps  # AAC rates / common fps divide evenly (16000/25 = 640)
    cuts = [0]
    if len(audio) / rate > SEGMENT_OVER_S:
        window = int(0.1 * rate)
        while len(audio) - cuts[-1] > SEGMENT_TARGET_S[1] * rate:
            lo = cuts[-1] + int(SEGMENT_TARGET_S[0] * rate)
            hi = cuts[-1] + int(SEGMENT_TARGET_S[1] * rate)
            stretch = audio[lo:hi]
            energy = np.convolve(stretch**2, np.ones(window) / window, mode="same")
            quietest = lo + int(np.argmin(energy[window:-window])) + window
            cuts.append(quietest // hop * hop)
    return [*cuts, len(audio)]


def _encode_video(
    animator: Animator, audio16: np.ndarray, final: bool, fps: int, done: list[tuple[bytes, int]]
) -> Iterator[int]:
    """Encodes one segment's frames; yields frames done now and then, and
    appends the segment's mp4 and frame count to `done`."""
    output = io.BytesIO()
    height, width = animator.portrait.shape[:2]
    count = 0
    with av.open(output, "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "veryfast", "crf": "23"}
        for index, rgb, _openness in animator.frames_for(audio16, final=final):
            for packet in video.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
            count += 1
            if index % PROGRESS_EVERY == 0:
                yield index + 1
        for packet in video.encode():
            container.mux(packet)
    done.append((output.getvalue(), count))


def _lowest_priority() -> None:
    # The encoder threads this thread starts inherit its nice value: the whole
    # render yields the CPU to live turns.
    lower_cpu_priority(19, thread_only=True)


# Renders nobody waits on, one at a time on a thread of their own (a thread
# cannot be given its priority back without privileges, so it is never shared
# with live work).
BACKGROUND_RENDERS = ThreadPoolExecutor(
    max_workers=1, thread_name_prefix="background-render", initializer=_lowest_priority
)


def render_mp4(
    animator: Animator, audio: np.ndarray, rate: int, fps: int
) -> Iterator[int | RenderedVideo]:
    """Renders `audio` (at `rate`, an AAC rate) with `animator`; yields the
    count of frames done as it goes, then the RenderedVideo. Blocking."""
    cuts = segment_cuts(audio, rate, fps)
    segments: list[tuple[bytes, int]] = []
    for number, (start, stop) in enumerate(itertools.pairwise(cuts)):
        piece16 = resample(audio[start:stop], rate, SAMPLE_RATE_HZ)
        yield from _encode_video(animator, piece16, number == len(cuts) - 2, fps, segments)
    output = io.BytesIO()
    with av.open(output, "w", format="mp4") as container:
        # Every stream before the first packet: the header is written then.
        with av.open(io.BytesIO(segments[0][0])) as first:
            video = container.add_stream_from_template(first.streams.video[0])
        sound = container.add_stream("aac", rate=rate)
        sound.layout = "mono"
        frames = _join_video(container, video, segments, fps)
        _encode_audio(container, sound, audio, rate)
    yield frames
    yield RenderedVideo(output.getvalue(), frames, len(segments))


def _join_video(container: Any, video: Any, segments: list[tuple[bytes, int]], fps: int) -> int:
    """Copies the segments' packets into `video`, one after another; returns the frames."""
    frames = 0
    for data, count in segments:
        with av.open(io.BytesIO(data), "r") as segment:
            source = segment.streams.video[0]
            assert source.time_base is not None
            offset = int(frames / fps / source.time_base)
            for packet in segment.demux(source):
                if packet.dts is None or packet.pts is None:
                    continue  # the demuxer's end-of-stream marker
                packet.pts += offset
                packet.dts += offset
                packet.stream = video
                container.mux(packet)
        frames += count
    return frames


def _encode_audio(container: Any, sound: Any, audio: np.ndarray, rate: int) -> None:
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    for start in range(0, len(pcm), 1024):
        frame = av.AudioFrame.from_ndarray(
            pcm[None, start : start + 1024], format="s16", layout="mono"
        )
        frame.sample_rate = rate
        frame.pts = start
        for packet in sound.encode(frame):
            container.mux(packet)
    for packet in sound.encode():
        container.mux(packet)
