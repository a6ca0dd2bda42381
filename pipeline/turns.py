"""What a turn is: the options its reply is made with, the call it belongs to,
what it has produced so far and when (`Turn`), and where its events go."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from talker.v1 import animate_pb2, audio_pb2, chat_pb2, talker_pb2

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
