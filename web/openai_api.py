"""OpenAI-compatible HTTP endpoints, for the tools that already speak that API:

- `POST /v1/audio/transcriptions` -> AsrService.Recognize
- `POST /v1/audio/speech`         -> SynthesizeService.Synthesize
- `POST /v1/chat/completions`     -> ChatService.Chat (SSE when `stream` is true)
- `GET  /v1/models`

They call the stages directly, not the gateway: the gateway's RPCs are whole
turns (a question in, a spoken and animated reply out), while each of these is
one stage on its own. The stages' addresses are settings (`TALKER_WEB_ASR_ADDRESS`
...), by default each program's own, as for the gateway.

`model` is required (as by OpenAI) but any name is taken: one model serves each
stage. OpenAI's voice names (alloy, nova...) speak in the default voice; any
other `voice` is a talker voice id (SynthesizeService.ListVoices). Chat history:
OpenAI clients resend the whole conversation; each request gets a fresh chat
session holding it, unless the body carries talker's `session_id` (the server
keeps that session's history; send only the new message)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
from aiohttp import web
from aiohttp.web_request import FileField

from services.common.audio import wav_bytes
from services.common.ids import VALID_ID, new_id
from services.common.interceptors import MODEL_METADATA_KEY
from talker.v1 import asr_pb2, audio_pb2, chat_pb2, synthesize_pb2
from web.errors import HttpError, from_grpc
from web.gateway_client import CHANNELS, REQUEST_TRACE_ID, SETTINGS, call_metadata

log = logging.getLogger("talker.web.openai")

OPENAI_VOICES = frozenset(
    ["alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse"]
)
TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
SPEECH_FORMATS = {
    # name: (content type, PyAV container, codec); None: written here without PyAV.
    "wav": ("audio/wav", None, None),
    "pcm": ("audio/pcm", None, None),
    "mp3": ("audio/mpeg", "mp3", "libmp3lame"),
    "opus": ("audio/ogg", "ogg", "libopus"),
    "aac": ("audio/aac", "adts", "aac"),
    "flac": ("audio/flac", "flac", "flac"),
}
# OpenAI's `pcm` is 24 kHz mono s16le, without a header.
PCM_RATE_HZ = 24000
FINISH_REASONS = {
    chat_pb2.FINISH_REASON_STOP: "stop",
    chat_pb2.FINISH_REASON_LENGTH: "length",
    chat_pb2.FINISH_REASON_CANCELLED: "stop",
    chat_pb2.FINISH_REASON_REFUSED: "content_filter",
}
MODELS = ("whisper-1", "tts-1", "talker-chat")
# Container signatures ASR reads itself; anything else is decoded here first.
CONTAINERS = {
    b"RIFF": audio_pb2.AUDIO_ENCODING_WAV,
    b"fLaC": audio_pb2.AUDIO_ENCODING_FLAC,
    b"OggS": audio_pb2.AUDIO_ENCODING_OGG,
}
ASR_RATE_HZ = 16000


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/audio/transcriptions", transcriptions)
    app.router.add_post("/v1/audio/speech", speech)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)


# ---- request reading --------------------------------------------------------------
async def json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise HttpError(400, "The request body is not valid JSON.", "invalid_json") from None
    if not isinstance(body, dict):
        raise HttpError(400, "The request body must be a JSON object.", "invalid_json")
    return body


def field(
    body: dict[str, Any],
    name: str,
    kind: type | tuple[type, ...],
    required: bool = False,
    default: Any = None,
) -> Any:
    """body[name] checked to be of `kind` (bool is not a number here)."""
    if name not in body or body[name] is None:
        if required:
            raise HttpError(400, f"`{name}` is required.", "missing_field", name)
        return default
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    wrong_bool = isinstance(value, bool) and bool not in kinds
    if wrong_bool or not isinstance(value, kinds):
        names = " or ".join(k.__name__.replace("str", "string") for k in kinds)
        raise HttpError(
            400, f"`{name}` must be a {names}, not {json.dumps(value)[:60]}.", "invalid_type", name
        )
    return value


def number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = field(body, name, (int, float))
    if value is not None and not low <= value <= high:
        raise HttpError(
            400, f"`{name}` is {value}; use {low:g} to {high:g}.", "invalid_value", name
        )
    return None if value is None else float(value)


def grpc_call_options(request: web.Request) -> dict[str, Any]:
    return {
        "metadata": call_metadata(request, request[REQUEST_TRACE_ID]),
        "timeout": request.app[SETTINGS].request_timeout_s,
    }


# ---- transcriptions ---------------------------------------------------------------
async def transcriptions(request: web.Request) -> web.StreamResponse:
    if not request.content_type.startswith("multipart/form-data"):
        raise HttpError(
            400,
            "Send the audio as multipart/form-data with a `file` part (and `model`).",
            "invalid_content_type",
        )
    form = await request.post()
    upload = form.get("file")
    if not isinstance(upload, FileField):
        raise HttpError(
            400, "`file` is required: the audio file to transcribe.", "missing_field", "file"
        )
    audio = upload.file.read()
    if not audio:
        raise HttpError(400, "The uploaded file is empty.", "empty_file", "file")
    if not str(form.get("model", "")).strip():
        raise HttpError(
            400, "`model` is required (any name, e.g. whisper-1).", "missing_field", "model"
        )
    response_format = str(form.get("response_format", "json"))
    if response_format not in TRANSCRIPTION_FORMATS:
        raise HttpError(
            400,
            f"response_format {response_format[:40]!r} is not supported; use "
            f"{', '.join(TRANSCRIPTION_FORMATS)}.",
            "invalid_value",
            "response_format",
        )
    language = str(form.get("language", "")).strip()
    if language and not (language.isalpha() and 2 <= len(language) <= 3):
        raise HttpError(
            400, f"language {language[:20]!r} is not an ISO 639-1 code such as en or zh.",
            "invalid_value", "language",
        )  # fmt: skip
    granularities = {
        str(value) for name in ("timestamp_granularities[]", "timestamp_granularities")
        for value in form.getall(name, [])
    }  # fmt: skip
    if granularities - {"word", "segment"}:
        raise HttpError(
            400, "timestamp_granularities may hold only `word` and `segment`.",
            "invalid_value", "timestamp_granularities",
        )  # fmt: skip
    if granularities and response_format != "verbose_json":
        raise HttpError(
            400, "timestamp_granularities needs response_format verbose_json.",
            "invalid_value", "timestamp_granularities",
        )  # fmt: skip
    words = "word" in granularities
    encoding, sample_rate_hz, audio = await asyncio.to_thread(asr_input, audio, upload.filename)
    recognized = (
        request.app[CHANNELS]
        .asr()
        .Recognize(
            asr_pb2.RecognizeRequest(
                format=audio_pb2.AudioFormat(
                    encoding=encoding,
                    sample_rate_hz=sample_rate_hz,
                    channels=1 if sample_rate_hz else 0,
                ),
                audio=audio,
                config=asr_pb2.RecognitionConfig(
                    language=language,
                    initial_prompt=str(form.get("prompt", ""))[:1000],
                    word_timestamps=words,
                ),
            ),
            **grpc_call_options(request),
        )
    )
    try:
        result = await recognized
    except grpc.aio.AioRpcError as error:
        raise from_grpc(error, "Speech recognition (asr)") from None
    return transcription_response(result, response_format, words)


def asr_input(data: bytes, filename: str) -> tuple[int, int, bytes]:
    """(encoding, sample rate, bytes) ASR takes: WAV/FLAC/OGG as they are; anything
    else PyAV can read (mp3, m4a, webm...) as 16 kHz mono PCM."""
    encoding = CONTAINERS.get(data[:4])
    if encoding is not None:
        return encoding, 0, data
    import av  # heavy: only for uploads ASR cannot read itself

    try:
        with av.open(io.BytesIO(data), "r") as container:
            if not container.streams.audio:
                raise HttpError(
                    400, f"{filename or 'The file'} has no audio track.", "invalid_audio", "file"
                )
            resampler = av.AudioResampler(format="s16", layout="mono", rate=ASR_RATE_HZ)
            pieces = []
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    pieces.append(out.to_ndarray().tobytes())
            for out in resampler.resample(None):
                pieces.append(out.to_ndarray().tobytes())
    except av.error.FFmpegError as error:
        raise HttpError(
            400,
            f"{filename or 'The file'} could not be read as audio ({error.strerror or error}). "
            "Send WAV, FLAC, OGG, MP3, M4A or WebM.",
            "invalid_audio",
            "file",
        ) from None
    pcm = b"".join(pieces)
    if not pcm:
        raise HttpError(
            400, f"{filename or 'The file'} holds no audio samples.", "invalid_audio", "file"
        )
    return audio_pb2.AUDIO_ENCODING_PCM_S16LE, ASR_RATE_HZ, pcm


def transcription_response(
    result: asr_pb2.RecognizeResponse, response_format: str, words: bool = False
) -> web.Response:
    text = result.text.strip()
    if response_format == "text":
        return web.Response(text=text + "\n", content_type="text/plain")
    if response_format in ("srt", "vtt"):
        return web.Response(text=subtitles(result, response_format), content_type="text/plain")
    if response_format == "json":
        return web.json_response({"text": text})
    extra: dict[str, Any] = {}
    if words:
        extra["words"] = [
            {"word": word.text.strip(), "start": word.start_ms / 1000, "end": word.end_ms / 1000}
            for segment in result.segments
            for word in segment.words
        ]
    return web.json_response(
        {
            **extra,
            "task": "transcribe",
            "language": result.language,
            "duration": result.audio_duration_ms / 1000,
            "text": text,
            "segments": [
                {
                    "id": index,
                    "seek": 0,
                    "start": segment.start_ms / 1000,
                    "end": segment.end_ms / 1000,
                    "text": segment.text,
                    "tokens": [],
                    "temperature": 0.0,
                    "avg_logprob": segment.avg_logprob,
                    "compression_ratio": 0.0,
                    "no_speech_prob": segment.no_speech_probability,
                }
                for index, segment in enumerate(result.segments)
            ],
        }
    )


def subtitles(result: asr_pb2.RecognizeResponse, kind: str) -> str:
    def stamp(ms: int) -> str:
        hours, rest = divmod(ms, 3_600_000)
        minutes, rest = divmod(rest, 60_000)
        seconds, millis = divmod(rest, 1000)
        sep = "," if kind == "srt" else "."
        return f"{hours:02d}:{minutes:02d}:{seconds:02d}{sep}{millis:03d}"

    cues = [
        f"{stamp(s.start_ms)} --> {stamp(s.end_ms)}\n{s.text.strip()}\n" for s in result.segments
    ]
    if kind == "srt":
        return "\n".join(f"{n}\n{cue}" for n, cue in enumerate(cues, 1))
    return "WEBVTT\n\n" + "\n".join(cues)


# ---- speech -----------------------------------------------------------------------
async def speech(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    field(body, "model", str, required=True)
    text = field(body, "input", str, required=True).strip()
    if not text:
        raise HttpError(400, "`input` is empty: send the text to speak.", "invalid_value", "input")
    voice = field(body, "voice", str, default="")
    if voice in OPENAI_VOICES:
        voice = ""  # OpenAI's names: the default voice
    elif voice and not VALID_ID.match(voice):
        raise HttpError(
            400, f"voice {voice[:80]!r} is not a voice id (ListVoices names them).",
            "invalid_value", "voice",
        )  # fmt: skip
    response_format = field(body, "response_format", str, default="mp3")
    if response_format not in SPEECH_FORMATS:
        raise HttpError(
            400,
            f"response_format {response_format[:40]!r} is not supported; use "
            f"{', '.join(SPEECH_FORMATS)}.",
            "invalid_value",
            "response_format",
        )
    speed = number(body, "speed", 0.25, 4.0)
    if speed is not None and not 0.5 <= speed <= 2.0:
        raise HttpError(
            400, f"speed is {speed:g}; this server speaks from 0.5 to 2.0 times normal speed.",
            "invalid_value", "speed",
        )  # fmt: skip
    rate_hz = PCM_RATE_HZ if response_format == "pcm" else 0
    call = (
        request.app[CHANNELS]
        .synthesize()
        .Synthesize(
            synthesize_pb2.SynthesizeRequest(
                text=text,
                voice_id=voice,
                output_format=audio_pb2.AudioFormat(
                    encoding=audio_pb2.AUDIO_ENCODING_PCM_S16LE, sample_rate_hz=rate_hz, channels=1
                ),
                speaking_rate=speed or 0.0,
            ),
            **grpc_call_options(request),
        )
    )
    content_type, container, codec = SPEECH_FORMATS[response_format]
    if response_format == "pcm":
        return await _stream_pcm(request, call, content_type)
    pcm = bytearray()
    try:
        async for message in call:
            if message.HasField("chunk"):
                pcm += message.chunk.audio
                rate_hz = message.chunk.format.sample_rate_hz or rate_hz
    except grpc.aio.AioRpcError as error:
        raise from_grpc(error, "Speech synthesis (synthesize)") from None
    if response_format == "wav":
        data = wav_bytes(bytes(pcm), rate_hz)
    else:
        data = await asyncio.to_thread(encode_audio, bytes(pcm), rate_hz, container, codec)
    return web.Response(body=data, content_type=content_type)


async def _stream_pcm(request: web.Request, call: Any, content_type: str) -> web.StreamResponse:
    """Raw PCM needs no header: each chunk goes out as it is spoken, so a player
    starts after the first sentence. A failure before the first chunk is a plain
    HTTP error; one after it cuts the body short."""
    response: web.StreamResponse | None = None
    try:
        async for message in call:
            if not message.HasField("chunk"):
                continue
            if response is None:
                response = web.StreamResponse(headers={"Content-Type": content_type})
                response.headers["x-trace-id"] = request[REQUEST_TRACE_ID]
                await response.prepare(request)
            await response.write(message.chunk.audio)
    except grpc.aio.AioRpcError as error:
        if response is None:
            raise from_grpc(error, "Speech synthesis (synthesize)") from None
        log.warning("speech cut short", extra={"code": error.code().name})
        if request.transport is not None:
            request.transport.close()
        return response
    if response is None:
        return web.Response(body=b"", content_type=content_type)
    await response.write_eof()
    return response


def encode_audio(
    pcm: bytes, rate_hz: int, container_format: str | None, codec: str | None
) -> bytes:
    """Mono s16le PCM -> a compressed file with PyAV (its own FFmpeg, offline)."""
    import av
    from av.audio.stream import AudioStream

    assert codec is not None, "wav and pcm are written without PyAV"
    samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
    out_rate = 48000 if codec == "libopus" else rate_hz  # Opus takes 8/12/16/24/48 kHz
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=out_rate, layout="mono")
        assert isinstance(stream, AudioStream)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate_hz
        resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=out_rate)
        for piece in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(piece):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


# ---- chat -------------------------------------------------------------------------
def question_of(body: dict[str, Any]) -> tuple[str, bool]:
    """The text to send to ChatService, and whether earlier turns were folded in."""
    messages = field(body, "messages", list, required=True)
    if not messages:
        raise HttpError(
            400, "`messages` is empty: send at least one user message.", "invalid_value", "messages"
        )
    turns: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise HttpError(
                400, f"{where} must be an object with `role` and `content`.", "invalid_type", where
            )
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise HttpError(
                400, f"{where}.role is {json.dumps(role)[:40]}; use system, user or assistant.",
                "invalid_value", f"{where}.role",
            )  # fmt: skip
        turns.append((role, content_text(message.get("content"), where)))
    role, last = turns[-1]
    if role != "user" or not last.strip():
        raise HttpError(
            400, "The last message must be the user's, with some text: it is what gets answered.",
            "invalid_value", "messages",
        )  # fmt: skip
    earlier = [
        (r, t)
        for r, t in turns[:-1]
        if t.strip() and r in ("user", "assistant", "system", "developer")
    ]
    if not earlier or "session_id" in body:
        return last.strip(), False
    # A fresh session knows nothing of what the client resends: give it as context.
    context = "\n".join(f"{r}: {t.strip()}" for r, t in earlier)
    return f"Earlier in this conversation:\n{context}\n\nNow answer this: {last.strip()}", True


def content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise HttpError(
                    400, f"{where}.content may hold only text parts on this server.",
                    "unsupported_content", f"{where}.content",
                )  # fmt: skip
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise HttpError(
        400,
        f"{where}.content must be a string or a list of text parts.",
        "invalid_type",
        f"{where}.content",
    )


def sampling_of(body: dict[str, Any]) -> chat_pb2.SamplingParams:
    temperature = number(body, "temperature", 0, 2)
    top_p = number(body, "top_p", 0, 1)
    max_tokens = field(body, "max_completion_tokens", int) or field(body, "max_tokens", int)
    if max_tokens is not None and not 1 <= max_tokens <= 32768:
        raise HttpError(
            400, f"max_tokens is {max_tokens}; use 1 to 32768.", "invalid_value", "max_tokens"
        )
    n = field(body, "n", int, default=1)
    if n != 1:
        raise HttpError(
            400, f"n is {n}; this server makes one choice per request.", "invalid_value", "n"
        )
    return chat_pb2.SamplingParams(
        temperature=temperature or 0.0,
        top_p=top_p or 0.0,
        max_new_tokens=max_tokens or 0,
        greedy=temperature == 0,
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    field(body, "model", str, required=True)
    stream = field(body, "stream", bool, default=False)
    stream_options = field(body, "stream_options", dict, default={})
    text, _folded = question_of(body)
    sampling = sampling_of(body)
    session_id = field(body, "session_id", str, default="")
    if session_id and not VALID_ID.match(session_id):
        raise HttpError(
            400,
            "session_id must be 1 to 64 letters, digits, '-' or '_'.",
            "invalid_value",
            "session_id",
        )
    user = field(body, "user", str, default="")
    chat = request.app[CHANNELS].chat()
    own_session = not session_id
    session_id = session_id or f"web-{new_id()}"
    call = chat.Chat(
        chat_pb2.ChatRequest(
            session_id=session_id,
            text=text,
            sampling=sampling,
            user_id=user if VALID_ID.match(user) else "",
        ),
        **grpc_call_options(request),
    )
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    try:
        if stream:
            return await _stream_chat(request, call, completion_id, created, stream_options)
        return await _whole_chat(call, completion_id, created)
    finally:
        call.cancel()
        if own_session:  # nobody will continue it: free its history now
            forget = chat.ResetSession(
                chat_pb2.ResetSessionRequest(session_id=session_id), **grpc_call_options(request)
            )
            _background(forget)


_pending: set[asyncio.Future[Any]] = set()


def _background(awaitable: Any) -> None:
    async def quietly() -> None:
        try:
            await awaitable
        except grpc.aio.AioRpcError as error:
            log.info("session not reset", extra={"code": error.code().name})

    task = asyncio.ensure_future(quietly())
    _pending.add(task)
    task.add_done_callback(_pending.discard)


async def _model_of(call: Any) -> str:
    for key, value in await call.initial_metadata() or ():
        if key == MODEL_METADATA_KEY:
            return str(value)
    return "talker-chat"


def _usage(finished: chat_pb2.ReplyFinished) -> dict[str, int]:
    usage = finished.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


async def _whole_chat(call: Any, completion_id: str, created: int) -> web.Response:
    pieces: list[str] = []
    finished = chat_pb2.ReplyFinished()
    try:
        model = await _model_of(call)
        async for message in call:
            if message.HasField("delta"):
                pieces.append(message.delta.text)
            elif message.HasField("finished"):
                finished = message.finished
    except grpc.aio.AioRpcError as error:
        raise from_grpc(error, "Chat (chat)") from None
    return web.json_response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": finished.text or "".join(pieces)},
                    "finish_reason": FINISH_REASONS.get(finished.finish_reason, "stop"),
                }
            ],
            "usage": _usage(finished),
        }
    )


async def _stream_chat(
    request: web.Request, call: Any, completion_id: str, created: int, options: dict[str, Any]
) -> web.StreamResponse:
    # The first answer (or failure) before the 200: a refused call is a plain HTTP error.
    try:
        model = await _model_of(call)
    except grpc.aio.AioRpcError as error:
        raise from_grpc(error, "Chat (chat)") from None
    iterator = call.__aiter__()
    try:
        first = await iterator.__anext__()
    except StopAsyncIteration:
        first = None
    except grpc.aio.AioRpcError as error:
        raise from_grpc(error, "Chat (chat)") from None

    event_base = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        event = {**event_base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()

    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    response.headers["x-trace-id"] = request[REQUEST_TRACE_ID]
    await response.prepare(request)
    await response.write(chunk({"role": "assistant", "content": ""}))
    send: Callable[[bytes], Any] = response.write
    try:
        message = first
        while message is not None:
            if message.HasField("delta") and message.delta.text:
                await send(chunk({"content": message.delta.text}))
            elif message.HasField("finished"):
                finished = message.finished
                await send(chunk({}, FINISH_REASONS.get(finished.finish_reason, "stop")))
                if options.get("include_usage"):
                    usage = {**event_base, "choices": [], "usage": _usage(finished)}
                    await send(f"data: {json.dumps(usage)}\n\n".encode())
            try:
                message = await iterator.__anext__()
            except StopAsyncIteration:
                message = None
        await send(b"data: [DONE]\n\n")
    except grpc.aio.AioRpcError as error:
        # Mid-stream: the status line is sent; the error goes as an event (OpenAI's clients raise it).
        failure = from_grpc(error, "Chat (chat)")
        body = {"error": {"message": str(failure), "type": "server_error", "code": failure.code}}
        await send(f"data: {json.dumps(body)}\n\n".encode())
    await response.write_eof()
    return response


# ---- models -----------------------------------------------------------------------
def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "talker"}


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model(name) for name in MODELS]})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    if name not in MODELS:
        raise HttpError(
            404, f"No model {name[:80]!r}; GET /v1/models lists them.", "model_not_found"
        )
    return web.json_response(_model(name))
