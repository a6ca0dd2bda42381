"""DownloadFile of TalkerService: a finished turn's archived file, or a DONE
render job's mp4, streamed in chunks from an offset.

Only plain archive names are served: `{user}_{stamp}_{scene}.mp4|wav` inside
`{archive root}/{date}/`, beside the JSON record that says whose it is. A name
is checked before it touches the disk, the file is resolved and must still be
inside the archive (a symlink pointing out is refused), and it is opened with
O_NOFOLLOW, so no `..`, absolute path or link reaches a file outside.

Keys: the API-key interceptor already let the call in. A key bound to a user
(`user_api_keys`) reads only that user's files; the plain `api_keys` are the
operator's and read every file."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from gateway.access import AUTHORIZATION_KEY
from gateway.config import GatewaySettings
from pipeline.jobs_queue import DONE, JobQueue
from services.common.errors import InvalidInput, NotFound, PreconditionFailed, TalkerError
from services.common.ids import check_id
from talker.v1 import talker_pb2

# What the archive writes (gateway/archive.py): ids are [A-Za-z0-9_-], the stamp
# 20260101T120000000Z, an optional "-2" for a second turn in the same millisecond.
ARCHIVE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,200}\.(mp4|wav)$")
STAMP_DATE = re.compile(r"_(\d{4})(\d{2})(\d{2})T\d{9}Z_")
CONTENT_TYPES = {"mp4": "video/mp4", "wav": "audio/wav"}
DEFAULT_CHUNK_BYTES = 256 * 1024
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 4 * 1024, 4 * 1024 * 1024


class PermissionDenied(TalkerError):
    """The caller may not read this (PERMISSION_DENIED)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class OutOfRange(TalkerError):
    """An offset past the end of the file (OUT_OF_RANGE)."""

    code = grpc.StatusCode.OUT_OF_RANGE


@dataclass(frozen=True)
class ArchivedFile:
    path: Path
    user_id: str
    trace_id: str


class DownloadRpcs:
    """DownloadFile (mixed into TalkerServicer beside JobRpcs)."""

    settings: GatewaySettings
    if TYPE_CHECKING:  # JobRpcs provides them

        @property
        def job_queue(self) -> JobQueue: ...

        async def _queued(self, operation: Any) -> Any: ...

    async def DownloadFile(
        self, request: talker_pb2.DownloadFileRequest, context: aio.ServicerContext
    ) -> AsyncIterator[talker_pb2.DownloadFileResponse]:
        chunk_bytes = request.chunk_bytes or DEFAULT_CHUNK_BYTES
        if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise InvalidInput(
                f"chunk_bytes is {chunk_bytes}; use {MIN_CHUNK_BYTES} to {MAX_CHUNK_BYTES} "
                "(0 = 256 KiB)."
            )
        which = request.WhichOneof("file")
        root = self.settings.archive_dir
        if which == "job_id":
            job_id = check_id(request.job_id, "job_id")
            record = await self._queued(self.job_queue.get(job_id))
            if record.state != DONE:
                raise PreconditionFailed(
                    f"Job {job_id} is {record.state.upper()}: only a DONE job has a video "
                    "to download (GetJob tells when it is done)."
                )
            found = await asyncio.to_thread(find_archived, root, record.archive_path)
            found = ArchivedFile(found.path, record.user_id, record.trace_id)
        elif which == "archive_name":
            found = await asyncio.to_thread(find_archived, root, request.archive_name)
        else:
            raise InvalidInput(
                "Say which file: set `archive_name` (from TurnFinished.archive_path) or `job_id`."
            )
        self._check_owner(found, context)
        async for response in stream_file(
            found, request.offset, request.limit_bytes, chunk_bytes, context
        ):
            yield response

    def _check_owner(self, found: ArchivedFile, context: aio.ServicerContext) -> None:
        bound = self.settings.user_api_keys
        if not bound:
            return
        key = caller_key(context)
        owner = bound.get(key)
        if owner is not None and owner != found.user_id:
            raise PermissionDenied(
                f"{found.path.name} belongs to another user; the key given reads only "
                f"{owner}'s files."
            )


def caller_key(context: aio.ServicerContext) -> str:
    for name, value in context.invocation_metadata() or ():
        if name == AUTHORIZATION_KEY:
            return str(value).partition(" ")[2].strip()
    return ""


def find_archived(root: Path, given: str) -> ArchivedFile:
    """The archived file `given` names (a bare archive name, or an archive path as
    the gateway or a worker reported it), checked to be inside `root`."""
    if not given:
        raise InvalidInput("archive_name is empty: give the name from TurnFinished.archive_path.")
    if "\x00" in given or len(given) > 1024:
        raise InvalidInput("archive_name is not a file name.")
    root = root.resolve()
    if "/" in given or "\\" in given:
        candidate = Path(given)
        if ".." in candidate.parts or "\\" in given:
            raise InvalidInput(
                f"{given[:200]!r} is not an archive name: '..' is not allowed. Give the "
                "file's name (the last part of archive_path)."
            )
        if not candidate.is_absolute() and len(candidate.parts) == 2:
            candidate = root / candidate  # "date/name", relative to the archive
        if candidate.parent.parent.resolve() != root:
            raise PermissionDenied(
                f"{given[:200]!r} is not in the archive: give the file's name (the last "
                "part of archive_path) or archive_path as it came."
            )
        name, folder = candidate.name, candidate.parent.name
    else:
        name, folder = given, ""
    if not ARCHIVE_NAME.match(name):
        raise InvalidInput(
            f"{name[:200]!r} is not an archive name: expected user_stamp_scene.mp4 (or .wav) "
            "made of letters, digits, '-' and '_'."
        )
    if not folder:
        date = STAMP_DATE.search(name)
        if date is None:
            raise InvalidInput(f"{name[:200]!r} has no date stamp: it is not an archive name.")
        folder = "-".join(date.groups())
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", folder):
        raise PermissionDenied(f"{given[:200]!r} is not in the archive.")
    path = root / folder / name
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise NotFound(
            f"No archived file {name}: it was never made, was deleted after the retention "
            "period, or (a turn's video) is still rendering; try again in a moment."
        ) from None
    if stat.S_ISLNK(info.st_mode) or not _inside(path.resolve(), root):
        raise PermissionDenied(f"{name} points out of the archive; it is not served.")
    if not stat.S_ISREG(info.st_mode):
        raise NotFound(f"{name} is not a file.")
    record_path = path.with_suffix(".json")
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        raise NotFound(
            f"{name} has no archive record beside it: it is not a finished output."
        ) from None
    return ArchivedFile(path, str(record.get("user_id", "")), str(record.get("trace_id", "")))


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root)
    except OSError:
        return False


async def stream_file(
    found: ArchivedFile,
    offset: int,
    limit_bytes: int,
    chunk_bytes: int,
    context: aio.ServicerContext,
) -> AsyncIterator[talker_pb2.DownloadFileResponse]:
    try:
        # O_NOFOLLOW: a link swapped in after the checks is not followed.
        fd = os.open(found.path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NotFound(f"{found.path.name} was deleted while it was being fetched.") from None
    except OSError as error:
        raise PermissionDenied(f"{found.path.name} cannot be read: {error.strerror}.") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        size = info.st_size
        if offset > size:
            raise OutOfRange(
                f"offset {offset} is past the end of {found.path.name} ({size} bytes)."
            )
        end = size if not limit_bytes else min(size, offset + limit_bytes)
        modified = Timestamp()
        modified.FromNanoseconds(info.st_mtime_ns)
        described = talker_pb2.DownloadedFile(
            name=found.path.name,
            size_bytes=size,
            content_type=CONTENT_TYPES[found.path.suffix.lstrip(".")],
            user_id=found.user_id,
            trace_id=found.trace_id,
            modify_time=modified,
        )
        position = offset
        first = True
        while first or position < end:
            length = min(chunk_bytes, end - position)
            data = (
                await asyncio.to_thread(os.pread, file.fileno(), length, position)
                if length
                else b""
            )
            response = talker_pb2.DownloadFileResponse(offset=position, data=data)
            if first:
                response.file.CopyFrom(described)
                first = False
            yield response
            position += len(data)
            if length and not data:  # the file shrank: archive files never do, but do not spin
                break
