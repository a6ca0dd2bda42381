"""One turn's reply, pipelined: chat text streams out as it is generated; each
complete sentence goes to speech synthesis while the next is still being
written; each audio chunk goes to animation as soon as it exists. Every piece
is sent to the client the moment it is made, through `emit`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.stages import VOICE_METADATA_KEY, Stage, Stages, pcm_s16le
from services.common.errors import InvalidInput, LimitExceeded
from services.common.text import OpeningClause
from talker.v1 import animate_pb2, audio_pb2, chat_pb2, synthesize_pb2, talker_pb2

Emit = Callable[[talker_pb2.ConverseEvent], Awaitable[None]]
AUDIO_MODES = (talker_pb2.REPLY_MODE_AUDIO, talker_pb2.REPLY_MODE_AUDIO_VIDEO)


@dataclass(frozen=True)
class ReplyOptions:
    """How a reply is made; checked before a turn starts."""

    mode: int
    voice_id: str
    avatar_id: str
    output_sample_rate_hz: int
    frame_encoding: int
    fps: int
    jpeg_quality: int
    sampling: chat_pb2.SamplingParams | None
    render_mp4: bool = False

    @property
    def speaks(self) -> bool:
        return self.mode in AUDIO_MODES or self.render_mp4

    @property
    def live_video(self) -> bool:
        return self.mode == talker_pb2.REPLY_MODE_AUDIO_VIDEO and not self.render_mp4


def checked_text(raw: str, max_chars: int, what: str) -> str:
    """A typed question, stripped; empty or too long is refused with a reason."""
    text = raw.strip()
    if not text:
        raise InvalidInput(f"{what} is empty: send what the user typed.")
    if len(text) > max_chars:
        raise LimitExceeded(f"{what} has {len(text)} characters; at most {max_chars} are accepted.")
    return text


@dataclass(frozen=True)
class CallContext:
    """What every turn of one call shares: who it is for and how it replies."""

    trace_id: str
    session_id: str
    user_id: str
    scene: str
    options: ReplyOptions


@dataclass
class Turn:
    """What one turn has produced so far (also what an interrupted turn reports)."""

    index: int
    started: float = field(default_factory=time.perf_counter)
    user_text: str = ""
    language: str = ""
    reply_parts: list[str] = field(default_factory=list)
    finished: chat_pb2.ReplyFinished | None = None
    audio: bytearray = field(default_factory=bytearray)
    audio_rate_hz: int = 0
    frames: int = 0
    mp4: bytearray = field(default_factory=bytearray)
    render: animate_pb2.RenderResult | None = None
    #: The reply's sounds with their timings on the turn's audio (for the lips of renders).
    phonemes: list[audio_pb2.PhonemeTiming] = field(default_factory=list)
    #: Set on a speculative turn: the name of its guess, so it can be taken back.
    speculation_id: str = ""
    #: A dropped guess the chat should take back first, if it reached the history.
    discard_speculation_id: str = ""
    #: When each milestone (a TurnTimings field name) was first reached (perf_counter).
    reached: dict[str, float] = field(default_factory=dict)
    #: When the reply pipeline began (perf_counter): before `started` for a guess.
    reply_started: float | None = None
    #: Voices that spoke the reply, as Synthesize named them (x-talker-voice).
    voices_used: list[str] = field(default_factory=list)

    def mark(self, milestone: str) -> None:
        """Records the first time a milestone is reached."""
        self.reached.setdefault(milestone, time.perf_counter())

    @property
    def timings(self) -> talker_pb2.TurnTimings:
        """ms from the start of the turn to each milestone. A speculative reply
        can reach one before its turn officially starts (the end of the
        utterance): those count as 1 ms, since 0 means "did not happen"."""
        return talker_pb2.TurnTimings(
            **{
                name: max(1, round((moment - self.started) * 1000))
                for name, moment in self.reached.items()
            }
        )

    def reply_timeline(self) -> dict[str, int]:
        """ms from the start of the reply pipeline to each milestone, and how far
        ahead of the turn's official start a speculative reply began: where the
        time of a turn goes, for the log."""
        if self.reply_started is None:
            return {}
        timeline = {
            name: round((moment - self.reply_started) * 1000)
            for name, moment in self.reached.items()
        }
        timeline["speculation_lead_ms"] = max(0, round((self.started - self.reply_started) * 1000))
        return timeline

    @property
    def reply_text(self) -> str:
        return self.finished.text if self.finished is not None else "".join(self.reply_parts)

    @property
    def audio_ms(self) -> int:
        return len(self.audio) // 2 * 1000 // self.audio_rate_hz if self.audio_rate_hz else 0

    def event(self, **kind: Any) -> talker_pb2.ConverseEvent:
        return talker_pb2.ConverseEvent(turn_index=self.index, **kind)


class HeldEmit:
    """The events of a speculative reply, held back until the guess is
    confirmed (the final transcript says what the speculation heard), then
    sent in order and from then on passed straight through."""

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self._held: list[talker_pb2.ConverseEvent] = []
        self.confirmed = asyncio.Event()

    async def __call__(self, event: talker_pb2.ConverseEvent) -> None:
        if self.confirmed.is_set():
            await self._emit(event)
        else:
            self._held.append(event)

    async def confirm(self, turn_index: int) -> None:
        for event in self._held:
            event.turn_index = turn_index
            await self._emit(event)
        self._held.clear()
        self.confirmed.set()


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
        await _all_or_none(work)
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


async def _all_or_none(work: Sequence[Awaitable[None]]) -> None:
    """Runs the stages side by side; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(item) for item in work]
    try:
        for finished in asyncio.as_completed(tasks):
            await finished
    finally:
        await cancel_and_wait(*tasks)


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancels the tasks and returns once they have all ended, however they end."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


_END = object()


async def stream_events(
    events: asyncio.Queue[Any], work: Coroutine[Any, Any, None]
) -> AsyncIterator[talker_pb2.ConverseEvent]:
    """Runs `work`, which puts events on `events`, and yields them as they come.
    What `work` raises is raised here, after the events put before it; leaving
    the loop early (the client went away) cancels `work`."""

    async def run() -> None:
        try:
            await work
        except Exception as error:
            events.put_nowait(error)
        finally:
            events.put_nowait(_END)

    task = asyncio.create_task(run())
    try:
        while (item := await events.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        await cancel_and_wait(task)
