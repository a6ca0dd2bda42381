"""ChatService: validation, sessions and streaming around the chat model."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from services.chat.config import ChatSettings
from services.chat.engine import ChatEngine, GenerationParams, GenerationRun, Prompt, build_engine
from services.chat.guard import Guard
from services.chat.sessions import Message, Session, SessionStore
from services.common.bridge import ThreadStream
from services.common.errors import InvalidInput, LimitExceeded, NotFound
from services.common.ids import check_id
from services.common.runtime import GrpcProgram, run_program
from services.common.text import SentenceSplitter
from services.common.work_queue import WorkQueue
from talker.v1 import chat_pb2, chat_pb2_grpc

log = logging.getLogger("talker.chat")

MIN_REPLY_TOKENS = 16
FINISH_REASONS = {
    "stop": chat_pb2.FINISH_REASON_STOP,
    "length": chat_pb2.FINISH_REASON_LENGTH,
    "cancelled": chat_pb2.FINISH_REASON_CANCELLED,
}


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, model: ChatEngine, settings: ChatSettings) -> None:
        self.model = model
        self.settings = settings
        self.guard = Guard.from_settings(settings)
        self.sessions = SessionStore(settings.max_sessions, settings.session_ttl_s)
        self.queue = WorkQueue("chat", workers=1, max_waiting=settings.max_waiting)

    # ---- Chat ---------------------------------------------------------------
    async def Chat(
        self, request: chat_pb2.ChatRequest, context: aio.ServicerContext
    ) -> AsyncIterator[chat_pb2.ChatResponse]:
        received = time.perf_counter()
        turn = self._turn(request)
        matched = await asyncio.to_thread(self.guard.check, turn.text)  # ~15 ms off the loop
        if matched is not None:
            log.warning(
                "guard refused a message",
                extra={"session_id": turn.session_id, "pattern": matched, "chars": len(turn.text)},
            )
            if turn.discard:
                await self._discard(turn.session_id, turn.discard)
            for response in self._refusal(received, matched.text):
                yield response
            return
        session = self.sessions.get_or_create(turn.session_id, turn.user_id)
        async with session.busy, self.queue.slot():
            async for response in self._reply(session, turn, received):
                yield response

    def _turn(self, request: chat_pb2.ChatRequest) -> Turn:
        """The request, checked."""
        session_id = check_id(request.session_id, "session_id")
        user_id = check_id(request.user_id, "user_id", allow_empty=True)
        text = request.text.strip()
        if not text:
            raise InvalidInput("text is empty: send what the user said.")
        if len(text) > self.settings.max_input_chars:
            raise LimitExceeded(
                f"text has {len(text)} characters; at most {self.settings.max_input_chars} "
                "are accepted."
            )
        return Turn(
            session_id=session_id,
            user_id=user_id,
            text=text,
            params=self._params(request.sampling),
            discard=check_id(
                request.discard_speculation_id, "discard_speculation_id", allow_empty=True
            ),
            speculation_id=check_id(request.speculation_id, "speculation_id")
            if request.speculative
            else "",
        )

    async def _reply(
        self, session: Session, turn: Turn, received: float
    ) -> AsyncIterator[chat_pb2.ChatResponse]:
        """The model's reply as deltas and sentences, then the usage; the exchange
        is stored in the session whatever happens (a barge-in keeps what was said)."""
        if turn.discard and session.discard_speculative(turn.discard):
            log.info("speculative exchange taken back", extra={"session_id": turn.session_id})
        prompt, kept, max_new = self._prompt(session, turn.text, turn.params.max_new_tokens)
        params = dataclasses.replace(turn.params, max_new_tokens=max_new)
        run = GenerationRun(prompt_tokens=prompt.tokens)
        splitter = SentenceSplitter()
        sentences = itertools.count()

        def generate(stop: threading.Event) -> Iterator[str]:
            return self.model.generate(prompt, params, stop, run, session_key=turn.session_id)

        try:
            # Leaving early (the caller went away, or barged in) stops the model within
            # a token, and keeps the slot until the model is really idle again.
            async with ThreadStream(generate) as deltas:
                async for delta in deltas:
                    yield chat_pb2.ChatResponse(delta=chat_pb2.ReplyDelta(text=delta))
                    for sentence in splitter.feed(delta):
                        yield _sentence(next(sentences), sentence)
            for sentence in splitter.flush():
                yield _sentence(next(sentences), sentence)
        finally:
            self._remember(session, turn, run.text.strip())
        log.info(
            "reply finished",
            extra={
                "session_id": turn.session_id,
                "finish_reason": run.finish_reason,
                "prompt_tokens": run.prompt_tokens,
                "completion_tokens": run.completion_tokens,
            },
        )
        yield chat_pb2.ChatResponse(finished=_finished(run, kept, session, received))

    def _remember(self, session: Session, turn: Turn, reply: str) -> None:
        session.add_exchange(
            Message("user", turn.text, self.model.count_tokens(turn.text)),
            Message("assistant", reply, self.model.count_tokens(reply)),
            self.settings.max_turns,
            speculation_id=turn.speculation_id,
        )

    def _params(self, sampling: chat_pb2.SamplingParams) -> GenerationParams:
        settings = self.settings
        temperature = sampling.temperature or settings.temperature
        top_p = sampling.top_p or settings.top_p
        if not (math.isfinite(temperature) and 0 < temperature <= 2):
            raise InvalidInput(
                f"temperature is {sampling.temperature}; it must be above 0 and at most 2 "
                "(0 uses the server default; set greedy for deterministic replies)."
            )
        if not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise InvalidInput(f"top_p is {sampling.top_p}; it must be above 0 and at most 1.")
        if sampling.max_new_tokens > settings.max_new_tokens:
            raise InvalidInput(
                f"max_new_tokens is {sampling.max_new_tokens}; this server generates at most "
                f"{settings.max_new_tokens} tokens a reply."
            )
        return GenerationParams(
            max_new_tokens=sampling.max_new_tokens or settings.max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            greedy=sampling.greedy,
            repetition_penalty=settings.repetition_penalty,
        )

    def _prompt(self, session: Session, text: str, max_new: int) -> tuple[Prompt, int, int]:
        """The prompt within the token budget; returns (ids, history messages kept,
        reply tokens allowed).

        The history in the prompt starts at a message that stays put from turn to
        turn, so each prompt extends the last one and the model reuses its cached
        keys and values (only the new message is prefilled). Dropping one old
        exchange per turn would change the prompt right after the system prompt
        and re-read the whole history every turn (~150 ms here, at 5 exchanges).
        So when the start has to move, it jumps: to the last half of max_turns (or
        3/4 of the budget), and the history grows again from there."""
        budget = self.settings.token_budget
        stored = session.messages[-2 * self.settings.max_turns :]
        start = next((i for i, m in enumerate(stored) if m is session.prompt_start), None)
        if start is None and session.prompt_start is not None:
            start = max(0, len(stored) - 2 * math.ceil(self.settings.max_turns / 2))
        history = stored[start or 0 :]
        limit = budget
        while True:
            prompt = self.model.prompt(self._messages(history, text))
            size = prompt.tokens
            if size + max_new <= limit or (not history and size + max_new <= budget):
                session.prompt_start = history[0] if history else None
                return prompt, len(history), max_new
            if history:
                history = history[2:]
                limit = budget - budget // 4
                continue
            room = budget - size
            if room < MIN_REPLY_TOKENS:
                raise LimitExceeded(
                    f"The text takes {size} tokens with the system prompt, leaving no room "
                    f"for a reply within the {budget}-token budget; send a shorter text."
                )
            session.prompt_start = None
            return prompt, 0, room

    def _messages(self, history: list[Message], text: str) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.settings.system_prompt_for(text)},
            *({"role": m.role, "content": m.text} for m in history),
            {"role": "user", "content": text},
        ]

    def _refusal(self, received: float, refusal: str) -> list[chat_pb2.ChatResponse]:
        return [
            chat_pb2.ChatResponse(delta=chat_pb2.ReplyDelta(text=refusal)),
            _sentence(0, refusal),
            chat_pb2.ChatResponse(
                finished=chat_pb2.ReplyFinished(
                    finish_reason=chat_pb2.FINISH_REASON_REFUSED,
                    text=refusal,
                    usage=chat_pb2.ChatUsage(duration_ms=_ms(time.perf_counter() - received)),
                )
            ),
        ]

    # ---- sessions -------------------------------------------------------------
    async def ResetSession(
        self, request: chat_pb2.ResetSessionRequest, context: aio.ServicerContext
    ) -> chat_pb2.ResetSessionResponse:
        session_id = check_id(request.session_id, "session_id")
        existed, removed = self.sessions.reset(session_id)
        self.model.forget(session_id)
        return chat_pb2.ResetSessionResponse(existed=existed, turns_removed=removed)

    async def DiscardSpeculation(
        self, request: chat_pb2.DiscardSpeculationRequest, context: aio.ServicerContext
    ) -> chat_pb2.DiscardSpeculationResponse:
        session_id = check_id(request.session_id, "session_id")
        speculation_id = check_id(request.speculation_id, "speculation_id")
        discarded = await self._discard(session_id, speculation_id)
        return chat_pb2.DiscardSpeculationResponse(discarded=discarded)

    async def _discard(self, session_id: str, speculation_id: str) -> bool:
        """Takes a guess's exchange back outside a Chat call; an unknown session has none."""
        session = self.sessions.get(session_id)
        if session is None:
            return False
        # After the guess's own call has stored its exchange (it holds the lock till then).
        async with session.busy:
            discarded = session.discard_speculative(speculation_id)
        if discarded:
            log.info("speculative exchange taken back", extra={"session_id": session_id})
        return discarded

    async def GetSession(
        self, request: chat_pb2.GetSessionRequest, context: aio.ServicerContext
    ) -> chat_pb2.GetSessionResponse:
        session_id = check_id(request.session_id, "session_id")
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFound(f"No session {session_id!r}: it never existed, was reset, or expired.")
        return chat_pb2.GetSessionResponse(
            session=chat_pb2.Session(
                session_id=session.session_id,
                user_id=session.user_id,
                turns=[
                    chat_pb2.Turn(
                        role=chat_pb2.TURN_ROLE_USER
                        if m.role == "user"
                        else chat_pb2.TURN_ROLE_ASSISTANT,
                        text=m.text,
                        token_count=m.token_count,
                        create_time=_timestamp(m.created),
                    )
                    for m in session.messages
                ],
                token_count=session.token_count,
                create_time=_timestamp(session.created),
                update_time=_timestamp(session.updated),
            )
        )


@dataclass(frozen=True)
class Turn:
    """A checked Chat request."""

    session_id: str
    user_id: str
    text: str
    params: GenerationParams
    discard: str  # a speculative exchange to take back first
    speculation_id: str  # set: this exchange is a guess that may be taken back


def _finished(
    run: GenerationRun, kept: int, session: Session, received: float
) -> chat_pb2.ReplyFinished:
    return chat_pb2.ReplyFinished(
        finish_reason=FINISH_REASONS[run.finish_reason],
        text=run.text.strip(),
        usage=chat_pb2.ChatUsage(
            prompt_tokens=run.prompt_tokens,
            completion_tokens=run.completion_tokens,
            turns_kept=kept,
            session_turns=len(session.messages),
            first_token_ms=_ms(run.first_token_s) if run.first_token_s else 0,
            cached_prompt_tokens=run.reused_tokens,
            duration_ms=_ms(time.perf_counter() - received),
        ),
    )


def _sentence(index: int, text: str) -> chat_pb2.ChatResponse:
    return chat_pb2.ChatResponse(sentence=chat_pb2.ReplySentence(sentence_index=index, text=text))


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _timestamp(epoch_s: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(epoch_s * 1e9))
    return stamp


def build_program(settings: ChatSettings) -> GrpcProgram:
    model = build_engine(settings)
    servicer = ChatServicer(model, settings)
    program = GrpcProgram(
        settings,
        [chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name],
        lambda server: chat_pb2_grpc.add_ChatServiceServicer_to_server(servicer, server),
        model.load,
        model,
    )
    servicer.queue.on_saturation = program.set_overloaded
    # SERVING means a message is answered at once. On a first start the guard's
    # examples are embedded (not yet cached; ~10 s on a 2-core Intel Xeon, on both
    # cores), and a program that said SERVING before that held its first turn ~9 s.
    program.after_load = servicer.guard.wait_loaded
    return program


def main(argv: list[str] | None = None) -> None:
    run_program(ChatSettings, build_program, argv)


if __name__ == "__main__":
    main()
