"""`GET /v1/files/{file_id}`: a finished output through TalkerService.DownloadFile.

`file_id` is a render job's id (32 hex digits) or a turn's archive name (the
last part of TurnFinished.archive_path). `Range: bytes=N-` or `bytes=N-M`
resumes a download (206); without one the whole file comes (200). The gateway
does every check (ids, paths, keys); this only relays its answer."""

from __future__ import annotations

import re

import grpc
from aiohttp import web

from talker.v1 import talker_pb2
from web.errors import HttpError, from_grpc
from web.gateway_client import CHANNELS, REQUEST_TRACE_ID, SETTINGS, call_metadata

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/files/{file_id}", download)


def parse_range(header: str | None) -> tuple[int, int]:
    """(offset, limit) from a Range header; limit 0 = to the end. One range only."""
    if not header:
        return 0, 0
    match = RANGE.match(header.strip())
    if match is None:
        raise HttpError(
            416,
            f"Range {header[:100]!r} is not supported: use one range, `bytes=N-` or `bytes=N-M`.",
            "invalid_range",
        )
    start = int(match.group(1))
    if not match.group(2):
        return start, 0
    end = int(match.group(2))
    if end < start:
        raise HttpError(416, f"Range {header[:100]!r} ends before it starts.", "invalid_range")
    return start, end - start + 1


async def download(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    file_id = request.match_info["file_id"]
    offset, limit = parse_range(request.headers.get("Range"))
    rpc = talker_pb2.DownloadFileRequest(
        offset=offset, limit_bytes=limit, chunk_bytes=settings.download_chunk_bytes
    )
    if JOB_ID.match(file_id):
        rpc.job_id = file_id
    else:
        rpc.archive_name = file_id
    call = (
        request.app[CHANNELS]
        .talker()
        .DownloadFile(
            rpc,
            metadata=call_metadata(request, request[REQUEST_TRACE_ID]),
            timeout=settings.request_timeout_s,
        )
    )
    response: web.StreamResponse | None = None
    try:
        async for message in call:
            if response is None:
                response = await _start(request, message.file, offset, limit)
            await response.write(message.data)
    except grpc.aio.AioRpcError as error:
        if response is None:
            raise from_grpc(error, "The gateway") from None
        # Headers are gone: cut the connection so the client sees a short body, not a whole one.
        if request.transport is not None:
            request.transport.close()
        return response
    finally:
        call.cancel()
    if response is None:
        raise HttpError(502, "The gateway ended the download without sending the file.")
    await response.write_eof()
    return response


async def _start(
    request: web.Request, described: talker_pb2.DownloadedFile, offset: int, limit: int
) -> web.StreamResponse:
    size = described.size_bytes
    end = size if not limit else min(size, offset + limit)
    partial = "Range" in request.headers
    if partial and offset >= size:
        raise HttpError(
            416,
            f"Range starts at {offset}, past the end of the file ({size} bytes).",
            "invalid_range",
        )
    response = web.StreamResponse(status=206 if partial else 200)
    response.content_type = described.content_type
    response.content_length = end - offset
    response.headers["Accept-Ranges"] = "bytes"
    response.headers["Content-Disposition"] = f'attachment; filename="{described.name}"'
    response.headers["x-trace-id"] = request[REQUEST_TRACE_ID]
    if partial:
        response.headers["Content-Range"] = f"bytes {offset}-{max(offset, end - 1)}/{size}"
    await response.prepare(request)
    return response
