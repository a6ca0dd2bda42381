"""One turn's reply, pipelined: chat text streams out as it is generated; each
complete sentence goes to speech synthesis while the next is still being
written; each audio chunk goes to animation as soon as it exists. Every piece
is sent to the client the moment it is made, through `emit`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from pipeline.stages import VOICE_METADATA_KEY, Stage, Stages, pcm_s16le
from pipeline.turns import CallContext, Emit, Turn
from services.common.tasks import all_or_none
from services.common.text import OpeningClause
from talker.v1 import animate_pb2, audio_pb2, chat_pb2, synthesize_pb2


class Reply:
    """Makes the reply of `turn` to `turn.user_text` and emits it."""

    def __init__(
        self,
        stages: Stages,
        call: CallContext,
        turn: Turn,
        emit: Emit,
    ) -> None:
        self.stages = stages
        self.call = call
        self.options = call.options
        self.turn = turn
        self.emit = emit

    async def run(self) -> None:
        self.turn.reply_started = time.perf_counter()
        # A stage known to be down fails the turn now, before the others do work for nothing.
        needed: list[Stage] = [self.stages.chat]
        if self.options.speaks:
            needed.append(self.stages.synthesize)
        if self.options.live_video or self.options.render_mp4:
            needed.append(self.stages.animate)
        for stage in needed:
            await stage.ready()
        sentences: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
        chunks: asyncio.Queue[synthesize_pb2.AudioChunk | None] = asyncio.Queue()
        work = [self._think(sentences if self.options.speaks else None)]
        if self.options.speaks:
            work.append(self._speak(sentences, chunks if self.options.live_video else None))
        if self.options.live_video:
            work.append(self._animate(chunks))
        await all_or_none(work)
        if self.options.render_mp4 and self.turn.audio:
            await self._render()

    async def _think(self, sentences: asyncio.Queue[tuple[int, str] | None] | None) -> None:
        turn = self.turn
        request = chat_pb2.ChatRequest(
            session_id=self.call.session_id,
            text=turn.user_text,
            user_id=self.call.user_id,
            sampling=self.options.sampling,
            speculative=bool(turn.speculation_id),
            speculation_id=turn.speculation_id,
            discard_speculation_id=turn.discard_speculation_id,
        )
        opening = OpeningClause()
        try:
            async for response in self.stages.chat.chat(request):
                which = response.WhichOneof("response")
                if which == "delta":
                    turn.mark("first_token_ms")
                    turn.reply_parts.append(response.delta.text)
                    await self.emit(turn.event(reply_delta=response.delta))
                    clause = opening.feed(response.delta.text)
                    if clause and sentences is not None:
                        sentences.put_nowait((0, clause))
                elif which == "sentence":
                    turn.mark("first_sentence_ms")
                    await self.emit(turn.event(reply_sentence=response.sentence))
                    text = opening.rest_of(response.sentence.text)
                    if text and sentences is not None:
                        sentences.put_nowait((response.sentence.sentence_index, text))
                elif which == "finished":
                    turn.finished = response.finished
        finally:
            if sentences is not None:
                sentences.put_nowait(None)

    async def _speak(
        self,
        sentences: asyncio.Queue[tuple[int, str] | None],
        chunks: asyncio.Queue[synthesize_pb2.AudioChunk | None] | None,
    ) -> None:
        turn = self.turn
        try:
            while (item := await sentences.get()) is not None:
                index, text = item
                request = synthesize_pb2.SynthesizeRequest(
                    text=text,
                    voice_id=self.options.voice_id,
                    output_format=pcm_s16le(self.options.output_sample_rate_hz),
                )
                trailers: dict[str, str] = {}
                async for response in self.stages.synthesize.synthesize(request, trailers):
                    if response.WhichOneof("response") != "chunk":
                        continue
                    chunk = response.chunk
                    rate = chunk.format.sample_rate_hz
                    turn.audio_rate_hz = turn.audio_rate_hz or rate
                    offset = len(turn.audio) // 2
                    # The sentence's timings move onto the turn's timeline with its audio.
                    shift_ms = offset * 1000 // rate - chunk.offset_ms
                    phonemes = [
                        audio_pb2.PhonemeTiming(
                            phoneme=p.phoneme,
                            start_ms=max(0, p.start_ms + shift_ms),
                            duration_ms=p.duration_ms,
                            notation=p.notation,
                        )
                        for p in chunk.phonemes
                    ]
                    turn.phonemes += phonemes
                    rebased = synthesize_pb2.AudioChunk(
                        audio=chunk.audio,
                        format=chunk.format,
                        offset_samples=offset,
                        offset_ms=offset * 1000 // rate,
                        duration_ms=chunk.duration_ms,
                        sentence_index=index,
                        phonemes=phonemes,
                    )
                    turn.audio.extend(chunk.audio)
                    turn.mark("first_audio_ms")
                    await self.emit(turn.event(reply_audio=rebased))
                    if chunks is not None:
                        chunks.put_nowait(rebased)
                # The voice that spoke (Chinese text gets the Mandarin voice).
                spoken_by = trailers.get(VOICE_METADATA_KEY)
                if spoken_by and spoken_by not in turn.voices_used:
                    turn.voices_used.append(spoken_by)
        finally:
            if chunks is not None:
                chunks.put_nowait(None)

    async def _animate(self, chunks: asyncio.Queue[synthesize_pb2.AudioChunk | None]) -> None:
        first = await chunks.get()
        if first is None:
            return  # nothing was said, so there is nothing to show
        options = self.options

        async def requests() -> AsyncIterator[animate_pb2.AnimateRequest]:
            yield animate_pb2.AnimateRequest(
                config=animate_pb2.AnimateConfig(
                    avatar_id=options.avatar_id,
                    format=first.format,
                    fps=options.fps,
                    frame_encoding=options.frame_encoding,
                    jpeg_quality=options.jpeg_quality,
                )
            )
            yield animate_pb2.AnimateRequest(audio=first.audio, phonemes=first.phonemes)
            while (chunk := await chunks.get()) is not None:
                yield animate_pb2.AnimateRequest(audio=chunk.audio, phonemes=chunk.phonemes)

        turn = self.turn
        async for response in self.stages.animate.animate(requests()):
            turn.mark("first_frame_ms")
            turn.frames += 1
            await self.emit(turn.event(video_frame=response.frame))

    async def _render(self) -> None:
        turn = self.turn

        async def forward(response: animate_pb2.RenderResponse) -> None:
            which = response.WhichOneof("response")
            if which == "progress":
                await self.emit(turn.event(render_progress=response.progress))
            elif which == "chunk":
                turn.mark("first_frame_ms")
                await self.emit(turn.event(mp4_chunk=response.chunk))

        request = render_request(
            self.options.avatar_id,
            bytes(turn.audio),
            turn.audio_rate_hz,
            self.options.fps,
            phonemes=turn.phonemes,
        )
        mp4, turn.render = await self.stages.animate.render(request, forward)
        turn.mp4.extend(mp4)


def render_request(
    avatar_id: str,
    pcm: bytes,
    sample_rate_hz: int,
    fps: int,
    background: bool = False,
    phonemes: Sequence[audio_pb2.PhonemeTiming] = (),
) -> animate_pb2.RenderRequest:
    """Render of a reply's audio (mono PCM_S16LE) for an avatar; `background`
    for renders nobody is waiting on (archive copies); `phonemes`, the
    synthesizer's timings of the audio, shape the lips."""
    return animate_pb2.RenderRequest(
        avatar_id=avatar_id,
        audio=pcm,
        format=pcm_s16le(sample_rate_hz),
        fps=fps,
        background=background,
        phonemes=phonemes,
    )
