"""The page: browser to browser, from the end of a spoken question to the first
sound of the reply heard in the page, over WebRTC through the web program,
beside a device on the gateway's own gRPC stream asking the same questions with
the same conversation settings, in one run.

Page: Debian's chromium, headless, its microphone fed the questions one at a
time (each once the last reply has been heard to its end, then 0.3 s). The
page times both ends itself with WebAudio analysers on its microphone and on
the received reply (web/static/app.js, `talker.heard`): the last moment the
microphone carried sound, and the first moment the reply did.

Gateway: the gateway bench's device (tests/device.py, bench/gateway_bench.py's
pieces), from the last audible sample sent to the first reply audio chunk
received, in a Converse configured as the page's (web.rtc.converse_config).
The difference is what the web program, WebRTC (Opus, VP8, jitter buffers) and
real-time playout add."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench.gateway_bench import QUESTIONS, listened
from bench.system import running_system
from bench.tables import percentile, print_table
from talker.v1 import talker_pb2_grpc
from tests.browser import (
    MIXED_MICROPHONE_JS,
    WAV_RATE_HZ,
    chromium,
    events,
    say,
    spoken_wav,
    start_talking,
    wait_for_event,
)
from tests.device import converse, pause, speech, wait_for
from tests.speech import piper_speech, silence, speech_end_s
from web.rtc import converse_config

TURNS = int(os.environ.get("TALKER_BENCH_WEB_TURNS", "10"))
TURN_TIMEOUT_S = 240


def trimmed(text: str, rate_hz: int) -> np.ndarray:
    """A question that ends exactly at its last audible sample."""
    audio = piper_speech(text, rate_hz)
    return audio[: int(speech_end_s(audio, rate_hz) * rate_hz)]


def through_gateway(address: str, avatar_id: str) -> tuple[list[float], int]:
    stub = talker_pb2_grpc.TalkerServiceStub(grpc.insecure_channel(address))
    config = converse_config(avatar_id, "", "", 3600)
    steps: list = [pause(silence(0.5))]
    for n in range(TURNS):
        steps.append(speech(trimmed(QUESTIONS[n % len(QUESTIONS)], 16_000)))
        steps += [wait_for(listened(n), TURN_TIMEOUT_S), pause(silence(0.3))]
    session = converse(stub, config, steps, trace_id="bench-web-gateway", timeout_s=3600)
    if session.error is not None:
        raise SystemExit(f"web bench: the gateway conversation failed: {session.error}")
    latencies = []
    for n, speech_end in enumerate(session.speech_ends):
        audio = session.of("reply_audio", n)
        if audio:
            latencies.append((audio[0].at - speech_end) * 1000)
    return latencies, len(session.of("turn_finished"))


def through_the_page(url: str, avatar_id: str) -> tuple[list[float], list[float], int]:
    """ms from the end of speech to the first reply sound heard, per turn, as the
    page measured them; and the gateway's own first_audio_ms of those turns."""
    with tempfile.TemporaryDirectory(prefix="talker-bench-web-") as folder:
        microphone = Path(folder) / "quiet.wav"
        spoken_wav(microphone, [5.0])  # the questions come through `say`
        with chromium(microphone) as browser:
            page = browser.new_page(viewport={"width": 1180, "height": 820})
            page.add_init_script(MIXED_MICROPHONE_JS)
            page.goto(url)
            start_talking(page, avatar_id)
            wait_for_event(page, "e.type === 'state' && e.state === 'listening'", 60)
            page.wait_for_timeout(500)
            for n in range(TURNS):
                say(page, trimmed(QUESTIONS[n % len(QUESTIONS)], WAV_RATE_HZ))
                wait_for_event(
                    page,
                    f"e.turn === {n} && ['finished', 'error', 'interrupted'].includes(e.type)",
                    TURN_TIMEOUT_S,
                )
                # As a person would: the next question once the reply was heard out.
                page.wait_for_function(
                    "() => window.talker.state === 'listening'", timeout=TURN_TIMEOUT_S * 1000
                )
                page.wait_for_timeout(300)
            heard = page.evaluate("() => window.talker.heard")
            finished = events(page, "finished")
    latencies = [
        entry["at"] - entry["lastSpeechAt"] for entry in heard if entry["lastSpeechAt"] is not None
    ]
    server = [float(e["timings"]["first_audio_ms"]) for e in finished]
    return latencies, server, len(finished)


def main() -> None:
    with running_system() as (system, avatar_id):
        started = time.monotonic()
        gateway_ms, gateway_done = through_gateway(system.addresses["gateway"], avatar_id)
        page_ms, server_ms, page_done = through_the_page(system.web_url, avatar_id)
        elapsed = time.monotonic() - started
    load = os.getloadavg()
    rows = [
        ["page (WebRTC): end of speech -> first reply sound heard", len(page_ms),
         percentile(page_ms, 50), percentile(page_ms, 95)],
        ["  gateway's own first_audio_ms of the page's turns (from end of utterance)",
         len(server_ms), percentile(server_ms, 50), percentile(server_ms, 95)],
        ["gateway device (gRPC): end of speech -> first audio chunk", len(gateway_ms),
         percentile(gateway_ms, 50), percentile(gateway_ms, 95)],
    ]  # fmt: skip
    print_table(
        f"Browser round trip vs the gateway's device, same {TURNS} questions and settings "
        f"({page_done}/{TURNS} page turns and {gateway_done}/{TURNS} gateway turns finished)",
        ["path", "turns", "p50 ms", "p95 ms"],
        rows,
    )
    if gateway_ms and page_ms:
        p50 = percentile(page_ms, 50) / percentile(gateway_ms, 50)
        extra = percentile(page_ms, 50) - percentile(gateway_ms, 50)
        print(
            f"\npage / gateway p50: {p50:.2f}x ({extra:+.0f} ms: the web program, WebRTC and "
            f"playout). Load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; "
            f"{elapsed:.0f} s."
        )


if __name__ == "__main__":
    main()
