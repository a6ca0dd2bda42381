"""Animate and Render with the embedded animator: frames in step with the
audio, an mp4 with H.264 + AAC whose durations match, and lips that move
with the speech as measured on the output frames themselves."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import av
import grpc
import numpy as np
import pytest
from PIL import Image
from skimage import data

from services.animate.config import AnimateSettings
from services.animate.portrait import PortraitAnalyzer, PortraitLimits
from services.animate.server import build_program
from services.animate.video import BACKGROUND_RENDERS
from talker.v1 import animate_pb2, animate_pb2_grpc, audio_pb2
from tests.processes import InProcessServer
from tests.speech import piper_speech, silence, to_s16le, to_wav

S16 = audio_pb2.AUDIO_ENCODING_PCM_S16LE
SPEECH = np.concatenate(
    [
        silence(0.6),
        piper_speech("Hello there, I am the astronaut, and I am talking to you now."),
        silence(0.6),
    ]
)


@pytest.fixture(scope="module")
def animate(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[animate_pb2_grpc.AnimateServiceStub, str]]:
    folder: Path = tmp_path_factory.mktemp("avatars")
    server = InProcessServer(
        build_program(AnimateSettings(port=0, metrics_port=0, avatars_dir=folder))
    )
    server.start()
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="PNG")
    with grpc.insecure_channel(server.address) as channel:
        stub = animate_pb2_grpc.AnimateServiceStub(channel)
        avatar = stub.CreateAvatar(animate_pb2.CreateAvatarRequest(image=buffer.getvalue())).avatar
        yield stub, avatar.avatar_id
    server.stop()


def render(
    stub, avatar_id: str, audio: np.ndarray, rate: int = 16_000, background: bool = False
) -> tuple[bytes, list]:  # type: ignore[no-untyped-def]
    responses = list(
        stub.Render(
            animate_pb2.RenderRequest(
                avatar_id=avatar_id,
                audio=to_wav(audio, rate),
                format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_WAV),
                background=background,
            ),
            timeout=300,
        )
    )
    mp4 = b"".join(r.chunk.content for r in responses if r.HasField("chunk"))
    return mp4, responses


def test_render_makes_h264_aac_mp4_with_matching_durations(animate) -> None:
    stub, avatar_id = animate
    mp4, responses = render(stub, avatar_id, SPEECH)
    assert any(r.HasField("progress") for r in responses)
    result = responses[-1].result
    assert (
        result.video_codec == "h264"
        and result.audio_codec == "aac"
        and result.size_bytes == len(mp4)
    )
    with av.open(io.BytesIO(mp4)) as container:
        video, sound = container.streams.video[0], container.streams.audio[0]
        assert video.codec_context.name == "h264" and sound.codec_context.name == "aac"
        video_s = float(video.frames / video.average_rate)
        audio_s = float(sound.duration * sound.time_base)
        frames = sum(1 for _ in container.decode(video=0))  # plays through
    assert frames == result.frame_count
    assert abs(video_s - audio_s) <= 1 / 25, (video_s, audio_s)  # within one frame
    assert abs(audio_s - len(SPEECH) / 16_000) < 0.1


def test_a_background_render_gives_the_same_video_at_the_lowest_priority(animate) -> None:
    stub, avatar_id = animate
    clip = SPEECH[: 16_000 * 2]
    _, normal = render(stub, avatar_id, clip)
    mp4, background = render(stub, avatar_id, clip, background=True)
    assert background[-1].result.frame_count == normal[-1].result.frame_count
    assert background[-1].result.duration_ms == normal[-1].result.duration_ms
    with av.open(io.BytesIO(mp4)) as container:
        assert sum(1 for _ in container.decode(video=0)) == background[-1].result.frame_count
    # The thread it ran on (and the encoder threads it started) yield to everything else.
    on_thread = BACKGROUND_RENDERS.submit(
        lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    )
    assert on_thread.result() == 19


def test_lips_move_with_the_speech_on_the_rendered_frames(animate) -> None:
    stub, avatar_id = animate
    mp4, _ = render(stub, avatar_id, SPEECH)
    analyzer = PortraitAnalyzer(PortraitLimits())
    openness = []
    with av.open(io.BytesIO(mp4)) as container:
        for frame in container.decode(video=0):
            rgb = frame.to_ndarray(format="rgb24")
            faces = analyzer.detector(rgb, 0)
            assert faces, "the face must stay a face in every frame"
            shape = analyzer.predictor(rgb, faces[0])
            points = np.array([(shape.part(i).x, shape.part(i).y) for i in range(68)], dtype=float)
            openness.append(
                np.linalg.norm(points[66] - points[62]) / np.linalg.norm(points[54] - points[48])
            )
    hop = 16_000 // 25
    envelope = np.array(
        [
            np.sqrt(
                np.mean(
                    SPEECH[max(0, int((k + 0.5) * hop) - hop) : int((k + 0.5) * hop) + hop] ** 2
                )
            )
            for k in range(len(openness))
        ]
    )
    mouth = np.array(openness)
    correlation = {
        lag: np.corrcoef(
            mouth[max(0, lag) : len(mouth) + min(0, lag)],
            envelope[max(0, -lag) : len(envelope) - max(0, lag)],
        )[0, 1]
        for lag in range(-3, 4)
    }
    best = max(correlation, key=correlation.__getitem__)
    print("mouth/audio correlation by lag:", {k: round(v, 3) for k, v in correlation.items()})
    assert correlation[best] >= 0.6 and abs(best) <= 1


def test_animate_streams_frames_in_step_with_the_audio(animate) -> None:
    stub, avatar_id = animate
    pcm = to_s16le(SPEECH)

    def requests():  # type: ignore[no-untyped-def]
        yield animate_pb2.AnimateRequest(
            config=animate_pb2.AnimateConfig(
                avatar_id=avatar_id,
                format=audio_pb2.AudioFormat(encoding=S16, sample_rate_hz=16_000),
            )
        )
        for start in range(0, len(pcm), 640):  # 20 ms chunks
            yield animate_pb2.AnimateRequest(audio=pcm[start : start + 640])

    frames = [r.frame for r in stub.Animate(requests(), timeout=120)]
    assert abs(len(frames) - len(SPEECH) / 16_000 * 25) <= 1
    assert [f.frame_index for f in frames] == list(range(len(frames)))
    assert frames[10].timestamp_ms == 400
    image = Image.open(io.BytesIO(frames[0].image))
    assert image.format == "JPEG" and image.size == (frames[0].width, frames[0].height)


BAD = {
    "unknown avatar": (dict(avatar_id="avatar-nope"), grpc.StatusCode.NOT_FOUND, "No avatar"),
    "absurd fps": (dict(fps=1000), grpc.StatusCode.INVALID_ARGUMENT, "fps is 1000"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_animate_config_gets_a_clear_error(animate, case: str) -> None:
    stub, avatar_id = animate
    fields, code, expected = BAD[case]
    config = animate_pb2.AnimateConfig(
        **{
            "avatar_id": avatar_id,
            "format": audio_pb2.AudioFormat(encoding=S16, sample_rate_hz=16_000),
            **fields,
        }
    )
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Animate(iter([animate_pb2.AnimateRequest(config=config)]), timeout=30))
    assert raised.value.code() == code and expected in raised.value.details()


def test_audio_before_config_is_refused(animate) -> None:
    stub, _ = animate
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Animate(iter([animate_pb2.AnimateRequest(audio=b"\0\0" * 320)]), timeout=30))
    assert (
        raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "must carry `config`" in raised.value.details()
    )


def test_long_audio_renders_in_segments_and_plays_through(animate) -> None:
    stub, avatar_id = animate
    sentences = [
        piper_speech(t)
        for t in ("This is a long answer.", "It goes on for a while, sentence after sentence.")
    ]
    pieces, total = [], 0.0
    while total < 150:
        for sentence in sentences:
            pieces += [sentence, silence(0.5)]
            total += len(sentence) / 16_000 + 0.5
    long_audio = np.concatenate(pieces)[: 150 * 16_000]
    mp4, responses = render(stub, avatar_id, long_audio)
    result = responses[-1].result
    assert result.segment_count >= 3  # 150 s in 30-50 s pieces
    with av.open(io.BytesIO(mp4)) as container:
        video, sound = container.streams.video[0], container.streams.audio[0]
        assert video.codec_context.name == "h264" and sound.codec_context.name == "aac"
        decoded = sum(1 for _ in container.decode(video=0))  # plays through every join
        audio_s = float(sound.duration * sound.time_base)
    assert decoded == result.frame_count
    assert abs(decoded / 25 - audio_s) <= 1 / 25, (decoded / 25, audio_s)
    assert abs(audio_s - 150) < 0.1
