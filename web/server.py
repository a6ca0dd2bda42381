"""The web program: an aiohttp application on `http_port` (the page, downloads,
OpenAI-style endpoints) beside a small gRPC server on `port` for grpc.health.v1
and reflection, so the watchdog and the readiness wait treat it like every
other program. `python -m web`.

Every request gets a trace id (the client's `x-trace-id` or a new one, returned
in the `x-trace-id` response header and passed to every gRPC call), is counted
in /metrics, and, when API keys are set, needs one (see `WebSettings.api_keys`).
Errors are JSON bodies `{"error": {"message", "type", "code"}}` (the OpenAI shape),
never an HTML page and never a stack trace.

Other modules plug in at build time: `web.rtc.setup(app, settings, talker)`, when
`web.rtc` exists (see web/gateway_client.py for `talker` and `call_metadata`)."""

from __future__ import annotations

import asyncio
import hmac
import importlib
import logging
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram

from services.common.logs import configure_logging
from services.common.metrics import LATENCY_BUCKETS
from services.common.runtime import GrpcProgram, load_settings, lower_cpu_priority
from services.common.tracing import TRACE_METADATA_KEY, accept_trace_id, current_trace_id
from web.config import WebSettings
from web.errors import HttpError, error_response
from web.gateway_client import CHANNELS, REQUEST_KEY, REQUEST_TRACE_ID, SETTINGS, Channels

log = logging.getLogger("talker.web")

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: The cookie the page's key is kept in after `?key=`.
KEY_COOKIE = "talker_key"

HTTP_REQUESTS = Counter(
    "talker_http_requests_total",
    "HTTP requests answered, by route and status.",
    ["route", "status"],
)
HTTP_SECONDS = Histogram(
    "talker_http_request_duration_seconds",
    "Wall time of an HTTP request until its handler returned (a stream: until it ended).",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
HTTP_IN_FLIGHT = Gauge("talker_http_in_flight", "HTTP requests being served now.")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route_name(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource if info.route is not None else None
    # The pattern, not the path: ids in paths must not blow up the label set.
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Trace id, metrics, a log line, and JSON for every error (outermost)."""
    trace_id = accept_trace_id(request.headers.get(TRACE_METADATA_KEY))
    request[REQUEST_TRACE_ID] = trace_id
    token = current_trace_id.set(trace_id)
    route = _route_name(request)
    started = time.perf_counter()
    status = "aborted"  # until a response exists: the client went away first
    HTTP_IN_FLIGHT.inc()
    try:
        try:
            response = await handler(request)
        except HttpError as error:
            response = error_response(
                error.status, str(error), error.code, error.param, error.retry_after_s
            )
        except web.HTTPRequestEntityTooLarge:
            limit = request.app[SETTINGS].max_upload_bytes
            response = error_response(
                413,
                f"The request body is larger than the {limit} bytes this server accepts "
                f"(TALKER_WEB_MAX_UPLOAD_BYTES). Send a shorter file.",
                "request_too_large",
            )
        except web.HTTPException as error:
            if error.status >= 400:
                response = error_response(error.status, _http_sentence(request, error))
            else:
                raise
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unexpected error serving a request", extra={"path": request.path})
            response = error_response(
                500,
                f"The web program failed unexpectedly; the log has the details under "
                f"trace id {trace_id}.",
                "internal_error",
            )
        if not response.prepared:
            response.headers[TRACE_METADATA_KEY] = trace_id
        status = str(response.status)
        return response
    finally:
        HTTP_IN_FLIGHT.dec()
        HTTP_REQUESTS.labels(route, status).inc()
        HTTP_SECONDS.labels(route).observe(time.perf_counter() - started)
        log.info(
            "http",
            extra={
                "method": request.method,
                "path": request.path,
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )
        current_trace_id.reset(token)


def _http_sentence(request: web.Request, error: web.HTTPException) -> str:
    if error.status == 404:
        return f"There is nothing at {request.path}."
    if error.status == 405:
        return f"{request.method} is not allowed on {request.path}."
    return error.text or error.reason


def _is_page(request: web.Request) -> bool:
    """The page and its files (not the API): where `?key=` may be given."""
    return request.method in ("GET", "HEAD") and not request.path.startswith("/v1/")


def auth_middleware(keys: frozenset[str], secure_cookie: bool) -> Any:
    accepted = [key.encode() for key in keys]

    def valid(given: str) -> bool:
        # Compare with every key, always, so timing does not tell which prefix matched.
        matched = False
        for key in accepted:
            matched |= hmac.compare_digest(given.encode(), key)
        return matched

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not accepted:
            request[REQUEST_KEY] = None
            return await handler(request)
        from_query = request.query.get("key", "") if _is_page(request) else ""
        given, where = _presented_key(request, from_query)
        if not given:
            raise HttpError(
                401,
                "This server needs an API key: send `Authorization: Bearer <key>` or "
                "`x-api-key: <key>` (in a browser, open the page once with `?key=<key>`).",
                "missing_api_key",
            )
        if not valid(given):
            raise HttpError(401, f"The API key given in {where} is not valid.", "invalid_api_key")
        request[REQUEST_KEY] = given
        try:
            response = await handler(request)
        except HttpError as error:  # the key was good: keep it even if the page failed
            response = error_response(
                error.status, str(error), error.code, error.param, error.retry_after_s
            )
        if where == "the key query parameter" and not response.prepared:
            # The browser's later fetches (and the WebRTC offer) carry it without script access.
            response.set_cookie(
                KEY_COOKIE, given, httponly=True, samesite="Strict", secure=secure_cookie, path="/"
            )
        return response

    return authenticate


def _presented_key(request: web.Request, from_query: str) -> tuple[str, str]:
    """The key a request carries and where it was found: header, then query, then cookie."""
    authorization = request.headers.get("Authorization", "")
    if authorization:
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise HttpError(
                401, "The Authorization header must be `Bearer <key>`.", "invalid_api_key"
            )
        return key.strip(), "the Authorization header"
    if request.headers.get("x-api-key", "").strip():
        return request.headers["x-api-key"].strip(), "the x-api-key header"
    if from_query:
        return from_query, "the key query parameter"
    if request.cookies.get(KEY_COOKIE):
        return request.cookies[KEY_COOKIE], f"the {KEY_COOKIE} cookie"
    return "", ""


async def index(request: web.Request) -> web.StreamResponse:
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        raise HttpError(404, "The page is not installed (web/static/index.html is missing).")
    return web.FileResponse(page, headers={"Cache-Control": "no-cache"})


def build_app(settings: WebSettings) -> web.Application:
    """The aiohttp application: middlewares, the API routes, the rtc hook, the page."""
    keys = settings.accepted_keys()
    app = web.Application(
        middlewares=[observe, auth_middleware(keys, secure_cookie=settings.tls_cert is not None)],
        client_max_size=settings.max_upload_bytes,
    )
    channels = Channels(settings)
    app[SETTINGS] = settings
    app[CHANNELS] = channels

    async def close_channels(app: web.Application) -> None:
        await channels.close()

    app.on_cleanup.append(close_channels)
    for module_name in ("web.downloads", "web.openai_api"):
        module = _optional_module(module_name)
        if module is not None:
            module.add_routes(app)
    rtc = _optional_module("web.rtc")
    if rtc is not None:
        rtc.setup(app, settings, channels.talker)
    app.router.add_get("/", index)
    if STATIC_DIR.is_dir():
        # Under /static/, not /: a static resource at / answers every unknown path
        # itself, with an empty 404 instead of the JSON error.
        app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
    return app


def _optional_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name:
            raise  # the module is there but something it imports is missing: say so
        return None


def ssl_context(settings: WebSettings) -> ssl.SSLContext | None:
    """HTTPS from the cert/key settings (the gateway's), or None for plain HTTP."""
    if settings.tls_cert is None and settings.tls_key is None:
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise SystemExit("web: invalid setting: TLS needs both tls_cert and tls_key.")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as error:
        raise SystemExit(f"web: cannot read the TLS files: {error}") from None
    return context


async def serve(settings: WebSettings) -> None:
    """HTTP first, then the health server, which reports SERVING at once: the
    program can take requests as soon as it listens (a stage that is down is
    named in the answer of the request that needs it, and must not get this
    program restarted by the watchdog)."""
    context = ssl_context(settings)
    runner = web.AppRunner(
        build_app(settings), access_log=None, shutdown_timeout=settings.grace_period_s
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.http_port, ssl_context=context)
    await site.start()
    scheme = "https" if context is not None else "http"
    log.info("http listening", extra={"url": f"{scheme}://{settings.host}:{settings.http_port}/"})
    program = GrpcProgram(settings, [], lambda server: None, lambda: None, on_stop=runner.cleanup)
    await program.run_until_terminated()


def main(argv: list[str] | None = None) -> None:
    configure_logging(WebSettings.program)
    settings = load_settings(WebSettings, sys.argv[1:] if argv is None else argv)
    logging.getLogger().setLevel(settings.log_level.upper())
    lower_cpu_priority(settings.cpu_niceness)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
