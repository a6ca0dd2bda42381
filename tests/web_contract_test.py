"""The web program's HTTP front in this process, on a real HTTPS port: TLS from
the gateway-style cert settings, API keys (headers, `?key=` into a Secure
HttpOnly cookie), JSON errors for every refusal, the upload limit. No stage is
called: what is checked is what the program does before it calls one."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.gateway_access_system_test import self_signed
from tests.processes import free_port
from web.config import WebSettings
from web.server import build_app, ssl_context

KEY = "web-key-3b9d"


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ssl.SSLContext]]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(folder)
    keys_file = folder / "keys.txt"
    keys_file.write_text("# one key a line\nweb-second-key\n")
    settings = WebSettings(
        http_port=free_port(),
        port=0,
        metrics_port=0,
        api_keys=[KEY],
        api_keys_file=keys_file,
        tls_cert=cert,
        tls_key=key,
        max_upload_bytes=4096,
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(build_app(settings))

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(
            runner, "127.0.0.1", settings.http_port, ssl_context=ssl_context(settings)
        ).start()

    asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    trusted = ssl.create_default_context(cafile=str(cert))
    yield f"https://localhost:{settings.http_port}", trusted
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def call(
    https: tuple[str, ssl.SSLContext],
    path: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    base, context = https
    request = urllib.request.Request(base + path, body, headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def error_of(body: bytes) -> dict[str, str]:
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "code"}
    return dict(error)


def test_https_with_a_key_from_either_source(https) -> None:  # type: ignore[no-untyped-def]
    for headers in (
        {"Authorization": f"Bearer {KEY}"},
        {"x-api-key": "web-second-key"},
        {"Cookie": f"talker_key={KEY}"},
    ):
        status, answer_headers, body = call(https, "/v1/models", headers=headers)
        assert status == 200, body
        assert json.loads(body)["object"] == "list" and answer_headers["x-trace-id"]


def test_plain_http_on_the_tls_port_gets_no_answer(https) -> None:  # type: ignore[no-untyped-def]
    base, _ = https
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(base.replace("https", "http") + "/v1/models", timeout=10).read()


def test_refusals_are_json_with_a_sentence(https) -> None:  # type: ignore[no-untyped-def]
    status, _, body = call(https, "/v1/models")
    assert status == 401 and "needs an API key" in error_of(body)["message"]
    status, _, body = call(https, "/v1/models", headers={"Authorization": "Bearer nope"})
    assert status == 401 and error_of(body)["code"] == "invalid_api_key"
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    status, _, body = call(https, "/v1/chat/completions", "POST", b"{", auth)
    assert status == 400 and "not valid JSON" in error_of(body)["message"]
    status, _, body = call(https, "/v1/chat/completions", "POST", b" " * 5000, auth)
    assert status == 413 and "larger than the 4096 bytes" in error_of(body)["message"]
    status, _, body = call(https, "/v1/models/gpt-9", headers=auth)
    assert status == 404 and "gpt-9" in error_of(body)["message"]
    status, _, body = call(https, "/v1/files/x", "POST", b"", auth)
    assert status == 405


def test_the_page_key_becomes_a_secure_http_only_cookie(https) -> None:  # type: ignore[no-untyped-def]
    _, headers, _ = call(https, f"/?key={KEY}")
    cookie = headers["Set-Cookie"]
    for part in (f"talker_key={KEY}", "HttpOnly", "Secure", "SameSite=Strict"):
        assert part in cookie, cookie
    # Never on the API: a key in a URL ends up in logs and histories.
    status, headers, _ = call(https, f"/v1/models?key={KEY}")
    assert status == 401 and "Set-Cookie" not in headers


def test_tls_settings_must_come_in_pairs(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="both tls_cert and tls_key"):
        ssl_context(WebSettings(tls_cert=tmp_path / "cert.pem"))
    with pytest.raises(SystemExit, match="cannot read the TLS files"):
        ssl_context(WebSettings(tls_cert=tmp_path / "a.pem", tls_key=tmp_path / "b.pem"))
