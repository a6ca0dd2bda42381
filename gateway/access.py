"""Who may call the gateway: optional TLS, and API keys as
`authorization: Bearer <key>` metadata. Health and reflection stay open so
probes and grpcurl `list` work without a key; they reveal no data."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from gateway.config import GatewaySettings
from services.common.errors import InvalidInput
from services.common.interceptors import ALWAYS_OPEN_PREFIXES

AUTHORIZATION_KEY = "authorization"


class ApiKeyInterceptor(aio.ServerInterceptor):
    def __init__(self, keys: frozenset[str]) -> None:
        self.keys = [key.encode() for key in keys]

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if not self.keys or handler is None:
            return handler
        if handler_call_details.method.startswith(ALWAYS_OPEN_PREFIXES):
            return handler
        reason = self._refusal(handler_call_details.invocation_metadata)
        return handler if reason is None else _refusing(handler, reason)

    def _refusal(self, metadata: Any) -> str | None:
        values = [v for k, v in metadata or () if k == AUTHORIZATION_KEY]
        if not values:
            return "This gateway needs an API key: send `authorization: Bearer <key>` metadata."
        scheme, _, key = str(values[0]).partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return "The authorization metadata must be `Bearer <key>`."
        given = key.strip().encode()
        # Compare with every key, always, so timing does not tell which prefix matched.
        matched = False
        for accepted in self.keys:
            matched |= hmac.compare_digest(given, accepted)
        return None if matched else "The API key is not valid."


def _refusing(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    kind = (
        grpc.unary_unary_rpc_method_handler
        if handler.unary_unary
        else grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.stream_unary_rpc_method_handler
        if handler.stream_unary
        else grpc.stream_stream_rpc_method_handler
    )
    return kind(refuse, handler.request_deserializer, handler.response_serializer)


def server_credentials(settings: GatewaySettings) -> grpc.ServerCredentials | None:
    """TLS from the cert/key settings, or None for plaintext."""
    if settings.tls_cert is None and settings.tls_key is None:
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise InvalidInput("TLS needs both tls_cert and tls_key.")
    try:
        chain = settings.tls_cert.read_bytes()
        key = settings.tls_key.read_bytes()
    except OSError as error:
        raise InvalidInput(f"Cannot read the TLS files: {error}") from None
    return grpc.ssl_server_credentials([(key, chain)])
