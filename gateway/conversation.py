"""A Converse call: device audio flows to ASR as it arrives; each final
transcript starts a turn; a new utterance (ASR's speech-started event) or a
typed turn cuts the turn in progress (barge-in) by cancelling its downstream
calls, which stops chat generation within a token."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from gateway.checks import checked_text
from gateway.config import GatewaySettings
from pipeline.runner import TurnRunner
from pipeline.turns import CallContext, HeldEmit, Turn
from services.common.audio import raw_layout
from services.common.errors import InvalidInput, LimitExceeded, TalkerError
from services.common.ids import new_id
from services.common.tasks import cancel_and_wait, stream_events
from talker.v1 import asr_pb2, chat_pb2, talker_pb2

log = logging.getLogger("talker.gateway.converse")

# Microphone audio waiting for ASR; a device far ahead of ASR is slowed down
# (gRPC flow control) instead of filling the gateway's memory.
AUDIO_BACKLOG_CHUNKS = 500


class Conversation:
    """One Converse call: hears the device's audio through streaming ASR, starts a
    turn per utterance (or typed text), guesses ahead on a pause (speculation), and
    stops a reply the user talks over (barge-in). The turns run in the pipeline."""

    def __init__(
        self,
        runner: TurnRunner,
        call: CallContext,
        config: talker_pb2.ConverseConfig,
        settings: GatewaySettings,
    ) -> None:
        self.runner = runner
        self.call = call
        self.speculate = settings.speculative_replies
        #: A reply started on ASR's speculative result, held back until the final confirms it.
        self.guess: tuple[Turn, asyncio.Task[None], HeldEmit] | None = None
        # A dropped guess may have reached the chat history; the next reply takes it back.
        self.take_back = ""
        self.stages = runner.stages
        self.config = config
        self.session_id = call.session_id
        self.trace_id = call.trace_id
        self.max_text_chars = settings.max_question_chars
        self.max_call_s = settings.converse_max_s
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.next_turn = 0
        self.current: tuple[Turn, asyncio.Task[None]] | None = None
        self.end_of_utterance_at: float | None = None
        self.layout = None
        self.asr_input: asyncio.Queue[bytes | None] | None = None
        if config.HasField("input_format") and config.input_format.encoding:
            fmt = config.input_format
            self.layout = raw_layout(fmt.encoding, fmt.sample_rate_hz, fmt.channels)
            self.asr_input = asyncio.Queue(AUDIO_BACKLOG_CHUNKS)

    async def emit(self, event: talker_pb2.ConverseEvent) -> None:
        self.events.put_nowait(event)

    async def run(self, requests: AsyncIterator[Any]) -> AsyncIterator[talker_pb2.ConverseEvent]:
        yield talker_pb2.ConverseEvent(
            started=talker_pb2.ConverseStarted(session_id=self.session_id, trace_id=self.trace_id)
        )
        try:
            async for event in stream_events(self.events, self._lifecycle(requests)):
                yield event
        finally:
            await self._cancel_turn()

    async def _lifecycle(self, requests: AsyncIterator[Any]) -> None:
        reader = asyncio.create_task(self._read(requests))
        hearing = asyncio.create_task(self._hear()) if self.asr_input is not None else None
        try:
            async with asyncio.timeout(self.max_call_s):
                waiting = {reader} | ({hearing} if hearing else set())
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if reader in done:
                    reader.result()  # a bad request ends the call
                    # Half-closed: ASR flushes what it heard; that may start a last turn.
                    if hearing is not None:
                        await self.asr_input.put(None)  # type: ignore[union-attr]
                        await hearing
                else:
                    assert hearing is not None
                    hearing.result()  # ASR failed, or its silence timeout ended the call
                    reader.cancel()
                if self.current is not None:
                    await asyncio.gather(self.current[1], return_exceptions=True)
        except TimeoutError:
            raise LimitExceeded(
                f"The conversation reached its limit of {self.max_call_s:.0f} s."
            ) from None
        finally:
            await cancel_and_wait(reader, hearing)

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        async for message in requests:
            which = message.WhichOneof("request")
            if which == "audio":
                if self.asr_input is None or self.layout is None:
                    raise InvalidInput(
                        "Audio arrived but the config has no input_format: set its encoding "
                        "(PCM_S16LE or PCM_F32LE) and sample_rate_hz."
                    )
                if len(message.audio) % self.layout.bytes_per_frame:
                    raise InvalidInput(
                        f"An audio chunk has {len(message.audio)} bytes, not a whole number "
                        f"of {self.layout.bytes_per_frame}-byte frames of the input_format."
                    )
                await self.asr_input.put(message.audio)
            elif which == "text":
                text = checked_text(message.text, self.max_text_chars, "A text turn")
                await self.start_turn(text, time.perf_counter())
            elif which == "config":
                raise InvalidInput("config may be sent only once, as the first message.")
            else:
                raise InvalidInput("A message carried nothing: send audio or text.")

    async def _hear(self) -> None:
        assert self.asr_input is not None
        config = self.config
        asr_input = self.asr_input
        language = "" if config.language in ("", "auto") else config.language

        async def requests() -> AsyncIterator[asr_pb2.StreamingRecognizeRequest]:
            yield asr_pb2.StreamingRecognizeRequest(
                config=asr_pb2.StreamingRecognitionConfig(
                    format=config.input_format,
                    config=asr_pb2.RecognitionConfig(language=language),
                    interim_results=config.interim_results,
                    end_of_utterance_silence_ms=config.end_of_utterance_silence_ms,
                    silence_timeout_s=config.silence_timeout_s,
                    speculative_results=self.speculate,
                )
            )
            while (chunk := await asr_input.get()) is not None:
                yield asr_pb2.StreamingRecognizeRequest(audio=chunk)

        async for response in self.stages.asr.streaming_recognize(requests(), self.max_call_s):
            if response.WhichOneof("response") == "event":
                kind = response.event.type
                if kind == asr_pb2.SPEECH_EVENT_TYPE_SPEECH_STARTED:
                    await self.interrupt()  # barge-in: the user talks over the reply
                elif kind == asr_pb2.SPEECH_EVENT_TYPE_END_OF_UTTERANCE:
                    self.end_of_utterance_at = time.perf_counter()
                await self.emit(
                    talker_pb2.ConverseEvent(turn_index=self.next_turn, speech=response.event)
                )
                continue
            result = response.result
            text = result.text.strip()
            if not result.is_final:
                if config.interim_results:
                    await self.emit(
                        talker_pb2.ConverseEvent(turn_index=self.next_turn, transcript=result)
                    )
                if result.speculative and text and self.speculate:
                    await self._guess(text, result.language)
                continue
            await self.emit(talker_pb2.ConverseEvent(turn_index=self.next_turn, transcript=result))
            started = self.end_of_utterance_at or time.perf_counter()
            self.end_of_utterance_at = None
            if self.guess is not None and text and self.guess[0].user_text == text:
                await self._confirm_guess(started)
            elif text:
                await self.start_turn(text, started, result.language, heard=True)
            else:
                await self._drop_guess()

    async def start_turn(
        self, text: str, started: float, language: str = "", heard: bool = False
    ) -> None:
        await self._drop_guess()
        await self.interrupt()
        turn = Turn(
            index=self.next_turn,
            started=started,
            user_text=text,
            language=language,
            discard_speculation_id=self._take_back(),
        )
        if heard:
            turn.mark("asr_final_ms")
        self.next_turn += 1
        self.current = (turn, asyncio.create_task(self.runner.run(turn, self.call, self.emit)))

    async def _guess(self, text: str, language: str) -> None:
        """Starts replying to what ASR heard when the pause began; nothing of it
        reaches the client (or the chat history, or the archive) unless the final
        transcript confirms it."""
        if self.guess is not None and self.guess[0].user_text == text:
            return
        await self._drop_guess()
        turn = Turn(
            index=self.next_turn,
            user_text=text,
            language=language,
            speculation_id=new_id(),
            discard_speculation_id=self._take_back(),
        )
        held = HeldEmit(self.emit)
        self.guess = (turn, asyncio.create_task(self.runner.run(turn, self.call, held)), held)
        log.info("speculative reply started", extra={"heard": text[:80]})

    async def _confirm_guess(self, started: float) -> None:
        assert self.guess is not None
        turn, task, held = self.guess
        self.guess = None
        await self.interrupt()
        turn.index = self.next_turn
        turn.started = started
        turn.mark("asr_final_ms")
        self.next_turn += 1
        self.current = (turn, task)
        log.info("speculative reply confirmed", extra={"turn_index": turn.index})
        await held.confirm(turn.index)

    def _take_back(self) -> str:
        take_back, self.take_back = self.take_back, ""
        return take_back

    async def _drop_guess(self) -> None:
        if self.guess is not None:
            turn, task, _ = self.guess
            self.guess = None
            await cancel_and_wait(task)
            self.take_back = turn.speculation_id
            log.info("speculative reply dropped", extra={"heard": turn.user_text[:80]})

    async def interrupt(self) -> None:
        """Cuts the reply in progress, if any, and reports what was sent of it."""
        if self.current is None:
            return
        turn, task = self.current
        self.current = None
        if task.done():
            return
        await cancel_and_wait(task)
        log.info(
            "reply interrupted",
            extra={"turn_index": turn.index, "audio_sent_ms": turn.audio_ms},
        )
        await self.emit(
            turn.event(
                interrupted=talker_pb2.TurnInterrupted(
                    audio_sent_ms=turn.audio_ms, text_sent=turn.reply_text
                )
            )
        )
        await self.runner.interrupted(turn, self.call)

    async def _cancel_turn(self) -> None:
        await self._drop_guess()
        if self.current is not None:
            await cancel_and_wait(self.current[1])
        if self.take_back:
            # No next message will carry the take-back: the call is over.
            await self._take_back_now(self._take_back())

    async def _take_back_now(self, speculation_id: str) -> None:
        request = chat_pb2.DiscardSpeculationRequest(
            session_id=self.session_id, speculation_id=speculation_id
        )
        try:
            await self.stages.chat.discard_speculation(request)
        except TalkerError as error:  # chat is down: its history went with it
            log.warning("could not take a guess back", extra={"error": str(error)})
