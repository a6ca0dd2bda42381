"""AnimateService: avatars (CreateAvatar, Get/List/Delete), live animation
(Animate: audio chunks in, frames out) and mp4 rendering (Render), with the
embedded animator or, when a checkpoint is configured, Wav2Lip. Audio over
60 s is rendered in 30-50 s segments cut at silences and joined without
re-encoding."""

from __future__ import annotations

import asyncio
import functools
import io
import itertools
import math
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import av
import cv2
import numpy as np
from grpc import aio

from services.animate.animator import SAMPLE_RATE_HZ, PortraitAnimator
from services.animate.avatars import AvatarRecord, AvatarStore
from services.animate.config import AnimateSettings
from services.animate.portrait import Check, PortraitAnalyzer, PortraitLimits
from services.animate.visemes import Span, pinyin_spans, spans_from_phonemes
from services.common.audio import StreamResampler, decode_clip, decode_pcm, raw_layout, resample
from services.common.errors import InvalidInput, LimitExceeded
from services.common.runtime import GrpcProgram, lower_cpu_priority, run_program
from talker.v1 import animate_pb2, animate_pb2_grpc, audio_pb2

if TYPE_CHECKING:
    # torch comes with it: imported only when a Wav2Lip checkpoint is configured.
    from services.animate.wav2lip import Wav2Lip, Wav2LipAnimator

MIN_FPS, MAX_FPS = 5, 60
MP4_CHUNK_BYTES = 256 * 1024
AAC_RATES = (8_000, 11_025, 12_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000)

SEVERITIES = {
    "info": animate_pb2.CHECK_SEVERITY_INFO,
    "warning": animate_pb2.CHECK_SEVERITY_WARNING,
    "error": animate_pb2.CHECK_SEVERITY_ERROR,
}


class AnimateEngine:
    """What the avatars RPCs need, loaded once."""

    def __init__(self, settings: AnimateSettings) -> None:
        self.settings = settings
        self.store = AvatarStore(settings.avatars_dir)
        self.analyzer: PortraitAnalyzer | None = None
        self.wav2lip: Wav2Lip | None = None

    def load(self) -> None:
        limits = PortraitLimits(
            max_yaw_deg=self.settings.max_yaw_deg,
            min_side_px=self.settings.min_side_px,
            min_face_px=self.settings.min_face_px,
            max_pixels=self.settings.max_pixels,
        )
        self.analyzer = PortraitAnalyzer(limits)
        self.store.load()
        if self.settings.wav2lip_checkpoint:
            from services.animate.wav2lip import load_wav2lip

            self.wav2lip = load_wav2lip(Path(self.settings.wav2lip_checkpoint).expanduser())


RIGS_KEPT = 16  # avatars whose animator rig stays in memory (~2-6 MB each)


class AnimateServicer(animate_pb2_grpc.AnimateServiceServicer):
    def __init__(self, engine: AnimateEngine) -> None:
        self.engine = engine
        self._rigs: dict[tuple[str, tuple[int, ...]], PortraitAnimator] = {}

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

    def _animator(self, avatar_id: str, fps: int) -> PortraitAnimator | Wav2LipAnimator:
        record = self.engine.store.get(avatar_id)
        portrait = self.engine.store.portrait(record.avatar_id)
        # Even sides: H.264 with yuv420p needs them.
        height, width = portrait.shape[:2]
        portrait = np.ascontiguousarray(portrait[: height - height % 2, : width - width % 2])
        if self.engine.wav2lip is not None:
            from services.animate.wav2lip import Wav2LipAnimator

            return Wav2LipAnimator(self.engine.wav2lip, portrait, tuple(record.face_box), fps)  # type: ignore[arg-type]
        # The rig (mesh fields per shape, teeth) is built once per avatar and kept.
        key = (record.avatar_id, portrait.shape)
        rig = self._rigs.pop(key, None) or PortraitAnimator(portrait, record.landmarks, fps)
        self._rigs[key] = rig  # most recently used last
        while len(self._rigs) > RIGS_KEPT:
            self._rigs.pop(next(iter(self._rigs)))
        return rig.fresh(fps)

    async def Animate(
        self,
        request_iterator: AsyncIterator[animate_pb2.AnimateRequest],
        context: aio.ServicerContext,
    ) -> AsyncIterator[animate_pb2.AnimateResponse]:
        animator = None
        layout = None
        resampler = None
        encoding = animate_pb2.FRAME_ENCODING_JPEG
        quality = 85
        chunk_index = 0
        async for message in request_iterator:
            which = message.WhichOneof("request")
            if animator is None:
                if which != "config":
                    raise InvalidInput(
                        f"The first message of Animate must carry `config`; it carried {which or 'nothing'}."
                    )
                config = message.config
                fps = check_fps(config.fps)
                layout = raw_layout(
                    config.format.encoding, config.format.sample_rate_hz, config.format.channels
                )
                encoding = config.frame_encoding or animate_pb2.FRAME_ENCODING_JPEG
                quality = config.jpeg_quality or 85
                if not 1 <= quality <= 100:
                    raise InvalidInput(
                        f"jpeg_quality is {config.jpeg_quality}; use 1 to 100 (0 = 85)."
                    )
                animator = await asyncio.to_thread(self._animator, config.avatar_id, fps)
                resampler = StreamResampler(layout.sample_rate_hz, SAMPLE_RATE_HZ)
                if message.phonemes:
                    _add_phonemes(animator, message.phonemes)
                continue
            if message.phonemes:
                _add_phonemes(animator, message.phonemes)
            if which is None and message.phonemes:
                continue  # timings ahead of their audio
            if which != "audio":
                raise InvalidInput("Only the first message may carry config; send audio after it.")
            chunk_index += 1
            assert layout is not None and resampler is not None
            samples = resampler.process(
                decode_pcm(message.audio, layout, f"audio chunk {chunk_index}")
            )
            frames = await asyncio.to_thread(_render, animator, samples, False, encoding, quality)
            for frame in frames:
                yield animate_pb2.AnimateResponse(frame=frame)
        if animator is None:
            raise InvalidInput("The stream ended before its first message (the config).")
        assert resampler is not None
        tail = resampler.process(np.zeros(0, np.float32), last=True)
        for frame in await asyncio.to_thread(_render, animator, tail, True, encoding, quality):
            yield animate_pb2.AnimateResponse(frame=frame)

    async def Render(
        self, request: animate_pb2.RenderRequest, context: aio.ServicerContext
    ) -> AsyncIterator[animate_pb2.RenderResponse]:
        fps = check_fps(request.fps)
        fmt = request.format
        audio, rate = decode_clip(request.audio, fmt.encoding, fmt.sample_rate_hz, fmt.channels)
        if len(audio) / rate > self.engine.settings.max_render_s:
            raise LimitExceeded(
                f"The audio is {len(audio) / rate:.0f} s long; Render takes at most "
                f"{self.engine.settings.max_render_s:.0f} s."
            )
        spans = phoneme_spans(request.phonemes)
        animator = await asyncio.to_thread(self._animator, request.avatar_id, fps)
        if spans and isinstance(animator, PortraitAnimator):
            animator.add_spans(spans)
        if rate not in AAC_RATES:
            audio, rate = resample(audio, rate, 48_000), 48_000
        total = math.ceil(len(audio) / rate * fps)
        queue: asyncio.Queue[object] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def progress(done: int) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, done)

        work = functools.partial(render_mp4, animator, audio, rate, fps, progress)
        job = asyncio.ensure_future(
            loop.run_in_executor(BACKGROUND_RENDERS, work)
            if request.background
            else asyncio.to_thread(work)
        )
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
        while (done := await queue.get()) is not None:
            assert isinstance(done, int)
            yield animate_pb2.RenderResponse(
                progress=animate_pb2.RenderProgress(
                    fraction=min(1.0, done / max(1, total)),
                    frames_done=done,
                    frames_total=total,
                    stage="render",
                )
            )
        mp4, frame_count, segment_count = await job
        for offset in range(0, len(mp4), MP4_CHUNK_BYTES):
            yield animate_pb2.RenderResponse(
                chunk=animate_pb2.Mp4Chunk(
                    content=mp4[offset : offset + MP4_CHUNK_BYTES], offset_bytes=offset
                )
            )
        height, width = animator.portrait.shape[:2]
        yield animate_pb2.RenderResponse(
            result=animate_pb2.RenderResult(
                duration_ms=round(len(audio) / rate * 1000),
                size_bytes=len(mp4),
                video_codec="h264",
                audio_codec="aac",
                width=width,
                height=height,
                fps=fps,
                frame_count=frame_count,
                segment_count=segment_count,
            )
        )

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
        await asyncio.to_thread(self.engine.store.delete, request.avatar_id)
        for key in [k for k in self._rigs if k[0] == request.avatar_id]:
            self._rigs.pop(key, None)
        return animate_pb2.DeleteAvatarResponse()


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


def _add_phonemes(
    animator: PortraitAnimator | Wav2LipAnimator, timings: Sequence[audio_pb2.PhonemeTiming]
) -> None:
    spans = phoneme_spans(timings)
    # Wav2Lip reads the lips off the audio itself; timings are for the embedded animator.
    if isinstance(animator, PortraitAnimator):
        animator.add_spans(spans)


def check_fps(fps: int) -> int:
    fps = fps or 25
    if not MIN_FPS <= fps <= MAX_FPS:
        raise InvalidInput(f"fps is {fps}; use {MIN_FPS} to {MAX_FPS} (0 = 25).")
    return fps


def _render(
    animator: PortraitAnimator | Wav2LipAnimator,
    samples: np.ndarray,
    final: bool,
    encoding: int,
    quality: int,
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


SEGMENT_OVER_S = 60.0  # longer audio is rendered in segments
SEGMENT_TARGET_S = (30.0, 50.0)  # each cut lands in the quietest spot of this window


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
    animator: PortraitAnimator | Wav2LipAnimator,
    audio16: np.ndarray,
    final: bool,
    fps: int,
    progress: Callable[[int], None],
) -> tuple[bytes, int]:
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
            if index % 25 == 0:
                progress(index + 1)
        for packet in video.encode():
            container.mux(packet)
    return output.getvalue(), count


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
    animator: PortraitAnimator | Wav2LipAnimator,
    audio: np.ndarray,
    rate: int,
    fps: int,
    progress: Callable[[int], None],
) -> tuple[bytes, int, int]:
    """H.264 + AAC mp4 in memory (no temp file). The video is rendered in
    segments of 30-50 s cut at silences and joined by copying packets (no
    re-encoding); the audio is encoded once for the whole clip, so joins add
    no AAC priming gaps. Returns (bytes, frame count, segment count)."""
    cuts = segment_cuts(audio, rate, fps)
    segments = []
    for number, (start, stop) in enumerate(itertools.pairwise(cuts)):
        piece16 = resample(audio[start:stop], rate, SAMPLE_RATE_HZ)
        segments.append(_encode_video(animator, piece16, number == len(cuts) - 2, fps, progress))
    output = io.BytesIO()
    frames = 0
    with av.open(output, "w", format="mp4") as container:
        with av.open(io.BytesIO(segments[0][0])) as first:
            video = container.add_stream_from_template(first.streams.video[0])
        sound = container.add_stream("aac", rate=rate)
        sound.layout = "mono"
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
    progress(frames)
    return output.getvalue(), frames, len(segments)


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
