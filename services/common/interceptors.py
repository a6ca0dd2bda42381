"""The one server interceptor every program runs. For each call it:

- takes the client's `x-trace-id` (or makes one), returns it in the response
  headers and keeps it in a contextvar so every log line carries it;
- refuses application calls with UNAVAILABLE until the model is loaded;
- maps `TalkerError`s raised by engines to status codes with their sentence,
  and anything unexpected to INTERNAL naming the trace id (details logged);
- counts requests, errors, in-flight calls and latency for Prometheus.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from services.common import metrics
from services.common.errors import InvalidInput, TalkerError, retry_trailers, status_code_for
from services.common.tracing import (
    TRACE_METADATA_KEY,
    accept_trace_id,
    current_trace_id,
    trace_id_from_metadata,
)

log = logging.getLogger("talker.rpc")

# Health and reflection answer while the model loads; everything else waits.
ALWAYS_OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
# Response header naming the model that served the call (archive records cite it).
MODEL_METADATA_KEY = "x-talker-model"


class ObservingInterceptor(aio.ServerInterceptor):
    def __init__(self, program: str, is_ready: Callable[[], bool], model_id: str = "") -> None:
        self.program = program
        self.is_ready = is_ready
        self.headers: tuple[tuple[str, str], ...] = (
            ((MODEL_METADATA_KEY, model_id),) if model_id else ()
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        gated = not method.startswith(ALWAYS_OPEN_PREFIXES)
        quiet = method.startswith(ALWAYS_OPEN_PREFIXES)
        call = _ObservedCall(self, method, gated, quiet)
        parse = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                call.wrap_unary(handler.unary_unary), parse, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                call.wrap_stream(handler.unary_stream), parse, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                call.wrap_unary(handler.stream_unary), parse, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            call.wrap_stream(handler.stream_stream), parse, handler.response_serializer
        )


class UndecodableRequest:
    """Stands in for a message that failed to parse (invalid UTF-8 in a string
    field, truncated bytes), so the caller gets INVALID_ARGUMENT with the reason
    instead of grpc's bare INTERNAL "Exception deserializing request"."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def error(self) -> InvalidInput:
        return InvalidInput(
            f"The request could not be decoded ({self.reason}); string fields must be "
            "valid UTF-8 and the message must match the talker.v1 contract."
        )


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as error:  # protobuf raises DecodeError, or others for bad UTF-8
            return UndecodableRequest(str(error) or type(error).__name__)

    return parse


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, UndecodableRequest):
            raise request.error()
        yield request


class _ObservedCall:
    """Wraps one method's behaviour; a new wrapper is built per call."""

    def __init__(self, owner: ObservingInterceptor, method: str, gated: bool, quiet: bool) -> None:
        self.owner = owner
        self.method = method
        self.gated = gated
        self.quiet = quiet

    async def _begin(self, context: aio.ServicerContext) -> str:
        trace_id = accept_trace_id(trace_id_from_metadata(context.invocation_metadata()))
        current_trace_id.set(trace_id)
        await context.send_initial_metadata(((TRACE_METADATA_KEY, trace_id), *self.owner.headers))
        metrics.IN_FLIGHT.labels(self.method).inc()
        if self.gated and not self.owner.is_ready():
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"{self.owner.program} is starting: its model is still loading. "
                "Retry in a few seconds.",
            )
        return trace_id

    async def _fail(self, context: aio.ServicerContext, error: BaseException) -> None:
        """Turn an exception from the behaviour into a status; always raises."""
        if isinstance(error, TalkerError):
            await context.abort(status_code_for(error), str(error), retry_trailers(error))
        trace_id = current_trace_id.get()
        log.error("unexpected error", exc_info=error, extra={"method": self.method})
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"{self.owner.program} failed unexpectedly (trace id {trace_id}); "
            "the details are in its log.",
        )

    def _finish(self, context: aio.ServicerContext, started: float, cancelled: bool) -> None:
        code = grpc.StatusCode.CANCELLED if cancelled else (context.code() or grpc.StatusCode.OK)
        if isinstance(code, int):  # aio may hand back the raw cygrpc integer
            code = _STATUS_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
        elapsed = time.perf_counter() - started
        metrics.IN_FLIGHT.labels(self.method).dec()
        metrics.REQUESTS.labels(self.method, code.name).inc()
        metrics.REQUEST_SECONDS.labels(self.method).observe(elapsed)
        if code is not grpc.StatusCode.OK:
            metrics.ERRORS.labels(self.method, code.name).inc()
        if not self.quiet or code is not grpc.StatusCode.OK:
            details = context.details() if code is not grpc.StatusCode.OK else None
            log.info(
                "call finished",
                extra={
                    "method": self.method,
                    "code": code.name,
                    "duration_ms": round(elapsed * 1000, 2),
                    **({"details": details} if details else {}),
                },
            )

    def wrap_unary(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def observed(request: Any, context: aio.ServicerContext) -> Any:
            started = time.perf_counter()
            cancelled = False
            try:
                await self._begin(context)
                return await behavior(_check_request(request), context)
            except aio.AbortError:
                raise
            except asyncio.CancelledError:
                cancelled = True
                raise
            except Exception as error:
                await self._fail(context, error)
            finally:
                self._finish(context, started, cancelled)

        return observed

    def wrap_stream(self, behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def observed(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            cancelled = False
            try:
                await self._begin(context)
                request = _check_request(request)
                if inspect.isasyncgenfunction(behavior):
                    async for response in behavior(request, context):
                        yield response
                else:  # a coroutine that writes with context.write (grpc's health Watch)
                    await behavior(request, context)
            except aio.AbortError:
                raise
            except (asyncio.CancelledError, GeneratorExit):
                cancelled = True
                raise
            except Exception as error:
                await self._fail(context, error)
            finally:
                self._finish(context, started, cancelled)

        return observed


def _check_request(request: Any) -> Any:
    """A parsed request, or for client streams an iterator that checks each one."""
    if isinstance(request, UndecodableRequest):
        raise request.error()
    if hasattr(request, "__aiter__"):
        return _checked(request)
    return request


_STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}
