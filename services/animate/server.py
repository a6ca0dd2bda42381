"""AnimateService: avatars (CreateAvatar, Get/List/Delete), live animation
(Animate: audio chunks in, frames out) and mp4 rendering (Render). The engine
(services/animate/engine.py) picks the animator; the mp4 writer is
services/animate/video.py."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from grpc import aio

from services.animate.animator import SAMPLE_RATE_HZ
from services.animate.avatars import AvatarRecord
from services.animate.config import AnimateSettings
from services.animate.engine import AnimateEngine, Animator
from services.animate.portrait import Check
from services.animate.video import BACKGROUND_RENDERS, RenderedVideo, render_mp4
from services.animate.visemes import Span, pinyin_spans, spans_from_phonemes
from services.common.audio import (
    PcmLayout,
    StreamResampler,
    decode_clip,
    decode_pcm,
    raw_layout,
    resample,
)
from services.common.bridge import ThreadStream
from services.common.errors import InvalidInput, LimitExceeded
from services.common.runtime import GrpcProgram, run_program
from talker.v1 import animate_pb2, animate_pb2_grpc, audio_pb2

MIN_FPS, MAX_FPS = 5, 60
MP4_CHUNK_BYTES = 256 * 1024
AAC_RATES = (8_000, 11_025, 12_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000)

SEVERITIES = {
    "info": animate_pb2.CHECK_SEVERITY_INFO,
    "warning": animate_pb2.CHECK_SEVERITY_WARNING,
    "error": animate_pb2.CHECK_SEVERITY_ERROR,
}


class AnimateServicer(animate_pb2_grpc.AnimateServiceServicer):
    def __init__(self, engine: AnimateEngine) -> None:
        self.engine = engine

    async def CreateAvatar(
        self, request: animate_pb2.CreateAvatarRequest, context: aio.ServicerContext
    ) -> animate_pb2.CreateAvatarResponse:
        analyzer = self.engine.analyzer
        assert analyzer is not None
        display_name = request.display_name.strip() or "portrait"
        if len(display_name) > 80:
            raise InvalidInput("display_name must be at most 80 characters.")
        rgb = await asyncio.to_thread(analyzer.decode, request.image)
        report = await asyncio.to_thread(analyzer.analyze, rgb)
        if request.validate_only:
            return animate_pb2.CreateAvatarResponse(
                avatar=animate_pb2.Avatar(
                    display_name=display_name,
                    width=report.width,
                    height=report.height,
                    checks=[check_message(c) for c in report.checks],
                    face_box=box_message(report.face_box),
                )
            )
        if not report.acceptable:
            reasons = " ".join(f"({i}) {p}" for i, p in enumerate(report.problems, start=1))
            raise InvalidInput(f"The portrait cannot be used: {reasons}")
        record = await asyncio.to_thread(self.engine.store.add, rgb, display_name, report)
        return animate_pb2.CreateAvatarResponse(avatar=avatar_message(record))

    async def Animate(
        self,
        request_iterator: AsyncIterator[animate_pb2.AnimateRequest],
        context: aio.ServicerContext,
    ) -> AsyncIterator[animate_pb2.AnimateResponse]:
        live: LiveAnimation | None = None
        async for message in request_iterator:
            if live is None:
                live = await self._open(message)
            else:
                for frame in await live.feed(message):
                    yield animate_pb2.AnimateResponse(frame=frame)
        if live is None:
            raise InvalidInput("The stream ended before its first message (the config).")
        for frame in await live.finish():
            yield animate_pb2.AnimateResponse(frame=frame)

    async def _open(self, message: animate_pb2.AnimateRequest) -> LiveAnimation:
        """A live animation from the stream's first message (its config)."""
        which = message.WhichOneof("request")
        if which != "config":
            raise InvalidInput(
                f"The first message of Animate must carry `config`; it carried {which or 'nothing'}."
            )
        config = message.config
        fps = check_fps(config.fps)
        layout = raw_layout(
            config.format.encoding, config.format.sample_rate_hz, config.format.channels
        )
        quality = config.jpeg_quality or 85
        if not 1 <= quality <= 100:
            raise InvalidInput(f"jpeg_quality is {config.jpeg_quality}; use 1 to 100 (0 = 85).")
        animator = await asyncio.to_thread(self.engine.animator, config.avatar_id, fps)
        animator.add_spans(phoneme_spans(message.phonemes))
        encoding = config.frame_encoding or animate_pb2.FRAME_ENCODING_JPEG
        return LiveAnimation(animator, layout, encoding, quality)

    async def Render(
        self, request: animate_pb2.RenderRequest, context: aio.ServicerContext
    ) -> AsyncIterator[animate_pb2.RenderResponse]:
        fps = check_fps(request.fps)
        audio, rate = self._render_audio(request)
        spans = phoneme_spans(request.phonemes)
        animator = await asyncio.to_thread(self.engine.animator, request.avatar_id, fps)
        animator.add_spans(spans)
        total = math.ceil(len(audio) / rate * fps)
        executor = BACKGROUND_RENDERS if request.background else None
        video: RenderedVideo | None = None
        async with ThreadStream(
            lambda stop: render_mp4(animator, audio, rate, fps), executor
        ) as steps:
            async for step in steps:
                if isinstance(step, RenderedVideo):
                    video = step
                else:
                    yield animate_pb2.RenderResponse(progress=progress_message(step, total))
        assert video is not None
        for offset in range(0, len(video.mp4), MP4_CHUNK_BYTES):
            content = video.mp4[offset : offset + MP4_CHUNK_BYTES]
            yield animate_pb2.RenderResponse(
                chunk=animate_pb2.Mp4Chunk(content=content, offset_bytes=offset)
            )
        yield animate_pb2.RenderResponse(
            result=result_message(video, animator, len(audio) / rate, fps)
        )

    def _render_audio(self, request: animate_pb2.RenderRequest) -> tuple[np.ndarray, int]:
        """The request's audio at an AAC rate, within the length limit."""
        fmt = request.format
        audio, rate = decode_clip(request.audio, fmt.encoding, fmt.sample_rate_hz, fmt.channels)
        if len(audio) / rate > self.engine.settings.max_render_s:
            raise LimitExceeded(
                f"The audio is {len(audio) / rate:.0f} s long; Render takes at most "
                f"{self.engine.settings.max_render_s:.0f} s."
            )
        if rate not in AAC_RATES:
            audio, rate = resample(audio, rate, 48_000), 48_000
        return audio, rate

    async def GetAvatar(
        self, request: animate_pb2.GetAvatarRequest, context: aio.ServicerContext
    ) -> animate_pb2.GetAvatarResponse:
        return animate_pb2.GetAvatarResponse(
            avatar=avatar_message(self.engine.store.get(request.avatar_id))
        )

    async def ListAvatars(
        self, request: animate_pb2.ListAvatarsRequest, context: aio.ServicerContext
    ) -> animate_pb2.ListAvatarsResponse:
        return animate_pb2.ListAvatarsResponse(
            avatars=[avatar_message(r) for r in self.engine.store.all()]
        )

    async def DeleteAvatar(
        self, request: animate_pb2.DeleteAvatarRequest, context: aio.ServicerContext
    ) -> animate_pb2.DeleteAvatarResponse:
        await asyncio.to_thread(self.engine.delete, request.avatar_id)
        return animate_pb2.DeleteAvatarResponse()


@dataclass
class LiveAnimation:
    """One Animate stream after its config: audio chunks in, frames out."""

    animator: Animator
    layout: PcmLayout
    encoding: int
    quality: int
    chunks: int = 0

    def __post_init__(self) -> None:
        self.resampler = StreamResampler(self.layout.sample_rate_hz, SAMPLE_RATE_HZ)

    async def feed(self, message: animate_pb2.AnimateRequest) -> list[animate_pb2.VideoFrame]:
        self.animator.add_spans(phoneme_spans(message.phonemes))
        which = message.WhichOneof("request")
        if which is None and message.phonemes:
            return []  # timings ahead of their audio
        if which != "audio":
            raise InvalidInput("Only the first message may carry config; send audio after it.")
        self.chunks += 1
        pcm = decode_pcm(message.audio, self.layout, f"audio chunk {self.chunks}")
        return await self._frames(self.resampler.process(pcm), final=False)

    async def finish(self) -> list[animate_pb2.VideoFrame]:
        tail = self.resampler.process(np.zeros(0, np.float32), last=True)
        return await self._frames(tail, final=True)

    async def _frames(self, samples: np.ndarray, final: bool) -> list[animate_pb2.VideoFrame]:
        return await asyncio.to_thread(
            frame_messages, self.animator, samples, final, self.encoding, self.quality
        )


MAX_PHONEMES = 20_000  # per message: about half an hour of speech
MAX_PHONEME_MS = 60_000


def phoneme_spans(timings: Sequence[audio_pb2.PhonemeTiming]) -> list[Span]:
    """Mouth-shape spans from phoneme timings, checked."""
    if len(timings) > MAX_PHONEMES:
        raise LimitExceeded(
            f"{len(timings)} phoneme timings in one message; at most {MAX_PHONEMES}."
        )
    ipa: list[tuple[str, float, float]] = []
    pinyin: list[tuple[str, float, float]] = []
    for number, timing in enumerate(timings):
        notation = timing.notation or "ipa"
        if notation not in ("ipa", "pinyin"):
            raise InvalidInput(
                f'phonemes[{number}].notation is {timing.notation!r}; use "ipa" (or empty) or "pinyin".'
            )
        if not timing.phoneme or len(timing.phoneme) > 12:
            raise InvalidInput(
                f"phonemes[{number}].phoneme is {timing.phoneme!r}; give one sound of 1 to 12 characters."
            )
        if timing.duration_ms > MAX_PHONEME_MS:
            raise InvalidInput(
                f"phonemes[{number}].duration_ms is {timing.duration_ms}; one sound lasts at most {MAX_PHONEME_MS} ms."
            )
        item = (timing.phoneme, timing.start_ms / 1000, timing.duration_ms / 1000)
        (ipa if notation == "ipa" else pinyin).append(item)
    return spans_from_phonemes(ipa) + pinyin_spans(pinyin)


def check_fps(fps: int) -> int:
    fps = fps or 25
    if not MIN_FPS <= fps <= MAX_FPS:
        raise InvalidInput(f"fps is {fps}; use {MIN_FPS} to {MAX_FPS} (0 = 25).")
    return fps


def frame_messages(
    animator: Animator, samples: np.ndarray, final: bool, encoding: int, quality: int
) -> list[animate_pb2.VideoFrame]:
    frames = []
    for index, rgb, _openness in animator.frames_for(samples, final=final):
        height, width = rgb.shape[:2]
        if encoding == animate_pb2.FRAME_ENCODING_RGB24:
            image = rgb.tobytes()
        else:
            image = cv2.imencode(
                ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
            )[1].tobytes()
        frames.append(
            animate_pb2.VideoFrame(
                image=image,
                width=width,
                height=height,
                encoding=encoding,
                frame_index=index,
                timestamp_ms=round(index * 1000 / animator.fps),
            )
        )
    return frames


def progress_message(done: int, total: int) -> animate_pb2.RenderProgress:
    return animate_pb2.RenderProgress(
        fraction=min(1.0, done / max(1, total)),
        frames_done=done,
        frames_total=total,
        stage="render",
    )


def result_message(
    video: RenderedVideo, animator: Animator, duration_s: float, fps: int
) -> animate_pb2.RenderResult:
    height, width = animator.portrait.shape[:2]
    return animate_pb2.RenderResult(
        duration_ms=round(duration_s * 1000),
        size_bytes=len(video.mp4),
        video_codec="h264",
        audio_codec="aac",
        width=width,
        height=height,
        fps=fps,
        frame_count=video.frame_count,
        segment_count=video.segment_count,
    )


def check_message(check: Check) -> animate_pb2.PortraitCheck:
    return animate_pb2.PortraitCheck(
        name=check.name,
        passed=check.passed,
        severity=SEVERITIES[check.severity],
        message=check.message,
        measured_value=check.measured,
        threshold=check.threshold,
        unit=check.unit,
    )


def box_message(box: tuple[int, int, int, int] | None) -> animate_pb2.BoundingBox | None:
    if box is None:
        return None
    x, y, w, h = box
    return animate_pb2.BoundingBox(x=x, y=y, width=w, height=h)


def avatar_message(record: AvatarRecord) -> animate_pb2.Avatar:
    avatar = animate_pb2.Avatar(
        avatar_id=record.avatar_id,
        display_name=record.display_name,
        width=record.width,
        height=record.height,
        checks=[check_message(c) for c in record.check_objects()],
        face_box=box_message(tuple(record.face_box)),  # type: ignore[arg-type]
    )
    avatar.create_time.FromNanoseconds(int(record.created * 1e9))
    return avatar


def build_program(settings: AnimateSettings) -> GrpcProgram:
    engine = AnimateEngine(settings)
    servicer = AnimateServicer(engine)
    return GrpcProgram(
        settings,
        [animate_pb2.DESCRIPTOR.services_by_name["AnimateService"].full_name],
        lambda server: animate_pb2_grpc.add_AnimateServiceServicer_to_server(servicer, server),
        engine.load,
        engine,
    )


def main(argv: list[str] | None = None) -> None:
    run_program(AnimateSettings, build_program, argv)


if __name__ == "__main__":
    main()
