"""The web program's gRPC channels: one shared channel to the gateway (the page's
WebRTC bridge and the downloads go through it) and one to each stage the
OpenAI-style endpoints call directly.

Interface for web/rtc.py (and any other module of this program):

    talker() -> talker_pb2_grpc.TalkerServiceStub
        the zero-arg callable `web.rtc.setup(app, settings, talker)` receives; the
        stub rides one grpc.aio channel shared by the whole program. Call it inside
        the running event loop (the channel is made on first use there).
    call_metadata(request_or_key, trace_id) -> list[tuple[str, str]]
        the metadata of a gateway call made for an HTTP request: `x-trace-id`, and
        `authorization: Bearer <key>` with the key the request was let in with (an
        aiohttp `web.Request`), or the key given (a str), else the configured
        `gateway_api_key`, else no key. Pass it as `metadata=` on every call.
"""

from __future__ import annotations

from typing import Any

import grpc
from aiohttp import web
from grpc import aio

from services.common.runtime import channel_options
from services.common.tracing import TRACE_METADATA_KEY
from talker.v1 import asr_pb2_grpc, chat_pb2_grpc, synthesize_pb2_grpc, talker_pb2_grpc
from web.config import WebSettings

#: Where the auth middleware leaves the key a request was let in with.
REQUEST_KEY = "talker_api_key"
#: Where the trace middleware leaves the request's trace id.
REQUEST_TRACE_ID = "talker_trace_id"


class Channels:
    """The program's grpc.aio channels, made on first use inside the running loop."""

    def __init__(self, settings: WebSettings) -> None:
        self.settings = settings
        self._channels: dict[str, aio.Channel] = {}

    def channel(self, program: str) -> aio.Channel:
        if program not in self._channels:
            address = self.settings.address_of(program)
            options = channel_options(self.settings)
            if program == "gateway" and self.settings.gateway_tls_ca is not None:
                credentials = grpc.ssl_channel_credentials(
                    self.settings.gateway_tls_ca.read_bytes()
                )
                self._channels[program] = aio.secure_channel(address, credentials, options=options)
            else:
                self._channels[program] = aio.insecure_channel(address, options=options)
        return self._channels[program]

    def talker(self) -> talker_pb2_grpc.TalkerServiceStub:
        return talker_pb2_grpc.TalkerServiceStub(self.channel("gateway"))

    def asr(self) -> asr_pb2_grpc.AsrServiceStub:
        return asr_pb2_grpc.AsrServiceStub(self.channel("asr"))

    def chat(self) -> chat_pb2_grpc.ChatServiceStub:
        return chat_pb2_grpc.ChatServiceStub(self.channel("chat"))

    def synthesize(self) -> synthesize_pb2_grpc.SynthesizeServiceStub:
        return synthesize_pb2_grpc.SynthesizeServiceStub(self.channel("synthesize"))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


#: App keys: the program's settings and its channels.
SETTINGS = web.AppKey("talker_settings", WebSettings)
CHANNELS = web.AppKey("talker_channels", Channels)


def call_metadata(request_or_key: web.Request | str | None, trace_id: str) -> list[tuple[str, str]]:
    """Metadata of a downstream call made for an HTTP request (see the module docstring)."""
    key: Any = request_or_key
    if isinstance(request_or_key, web.Request):
        key = request_or_key.get(REQUEST_KEY) or request_or_key.app[SETTINGS].gateway_api_key
    metadata = [(TRACE_METADATA_KEY, trace_id)]
    if key:
        metadata.append(("authorization", f"Bearer {key}"))
    return metadata
