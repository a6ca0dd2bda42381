"""The page's live conversation over WebRTC (aiortc): the browser's microphone
track goes into the gateway's `Converse` (this program is a TalkerService
client like any other, carrying the offer request's trace id and API key);
the reply comes back as WebRTC tracks (the avatar's face and voice, played out
in step by web/rtc_media.py) and the events as JSON on a data channel.

Routes:
    GET  /rtc/options   avatars (AnimateService) and voices (SynthesizeService) to pick from
    POST /rtc/avatars   a portrait (image bytes, or multipart field `portrait`) -> a new avatar
    POST /rtc/offer     {"sdp", "type": "offer", "avatar_id", "voice_id"?, "language"?}
                        -> {"sdp", "type": "answer", "session_id", "trace_id"}

Data channel messages, server to page (one JSON object each, `type` first):
    started {trace_id, session_id, max_session_s}   state {state: connecting | listening |
    thinking | speaking | error}   speech {event: started | ended | timeout}
    transcript {turn, text, final}   reply {turn, text}  (a delta of the reply text)
    audio {turn}  (the first sample of the turn's reply left for the page)
    finished {turn, user_text, reply_text, timings}   interrupted {turn}
    barge_in {turn}  (the page's speech cut the reply being played)
    error {message, stage?, fatal, retry_after_ms?}  (retry_after_ms: the page starts
    again by itself after that long, as when the program restarts)
Page to server: {"type": "text", "text": ...} (a typed turn), {"type": "bye"}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from aiohttp import web
from grpc import aio
from prometheus_client import Counter, Gauge

from services.common.ids import new_id
from talker.v1 import (
    animate_pb2,
    animate_pb2_grpc,
    asr_pb2,
    audio_pb2,
    synthesize_pb2,
    talker_pb2,
    talker_pb2_grpc,
)
from web.config import WebSettings
from web.errors import HttpError, from_grpc
from web.gateway_client import CHANNELS, REQUEST_TRACE_ID, SETTINGS, call_metadata
from web.rtc_media import (
    MIC_RATE_HZ,
    PLAYOUT_RATE_HZ,
    AvatarVideoTrack,
    MicResampler,
    Playout,
    ReplyAudioTrack,
)

log = logging.getLogger("talker.web.rtc")

RTC_SESSIONS = Gauge("talker_web_rtc_sessions", "Live browser (WebRTC) sessions.")
RTC_REFUSED = Counter(
    "talker_web_rtc_refused_total", "WebRTC offers refused, by reason.", ["reason"]
)

#: Microphone chunks waiting for the gateway; beyond it (the gateway far behind real
#: time) new audio is dropped rather than held in memory.
MIC_BACKLOG_CHUNKS = 500
#: When a page told of a restart starts again by itself: supervisord has the web
#: program SERVING again 1.4-2.1 s after a kill (`python -m bench chaos`).
RESTART_RETRY_MS = 2000
LANGUAGES = ("", "auto", "en", "zh")
STAGES = {
    talker_pb2.PIPELINE_STAGE_ASR: "speech recognition",
    talker_pb2.PIPELINE_STAGE_CHAT: "chat",
    talker_pb2.PIPELINE_STAGE_SYNTHESIZE: "speech synthesis",
    talker_pb2.PIPELINE_STAGE_ANIMATE: "animation",
    talker_pb2.PIPELINE_STAGE_GATEWAY: "gateway",
}
SESSIONS = web.AppKey("talker_rtc_sessions", dict)
TALKER = web.AppKey("talker_rtc_talker", object)


def animate(app: web.Application) -> animate_pb2_grpc.AnimateServiceStub:
    """AnimateService, for the avatar list, portrait uploads and the face at rest
    (the gateway has no RPC for them), on the program's shared channels."""
    return animate_pb2_grpc.AnimateServiceStub(app[CHANNELS].channel("animate"))


def avatar_json(avatar: animate_pb2.Avatar) -> dict[str, Any]:
    box = avatar.face_box
    return {
        "avatar_id": avatar.avatar_id,
        "name": avatar.display_name or avatar.avatar_id,
        "width": avatar.width,
        "height": avatar.height,
        "face_box": {"x": box.x, "y": box.y, "width": box.width, "height": box.height},
    }


async def options(request: web.Request) -> web.Response:
    settings: WebSettings = request.app[SETTINGS]
    try:
        avatars = await animate(request.app).ListAvatars(
            animate_pb2.ListAvatarsRequest(), timeout=settings.request_timeout_s
        )
    except aio.AioRpcError as error:
        raise from_grpc(error, "The animation service") from None
    try:
        voices = (
            await request.app[CHANNELS]
            .synthesize()
            .ListVoices(synthesize_pb2.ListVoicesRequest(), timeout=settings.request_timeout_s)
        )
    except aio.AioRpcError as error:
        raise from_grpc(error, "The speech synthesis service") from None
    return web.json_response(
        {
            "avatars": [avatar_json(avatar) for avatar in avatars.avatars],
            "voices": [
                {
                    "voice_id": voice.voice_id,
                    "name": voice.display_name or voice.voice_id,
                    "language": voice.language,
                }
                for voice in voices.voices
            ],
            "max_session_s": settings.max_session_s,
            "sessions": {"live": len(request.app[SESSIONS]), "max": settings.max_sessions},
        }
    )


async def create_avatar(request: web.Request) -> web.Response:
    settings: WebSettings = request.app[SETTINGS]
    name = ""
    if request.content_type.startswith("multipart/"):
        image = b""
        reader = await request.multipart()
        async for part in reader:
            if getattr(part, "name", None) == "portrait":
                image = await _read_part(part, settings.max_upload_bytes)
                name = (getattr(part, "filename", "") or "").rsplit(".", 1)[0]
            elif getattr(part, "name", None) == "name":
                name = (await part.text())[:64]  # type: ignore[union-attr]
    else:
        image = await request.read()
        name = request.query.get("name", "")[:64]
    if not image:
        raise HttpError(
            400,
            "No portrait came: send the image (PNG or JPEG) as the body, or as the "
            "multipart field `portrait`.",
        )
    try:
        response = await animate(request.app).CreateAvatar(
            animate_pb2.CreateAvatarRequest(image=image, display_name=name or "uploaded"),
            timeout=settings.request_timeout_s,
        )
    except aio.AioRpcError as error:
        raise from_grpc(error, "The animation service") from None
    return web.json_response(avatar_json(response.avatar), status=201)


async def _read_part(part: Any, limit: int) -> bytes:
    # aiohttp holds a whole body to client_max_size, but not a multipart part.
    data = bytearray()
    while chunk := await part.read_chunk():
        data += chunk
        if len(data) > limit:
            raise HttpError(
                413,
                f"The portrait is larger than the {limit} bytes this server accepts "
                "(TALKER_WEB_MAX_UPLOAD_BYTES).",
                "request_too_large",
            )
    return bytes(data)


def _field(body: dict[str, Any], name: str, required: bool = False) -> str:
    value = body.get(name, "")
    if not isinstance(value, str):
        raise HttpError(400, f"`{name}` must be a string.", "invalid_field")
    if required and not value:
        raise HttpError(400, f"`{name}` is required.", "missing_field")
    return value


async def offer(request: web.Request) -> web.Response:
    from aiortc import RTCSessionDescription

    settings: WebSettings = request.app[SETTINGS]
    try:
        body = await request.json()
    except ValueError:
        raise HttpError(
            400, "The offer must be a JSON object {sdp, type, avatar_id}.", "invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise HttpError(400, "The offer must be a JSON object {sdp, type, avatar_id}.")
    sdp = _field(body, "sdp", required=True)
    if _field(body, "type", required=True) != "offer":
        raise HttpError(400, '`type` must be "offer".', "invalid_field")
    avatar_id = _field(body, "avatar_id", required=True)
    voice_id = _field(body, "voice_id")
    language = _field(body, "language")
    if language not in LANGUAGES:
        raise HttpError(400, f"`language` must be one of {', '.join(LANGUAGES[1:])}.")
    try:
        avatar = (
            await animate(request.app).GetAvatar(
                animate_pb2.GetAvatarRequest(avatar_id=avatar_id),
                timeout=settings.request_timeout_s,
            )
        ).avatar
    except aio.AioRpcError as error:
        raise from_grpc(error, "The animation service") from None
    # Checked with no await before the session is counted: two offers cannot both
    # take the last place.
    sessions: dict[str, RtcSession] = request.app[SESSIONS]
    if len(sessions) >= settings.max_sessions:
        RTC_REFUSED.labels("busy").inc()
        raise HttpError(
            503,
            f"{len(sessions)} live sessions are already running, the most this server takes "
            f"(TALKER_WEB_MAX_SESSIONS={settings.max_sessions}). Try again when one ends.",
            "too_many_sessions",
        )
    trace_id = request[REQUEST_TRACE_ID]
    config = converse_config(avatar.avatar_id, voice_id, language, settings.max_session_s)
    talker: Any = request.app[TALKER]
    session = RtcSession(
        request.app,
        settings,
        talker(),
        call_metadata(request, trace_id),
        config,
        trace_id,
        (avatar.width or 512, avatar.height or 512),
    )
    sessions[session.session_id] = session
    RTC_SESSIONS.set(len(sessions))
    try:
        answer = await session.answer(RTCSessionDescription(sdp=sdp, type="offer"))
    except Exception as error:  # aiortc raises ValueError and friends on a bad SDP
        await session.close()
        RTC_REFUSED.labels("bad_sdp").inc()
        raise HttpError(400, f"The SDP offer could not be used: {error}", "invalid_sdp") from None
    return web.json_response(
        {
            "sdp": answer.sdp,
            "type": answer.type,
            "session_id": session.session_id,
            "trace_id": trace_id,
        }
    )


def converse_config(
    avatar_id: str, voice_id: str, language: str, max_session_s: float
) -> talker_pb2.ConverseConfig:
    """What a page's session asks of Converse (`bench web` asks the same directly)."""
    return talker_pb2.ConverseConfig(
        user_id="web",
        scene="web-page",
        mode=talker_pb2.REPLY_MODE_AUDIO_VIDEO,
        voice_id=voice_id,
        avatar_id=avatar_id,
        input_format=audio_pb2.AudioFormat(
            encoding=audio_pb2.AUDIO_ENCODING_PCM_S16LE, sample_rate_hz=MIC_RATE_HZ, channels=1
        ),
        output_sample_rate_hz=PLAYOUT_RATE_HZ,
        language=language,
        interim_results=True,
        # The session's own limit governs; ASR's default (15 s) would end a page left open.
        silence_timeout_s=min(3600, math.ceil(max_session_s)),
    )


class RtcSession:
    """One browser's live conversation: a peer connection and a Converse call."""

    def __init__(
        self,
        app: web.Application,
        settings: WebSettings,
        talker: talker_pb2_grpc.TalkerServiceStub,
        metadata: list[tuple[str, str]],
        config: talker_pb2.ConverseConfig,
        trace_id: str,
        size: tuple[int, int],
    ) -> None:
        from aiortc import RTCPeerConnection

        self.app = app
        self.settings = settings
        self.talker = talker
        self.metadata = metadata
        self.config = config
        self.trace_id = trace_id
        self.session_id = new_id()
        self.pc = RTCPeerConnection()
        self.playout = Playout(self._speaking_changed)
        self.audio_track = ReplyAudioTrack(self.playout)
        self.video_track = AvatarVideoTrack(self.playout, *size)
        self.mic: asyncio.Queue[bytes | str | None] = asyncio.Queue(MIC_BACKLOG_CHUNKS)
        self.channel: Any = None
        self.outbox: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False
        self.closing: asyncio.Future[None] | None = None
        self.state = "connecting"
        #: The turn whose reply is awaited (after its final transcript), if any.
        self.thinking_turn: int | None = None
        self.dropped_chunks = 0
        self.extra = {"trace_id": trace_id, "session_id": self.session_id}

        @self.pc.on("datachannel")
        def on_datachannel(channel: Any) -> None:
            self.channel = channel

            @channel.on("message")
            def on_message(message: Any) -> None:
                self._page_message(message)

            @channel.on("close")
            def on_close() -> None:
                self._close_soon("the page closed the data channel")

            if channel.readyState == "open":
                self._flush()
            else:
                channel.on("open", self._flush)

        @self.pc.on("track")
        def on_track(track: Any) -> None:
            if track.kind == "audio":
                self.tasks.append(asyncio.create_task(self._read_mic(track)))

        @self.pc.on("connectionstatechange")
        async def on_state() -> None:
            if self.pc.connectionState in ("failed", "closed"):
                self._close_soon(f"the connection is {self.pc.connectionState}")

    async def answer(self, description: Any) -> Any:
        await self.pc.setRemoteDescription(description)
        self.pc.addTrack(self.audio_track)
        self.pc.addTrack(self.video_track)
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)
        self.tasks.append(asyncio.create_task(self._run()))
        self.tasks.append(asyncio.create_task(self._fetch_idle_face()))
        log.info("webrtc session started", extra={**self.extra, "avatar_id": self.config.avatar_id})
        return self.pc.localDescription

    async def _fetch_idle_face(self) -> None:
        """The avatar at rest, shown until the first reply: its first frame for a
        moment of silence (AnimateService has no still of its portrait)."""

        async def requests() -> AsyncIterator[animate_pb2.AnimateRequest]:
            yield animate_pb2.AnimateRequest(
                config=animate_pb2.AnimateConfig(
                    avatar_id=self.config.avatar_id,
                    format=audio_pb2.AudioFormat(
                        encoding=audio_pb2.AUDIO_ENCODING_PCM_S16LE,
                        sample_rate_hz=MIC_RATE_HZ,
                        channels=1,
                    ),
                )
            )
            yield animate_pb2.AnimateRequest(audio=bytes(MIC_RATE_HZ // 5 * 2))

        try:
            call = animate(self.app).Animate(
                requests(), timeout=self.settings.request_timeout_s, metadata=self.metadata
            )
            async for response in call:
                if response.frame.image:
                    if self.playout.idle is None:
                        self.playout.idle = response.frame.image
                    call.cancel()
                    return
        except aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                log.warning(
                    "no idle face for the avatar",
                    extra={**self.extra, "error": error.details()},
                )

    # ---- page <-> server ---------------------------------------------------
    def send(self, kind: str, **fields: Any) -> None:
        message = json.dumps({"type": kind, **fields}, ensure_ascii=False)
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(message)
        else:
            self.outbox.append(message)

    def _flush(self) -> None:
        outbox, self.outbox = self.outbox, []
        for message in outbox:
            self.channel.send(message)

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.send("state", state=state)

    def _page_message(self, message: Any) -> None:
        try:
            parsed = json.loads(message)
            kind = parsed.get("type")
        except (ValueError, AttributeError):
            self.send("error", message="A data channel message was not a JSON object.", fatal=False)
            return
        if kind == "text":
            text = parsed.get("text")
            if not isinstance(text, str) or not text.strip():
                self.send("error", message="A typed turn needs some text.", fatal=False)
                return
            self.playout.stop()
            self._queue_mic(text.strip())
        elif kind == "bye":
            self._close_soon("the page said goodbye")
        else:
            self.send("error", message=f"Unknown message type {kind!r}.", fatal=False)

    # ---- microphone -> Converse -----------------------------------------------
    def _queue_mic(self, item: bytes | str) -> None:
        try:
            self.mic.put_nowait(item)
        except asyncio.QueueFull:
            self.dropped_chunks += 1
            if self.dropped_chunks == 1:
                log.warning("the gateway is behind: microphone audio dropped", extra=self.extra)

    async def _read_mic(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        resampler = MicResampler()
        # The first frame too: a page that vanished while connecting sends none.
        wait = self.settings.page_gone_after_s
        while True:
            try:
                frame = await asyncio.wait_for(track.recv(), wait)
            except MediaStreamError:
                return
            except TimeoutError:
                self._close_soon(f"the page sent no microphone audio for {wait:g} s: it is gone")
                return
            pcm = resampler.pcm(frame)
            if pcm:
                self._queue_mic(pcm)

    async def _requests(self) -> AsyncIterator[talker_pb2.ConverseRequest]:
        yield talker_pb2.ConverseRequest(config=self.config)
        while (item := await self.mic.get()) is not None:
            if isinstance(item, str):
                yield talker_pb2.ConverseRequest(text=item)
            else:
                yield talker_pb2.ConverseRequest(audio=item)

    async def _run(self) -> None:
        limit = self.settings.max_session_s
        try:
            async with asyncio.timeout(limit):
                call = self.talker.Converse(self._requests(), metadata=self.metadata)
                async for response in call:
                    self._on_event(response.event)
            self.send("error", message="The conversation ended.", fatal=True)
        except TimeoutError:
            self.send(
                "error",
                message=f"This session reached its limit of {limit:.0f} s "
                "(TALKER_WEB_MAX_SESSION_S). Press Talk to start a new one.",
                fatal=True,
            )
        except aio.AioRpcError as error:
            message = error.details() or f"The conversation failed ({error.code().name})."
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                message = f"The gateway is not reachable: {message}"
            log.warning("converse ended with an error", extra={**self.extra, "error": message})
            self.send("error", message=message, code=error.code().name, fatal=True)
        self._set_state("error")
        # Let the last messages reach the page before the connection goes.
        await asyncio.sleep(0.5)
        self._close_soon("the conversation ended")

    # ---- Converse -> page --------------------------------------------------
    def _on_event(self, event: talker_pb2.ConverseEvent) -> None:
        which = event.WhichOneof("event")
        turn = event.turn_index
        if which == "started":
            self.send(
                "started",
                trace_id=event.started.trace_id or self.trace_id,
                session_id=self.session_id,
                max_session_s=self.settings.max_session_s,
            )
            self._set_state("listening")
        elif which == "speech":
            kind = event.speech.type
            if kind == asr_pb2.SPEECH_EVENT_TYPE_SPEECH_STARTED:
                self.send("speech", event="started", turn=turn)
                if self.playout.speaking:
                    # Barge-in: what the page still had to hear of the reply goes now;
                    # the gateway cuts its own work (Converse's `interrupted`).
                    self.playout.stop()
                    self.send("barge_in", turn=self.playout.turn)
            elif kind == asr_pb2.SPEECH_EVENT_TYPE_END_OF_UTTERANCE:
                self.send("speech", event="ended", turn=turn)
            elif kind == asr_pb2.SPEECH_EVENT_TYPE_SILENCE_TIMEOUT:
                self.send("speech", event="timeout", turn=turn)
        elif which == "transcript":
            result = event.transcript
            self.send("transcript", turn=turn, text=result.text, final=result.is_final)
            if result.is_final and result.text.strip():
                self.thinking_turn = turn
                if not self.playout.speaking:
                    self._set_state("thinking")
        elif which == "reply_delta":
            self.send("reply", turn=turn, text=event.reply_delta.text)
        elif which == "reply_audio":
            chunk = event.reply_audio
            self.playout.add_audio(turn, chunk.offset_samples, chunk.audio)
        elif which == "video_frame":
            frame = event.video_frame
            self.playout.add_frame(turn, frame.timestamp_ms, frame.image)
        elif which == "turn_finished":
            done = event.turn_finished
            self.playout.finish_turn(turn)
            self.send(
                "finished",
                turn=turn,
                user_text=done.user_text,
                reply_text=done.reply_text,
                reply_audio_ms=done.reply_audio_ms,
                timings={
                    "asr_final_ms": done.timings.asr_final_ms,
                    "first_token_ms": done.timings.first_token_ms,
                    "first_audio_ms": done.timings.first_audio_ms,
                    "first_frame_ms": done.timings.first_frame_ms,
                    "total_ms": done.timings.total_ms,
                },
            )
            self._turn_over(turn)
        elif which == "interrupted":
            if self.playout.turn == turn:
                self.playout.stop()
            self.send("interrupted", turn=turn)
            self._turn_over(turn)
        elif which == "error":
            error = event.error
            stage = STAGES.get(error.stage, "")
            self.playout.finish_turn(turn)
            self.send("error", message=error.message, stage=stage, turn=turn, fatal=False)
            self._turn_over(turn)

    def _turn_over(self, turn: int) -> None:
        if self.thinking_turn is not None and self.thinking_turn <= turn:
            self.thinking_turn = None
        if not self.playout.speaking and self.state != "error":
            self._set_state("listening")

    def _speaking_changed(self, speaking: bool) -> None:
        if self.state == "error":
            return
        if speaking:
            if self.playout.turn is not None:
                self.send("audio", turn=self.playout.turn)
            if self.thinking_turn == self.playout.turn:
                self.thinking_turn = None
            self._set_state("speaking")
        else:
            self._set_state("thinking" if self.thinking_turn is not None else "listening")

    # ---- the end -------------------------------------------------------------
    def _close_soon(self, why: str) -> None:
        if not self.closed:
            log.info("webrtc session ending", extra={**self.extra, "why": why})
            self.closing = asyncio.ensure_future(self.close())

    async def close_for_restart(self) -> None:
        """The program is stopping: tells the page so (else it would wait, silent, for
        WebRTC's consent check to fail) and closes."""
        if self.closed:
            return
        self.send(
            "error",
            message="The server is restarting; the page will reconnect in a few seconds.",
            fatal=True,
            retry_after_ms=RESTART_RETRY_MS,
        )
        self._set_state("error")
        await asyncio.sleep(0.5)  # the page gets the message before the connection goes
        self._close_soon("the program is stopping")
        if self.closing is not None:
            await self.closing

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()
        for task in self.tasks:
            if task is not current:
                with contextlib.suppress(BaseException):
                    await task
        self.audio_track.stop()
        self.video_track.stop()
        await self.pc.close()
        sessions: dict[str, RtcSession] = self.app[SESSIONS]
        sessions.pop(self.session_id, None)
        RTC_SESSIONS.set(len(sessions))
        log.info(
            "webrtc session closed",
            extra={**self.extra, "reply_samples_sent": sum(self.playout.sent_samples.values())},
        )


def setup(
    app: web.Application,
    settings: WebSettings,
    talker: Callable[[], talker_pb2_grpc.TalkerServiceStub],
) -> None:
    """Adds the /rtc routes; live sessions are closed when the app shuts down."""
    app[TALKER] = talker
    # aioice logs every candidate pair's state at INFO: a dozen lines a session.
    logging.getLogger("aioice").setLevel(logging.WARNING)
    app[SESSIONS] = {}

    async def close_sessions(app: web.Application) -> None:
        await asyncio.gather(
            *(session.close_for_restart() for session in list(app[SESSIONS].values())),
            return_exceptions=True,
        )

    app.on_shutdown.append(close_sessions)
    app.router.add_get("/rtc/options", options)
    app.router.add_post("/rtc/avatars", create_avatar)
    app.router.add_post("/rtc/offer", offer)
