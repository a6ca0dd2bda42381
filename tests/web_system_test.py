"""The web program end to end, every program a real process under supervisord,
with API keys on: the official `openai` client transcribes, speaks and chats
through it; malformed requests get 4xx JSON; keys are enforced; a finished
Ask's mp4 and a render job's mp4 come back byte-identical through
TalkerService.DownloadFile (whole and resumed) and `GET /v1/files/{id}`;
bad ids, other users' files and path tricks are refused."""

from __future__ import annotations

import io
import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import grpc
import numpy as np
import openai
import pytest

from gateway.samples import spoken_question
from talker.v1 import asr_pb2, asr_pb2_grpc, audio_pb2, chat_pb2, talker_pb2, talker_pb2_grpc
from tests.portrait import create_astronaut
from tests.processes import Supervisor, serving_system
from tests.speech import word_error_rate

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed (make system-deps)"
)

OPERATOR_KEY = "operator-key-1"
ALICE_KEY = "alice-key-1"
BOB_KEY = "bob-key-1"
UPLOAD_LIMIT = 1_500_000
SPOKEN = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def web_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    keys = json.dumps([OPERATOR_KEY])
    user_keys = json.dumps({ALICE_KEY: "alice", BOB_KEY: "bob"})
    env = {
        "TALKER_GATEWAY_API_KEYS": keys,
        "TALKER_GATEWAY_USER_API_KEYS": user_keys,
        "TALKER_WEB_API_KEYS": json.dumps([OPERATOR_KEY, ALICE_KEY, BOB_KEY]),
        "TALKER_WEB_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
    }
    with serving_system(tmp_path_factory.mktemp("var"), env) as supervisor:
        yield supervisor


@pytest.fixture(scope="module")
def client(web_system: Supervisor) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{web_system.web_url}/v1", api_key=OPERATOR_KEY, max_retries=0)


@pytest.fixture(scope="module")
def gateway(web_system: Supervisor) -> talker_pb2_grpc.TalkerServiceStub:
    return talker_pb2_grpc.TalkerServiceStub(grpc.insecure_channel(web_system.addresses["gateway"]))


def key(value: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {value}"),)


def http(
    system: Supervisor,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        f"{system.web_url}{path}", data=body, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def assert_json_error(status: int, body: bytes, expected: int, words: str) -> dict[str, Any]:
    assert status == expected, (status, body[:500])
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "code"}, error
    assert words.lower() in error["message"].lower(), error["message"]
    return dict(error)


def transcribe_with_asr(system: Supervisor, wav: bytes) -> str:
    stub = asr_pb2_grpc.AsrServiceStub(grpc.insecure_channel(system.addresses["asr"]))
    request = asr_pb2.RecognizeRequest(
        format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_WAV),
        audio=wav,
        config=asr_pb2.RecognitionConfig(language="en"),
    )
    return str(stub.Recognize(request, timeout=120).text)


# ---- OpenAI-style endpoints through the official client ----------------------------
def test_openai_client_transcribes_a_wav(client: openai.OpenAI) -> None:
    wav = spoken_question()
    text = client.audio.transcriptions.create(model="whisper-1", file=("question.wav", wav))
    assert "capital" in text.text.lower(), text.text
    verbose = client.audio.transcriptions.create(
        model="whisper-1",
        file=("question.wav", wav),
        language="en",
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    assert verbose.language == "en" and verbose.duration > 1 and verbose.segments
    words = verbose.words or []
    assert "capital" in [w.word.lower().strip(",.?") for w in words], words
    assert all(0 <= w.start <= w.end <= verbose.duration + 0.5 for w in words)


def test_openai_client_speaks_and_the_words_come_back(web_system, client) -> None:  # type: ignore[no-untyped-def]
    wav = client.audio.speech.create(
        model="tts-1", voice="alloy", input=SPOKEN, response_format="wav"
    ).content
    assert wav[:4] == b"RIFF"
    heard = transcribe_with_asr(web_system, wav)
    assert word_error_rate([SPOKEN], [heard]) <= 0.2, heard
    # mp3 (the client's default) through PyAV, and back through our own transcription
    # endpoint, which decodes it before ASR (ASR itself reads only WAV/FLAC/OGG).
    mp3 = client.audio.speech.create(model="tts-1", voice="nova", input=SPOKEN).content
    with av.open(io.BytesIO(mp3)) as container:
        assert container.format.name == "mp3" and container.streams.audio[0].duration
    again = client.audio.transcriptions.create(model="whisper-1", file=("speech.mp3", mp3))
    assert word_error_rate([SPOKEN], [again.text]) <= 0.2, again.text
    pcm = client.audio.speech.create(
        model="tts-1", voice="alloy", input="Hello.", response_format="pcm", speed=1.5
    ).content
    samples = np.frombuffer(pcm, dtype="<i2")
    assert 0.2 < len(samples) / 24000 < 3 and np.abs(samples).max() > 1000


def test_openai_client_streams_a_chat_reply(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="talker-chat",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        stream=True,
        temperature=0,
        max_tokens=32,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    reply = "".join(pieces)
    assert len([p for p in pieces if p]) > 1, pieces  # streamed, not one lump
    assert "paris" in reply.lower(), reply
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0
    whole = client.chat.completions.create(
        model="talker-chat",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=16,
    )
    assert whole.choices[0].message.content and whole.usage.total_tokens > 0
    assert [m.id for m in client.models.list().data] == ["whisper-1", "tts-1", "talker-chat"]


def test_chat_history_resent_by_the_client_is_remembered(client: openai.OpenAI) -> None:
    """OpenAI clients resend the conversation; a fresh session is given it as context."""
    reply = client.chat.completions.create(
        model="talker-chat",
        temperature=0,
        max_tokens=24,
        messages=[
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Nice to meet you, Ada."},
            {"role": "user", "content": "What is my name?"},
        ],
    )
    assert "ada" in (reply.choices[0].message.content or "").lower(), reply


def test_malformed_requests_get_4xx_json_never_500(web_system: Supervisor) -> None:
    auth = {"Authorization": f"Bearer {OPERATOR_KEY}", "Content-Type": "application/json"}
    cases: list[tuple[str, bytes, int, str]] = [
        ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
        ("/v1/chat/completions", b'{"messages": []}', 400, "`model` is required"),
        ("/v1/chat/completions", b'{"model": "m", "messages": []}', 400, "empty"),
        ("/v1/chat/completions", b'{"model": "m", "messages": "hi"}', 400, "must be a list"),
        (
            "/v1/chat/completions",
            b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}',
            400,
            "`stream` must be a bool",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}',
            400,
            "role",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}',
            400,
            "temperature",
        ),
        ("/v1/audio/speech", b'{"model": "tts-1", "voice": "alloy"}', 400, "`input` is required"),
        ("/v1/audio/speech", b'{"model": "tts-1", "input": "  "}', 400, "empty"),
        ("/v1/audio/speech", b'{"model": "tts-1", "input": 5}', 400, "must be a string"),
        (
            "/v1/audio/speech",
            b'{"model": "tts-1", "input": "Hi.", "response_format": "aiff"}',
            400,
            "not supported",
        ),
        ("/v1/audio/speech", b'{"model": "tts-1", "input": "Hi.", "speed": 3.5}', 400, "speed"),
        (
            "/v1/audio/speech",
            b'{"model": "tts-1", "input": "Hi.", "voice": "no-such-voice"}',
            404,
            "no-such-voice",
        ),
        ("/v1/audio/transcriptions", b'{"model": "whisper-1"}', 400, "multipart/form-data"),
    ]
    for path, body, expected, words in cases:
        status, headers, answer = http(web_system, "POST", path, body, auth)
        assert_json_error(status, answer, expected, words)
        assert headers.get("x-trace-id"), headers

    def multipart(parts: dict[str, tuple[str, bytes] | str]) -> tuple[bytes, dict[str, str]]:
        boundary = "talkerboundary"
        out = io.BytesIO()
        for name, value in parts.items():
            out.write(f"--{boundary}\r\n".encode())
            if isinstance(value, tuple):
                disposition = f'form-data; name="{name}"; filename="{value[0]}"'
                out.write(f"Content-Disposition: {disposition}\r\n\r\n".encode() + value[1])
            else:
                out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode())
            out.write(b"\r\n")
        out.write(f"--{boundary}--\r\n".encode())
        headers = {
            "Authorization": f"Bearer {OPERATOR_KEY}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        }
        return out.getvalue(), headers

    wav = spoken_question()
    uploads: list[tuple[dict[str, Any], int, str]] = [
        ({"model": "whisper-1"}, 400, "`file` is required"),
        ({"model": "whisper-1", "file": ("empty.wav", b"")}, 400, "empty"),
        ({"file": ("q.wav", wav)}, 400, "`model` is required"),
        ({"model": "w", "file": ("q.wav", wav), "response_format": "xml"}, 400, "not supported"),
        ({"model": "w", "file": ("q.wav", wav), "language": "english!"}, 400, "ISO 639-1"),
        (
            {"model": "w", "file": ("q.wav", wav), "timestamp_granularities[]": "word"},
            400,
            "verbose_json",
        ),
        ({"model": "w", "file": ("noise.bin", b"\x01\x02" * 500)}, 400, "could not be read"),
        ({"model": "w", "file": ("big.wav", b"\0" * (UPLOAD_LIMIT + 10))}, 413, "larger than"),
    ]
    for parts, expected, words in uploads:
        body, headers = multipart(parts)
        status, _, answer = http(web_system, "POST", "/v1/audio/transcriptions", body, headers)
        assert_json_error(status, answer, expected, words)
    status, _, answer = http(web_system, "GET", "/v1/nothing-here", None, auth)
    assert_json_error(status, answer, 404, "nothing at")
    status, _, answer = http(web_system, "DELETE", "/v1/models", None, auth)
    assert_json_error(status, answer, 405, "not allowed")


def test_keys_are_enforced(web_system: Supervisor) -> None:
    status, _, body = http(web_system, "GET", "/v1/models")
    assert_json_error(status, body, 401, "needs an API key")
    status, _, body = http(web_system, "GET", "/v1/models", headers={"x-api-key": "wrong"})
    assert_json_error(status, body, 401, "not valid")
    status, _, body = http(web_system, "GET", "/v1/models", headers={"Authorization": "Basic x"})
    assert_json_error(status, body, 401, "Bearer")
    status, _, body = http(web_system, "GET", "/v1/models", headers={"x-api-key": ALICE_KEY})
    assert status == 200 and json.loads(body)["object"] == "list"
    # `?key=` is taken for the page only (not the API), and kept in an HttpOnly cookie.
    status, _, body = http(web_system, "GET", f"/v1/models?key={OPERATOR_KEY}")
    assert status == 401
    status, headers, _ = http(web_system, "GET", f"/?key={OPERATOR_KEY}")
    cookie = headers.get("Set-Cookie", "")
    assert f"talker_key={OPERATOR_KEY}" in cookie and "HttpOnly" in cookie, headers
    status, _, body = http(
        web_system, "GET", "/v1/models", headers={"Cookie": f"talker_key={OPERATOR_KEY}"}
    )
    assert status == 200


# ---- downloads --------------------------------------------------------------------
def download(
    gateway: talker_pb2_grpc.TalkerServiceStub, api_key: str, **fields: Any
) -> tuple[talker_pb2.DownloadedFile, bytes]:
    described = talker_pb2.DownloadedFile()
    data = bytearray()
    request = talker_pb2.DownloadFileRequest(**fields)
    for message in gateway.DownloadFile(request, timeout=60, metadata=key(api_key)):
        if message.HasField("file"):
            described = message.file
        assert message.offset == request.offset + len(data)
        data += message.data
    return described, bytes(data)


def refused(gateway: talker_pb2_grpc.TalkerServiceStub, api_key: str | None, **fields: Any):  # type: ignore[no-untyped-def]
    metadata = key(api_key) if api_key else ()
    with pytest.raises(grpc.RpcError) as caught:
        list(
            gateway.DownloadFile(
                talker_pb2.DownloadFileRequest(**fields), timeout=60, metadata=metadata
            )
        )
    return caught.value


@pytest.fixture(scope="module")
def asked_mp4(web_system: Supervisor, gateway: talker_pb2_grpc.TalkerServiceStub) -> Path:
    """A finished Ask of alice's, rendered to mp4 and archived."""
    avatar_id = create_astronaut(web_system.addresses["animate"])
    request = talker_pb2.AskRequest(
        user_id="alice",
        scene="web-test",
        text="Say hello.",
        avatar_id=avatar_id,
        render_mp4=True,
        sampling=chat_pb2.SamplingParams(greedy=True, max_new_tokens=12),
    )
    finished = None
    for response in gateway.Ask(request, timeout=600, metadata=key(OPERATOR_KEY)):
        if response.event.HasField("turn_finished"):
            finished = response.event.turn_finished
    assert finished is not None and finished.archive_path.endswith(".mp4")
    return Path(finished.archive_path)


@pytest.fixture(scope="module")
def job_mp4(web_system: Supervisor, gateway: talker_pb2_grpc.TalkerServiceStub) -> tuple[str, Path]:
    """A DONE render job of bob's: its id and archived mp4."""
    avatar_id = create_astronaut(web_system.addresses["animate"])
    job = gateway.SubmitRender(
        talker_pb2.SubmitRenderRequest(
            user_id="bob", scene="web-job", avatar_id=avatar_id, script="Hello from the job."
        ),
        timeout=30,
        metadata=key(OPERATOR_KEY),
    ).job
    deadline = time.monotonic() + 600
    while job.state != talker_pb2.JOB_STATE_DONE:
        assert job.state in (talker_pb2.JOB_STATE_QUEUED, talker_pb2.JOB_STATE_RUNNING), job
        assert time.monotonic() < deadline, "the job did not finish in 10 minutes"
        time.sleep(1)
        job = gateway.GetJob(
            talker_pb2.GetJobRequest(job_id=job.job_id), timeout=10, metadata=key(OPERATOR_KEY)
        ).job
    return job.job_id, Path(job.archive_path)


def test_an_asks_mp4_downloads_byte_identical(web_system, gateway, asked_mp4: Path) -> None:  # type: ignore[no-untyped-def]
    original = asked_mp4.read_bytes()
    described, data = download(gateway, ALICE_KEY, archive_name=asked_mp4.name, chunk_bytes=8192)
    assert data == original
    assert described.size_bytes == len(original) and described.content_type == "video/mp4"
    assert described.user_id == "alice" and described.trace_id
    # Resumed: the first part, then the rest from where it stopped.
    half = len(original) // 2
    _, head = download(gateway, ALICE_KEY, archive_name=asked_mp4.name, limit_bytes=half)
    _, tail = download(gateway, ALICE_KEY, archive_name=str(asked_mp4), offset=half)
    assert head + tail == original
    # The operator's key reads every user's files.
    assert download(gateway, OPERATOR_KEY, archive_name=asked_mp4.name)[1] == original
    # Through the web program: whole, and a range.
    status, headers, body = http(
        web_system, "GET", f"/v1/files/{asked_mp4.name}", headers={"x-api-key": ALICE_KEY}
    )
    assert status == 200 and body == original and headers["Content-Type"] == "video/mp4"
    status, headers, body = http(
        web_system,
        "GET",
        f"/v1/files/{asked_mp4.name}",
        headers={"x-api-key": ALICE_KEY, "Range": f"bytes={half}-"},
    )
    assert status == 206 and body == original[half:]
    assert headers["Content-Range"] == f"bytes {half}-{len(original) - 1}/{len(original)}"
    status, _, body = http(
        web_system,
        "GET",
        f"/v1/files/{asked_mp4.name}",
        headers={"x-api-key": ALICE_KEY, "Range": f"bytes={len(original) + 5}-"},
    )
    assert_json_error(status, body, 416, "past the end")


def test_a_jobs_mp4_downloads_byte_identical(web_system, gateway, job_mp4) -> None:  # type: ignore[no-untyped-def]
    job_id, path = job_mp4
    original = path.read_bytes()
    described, data = download(gateway, BOB_KEY, job_id=job_id)
    assert data == original and described.user_id == "bob"
    _, tail = download(gateway, BOB_KEY, job_id=job_id, offset=1000)
    assert tail == original[1000:]
    status, _, body = http(web_system, "GET", f"/v1/files/{job_id}", headers={"x-api-key": BOB_KEY})
    assert status == 200 and body == original
    # Alice's key does not read bob's video, through either door.
    error = refused(gateway, ALICE_KEY, job_id=job_id)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "another user" in error.details()
    status, _, body = http(
        web_system, "GET", f"/v1/files/{job_id}", headers={"x-api-key": ALICE_KEY}
    )
    assert_json_error(status, body, 403, "another user")


def test_bad_ids_other_users_and_path_tricks_are_refused(  # type: ignore[no-untyped-def]
    web_system, gateway, asked_mp4: Path
) -> None:
    archive_root = asked_mp4.parent.parent
    # Another user's file with a key bound to bob; and no key at all.
    error = refused(gateway, BOB_KEY, archive_name=asked_mp4.name)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
    assert refused(gateway, None, archive_name=asked_mp4.name).code() == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    status, _, body = http(web_system, "GET", f"/v1/files/{asked_mp4.name}")
    assert_json_error(status, body, 401, "API key")
    # A link inside the archive that points out of it, with a record beside it.
    day = archive_root / "2026-01-01"
    day.mkdir(exist_ok=True)
    link = day / "eve_20260101T120000000Z_trick.mp4"
    link.symlink_to("/etc/hostname")
    link.with_suffix(".json").write_text(json.dumps({"user_id": "eve"}))
    cases = [
        ({"archive_name": "../../../etc/passwd"}, grpc.StatusCode.INVALID_ARGUMENT, "'..'"),
        ({"archive_name": "/etc/passwd"}, grpc.StatusCode.PERMISSION_DENIED, "not in the archive"),
        (
            {"archive_name": f"{archive_root}/2026-01-01/../../x.mp4"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "'..'",
        ),
        ({"archive_name": "passwd"}, grpc.StatusCode.INVALID_ARGUMENT, "not an archive name"),
        ({"archive_name": link.name}, grpc.StatusCode.PERMISSION_DENIED, "out of the archive"),
        (
            {"archive_name": "nobody_20260101T120000000Z_none.mp4"},
            grpc.StatusCode.NOT_FOUND,
            "No archived file",
        ),
        (
            {"archive_name": asked_mp4.with_suffix(".json").name},
            grpc.StatusCode.INVALID_ARGUMENT,
            "",
        ),
        ({"job_id": "not a job!"}, grpc.StatusCode.INVALID_ARGUMENT, "job_id"),
        ({"job_id": "0" * 32}, grpc.StatusCode.NOT_FOUND, "No job"),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "Say which file"),
        (
            {"archive_name": asked_mp4.name, "offset": 10**9},
            grpc.StatusCode.OUT_OF_RANGE,
            "past the end",
        ),
        (
            {"archive_name": asked_mp4.name, "chunk_bytes": 10},
            grpc.StatusCode.INVALID_ARGUMENT,
            "chunk_bytes",
        ),
    ]
    for fields, code, words in cases:
        error = refused(gateway, OPERATOR_KEY, **fields)
        assert error.code() == code, (fields, error.code(), error.details())
        assert words in error.details(), (fields, error.details())
    for path, expected in [
        ("/v1/files/..%2F..%2Fetc%2Fpasswd", 400),
        ("/v1/files/%2Fetc%2Fpasswd", 403),
        (f"/v1/files/{link.name}", 403),
        ("/v1/files/nobody_20260101T120000000Z_none.mp4", 404),
        (f"/v1/files/{'0' * 32}", 404),
    ]:
        status, _, body = http(web_system, "GET", path, headers={"x-api-key": OPERATOR_KEY})
        assert status == expected, (path, status, body[:300])
        assert json.loads(body)["error"]["message"]
