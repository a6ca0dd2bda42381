"""The page in a real browser (Debian's chromium, headless): a spoken question
from its fake microphone goes over WebRTC to the web program, into the
gateway's Converse, and the portrait answers on the page: the transcript and
the reply show, video frames arrive and change around the mouth, reply audio
arrives (WebRTC getStats) and is heard (the page's own analyser); speaking over
the reply cuts it and the new question is answered. Every program runs under
the real supervisord."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gateway.samples import portrait
from tests.browser import (
    ARTIFACTS,
    INBOUND_STATS_JS,
    MIXED_MICROPHONE_JS,
    SAMPLE_FRAMES_JS,
    chromium,
    events,
    face_changes,
    kill_chromium,
    open_page,
    say,
    spoken_wav,
    start_talking,
    wait_for_event,
)
from tests.portrait import create_astronaut
from tests.processes import REPO, VENV_BIN, free_port, metric
from tests.speech import normalise, piper_speech

# Long enough that an interim falls due with language auto (1.5 s of speech to
# detect it on): "What is the capital of France?" alone sometimes ended first.
QUESTION = "Could you please tell me what the capital city of France is?"
STORY = "Tell me a long story about a dragon and a brave knight."
SECOND = "How many legs does a spider have?"
# A turn on a loaded 2-core host: ASR, chat, speech and animation in turn.
TURN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def avatar(system) -> dict:  # type: ignore[no-untyped-def]
    avatar_id = create_astronaut(system.addresses["animate"])
    with urllib.request.urlopen(f"{system.web_url}/rtc/options", timeout=30) as response:
        options = json.load(response)
    [found] = [a for a in options["avatars"] if a["avatar_id"] == avatar_id]
    return found


def face_box(avatar: dict) -> dict:
    return {**avatar["face_box"], "frame_width": avatar["width"], "frame_height": avatar["height"]}


def test_the_page_hears_a_spoken_question_and_the_portrait_answers(
    system, avatar, tmp_path: Path
) -> None:
    microphone = tmp_path / "question.wav"
    spoken_wav(microphone, [1.0, QUESTION, 40.0])
    with chromium(microphone) as browser:
        page = open_page(browser, system.web_url)
        start_talking(page, avatar["avatar_id"])
        page.wait_for_function(
            "() => document.getElementById('avatar').videoWidth > 0", timeout=60_000
        )
        page.evaluate(SAMPLE_FRAMES_JS, face_box(avatar))
        wait_for_event(page, "e.type === 'transcript' && !e.final", TURN_TIMEOUT_S)
        wait_for_event(page, "e.type === 'finished'", TURN_TIMEOUT_S)
        # The reply is played out in real time after it was made: let it finish.
        page.wait_for_function(
            "() => window.talker.state === 'listening' && window.talker.heard.length > 0",
            timeout=120_000,
        )
        page.wait_for_timeout(500)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web_page.png"))
        got = events(page)
        stats = page.evaluate(INBOUND_STATS_JS)
        samples = page.evaluate("() => window.faceSamples")
        shown_user = page.inner_text("#log li.user")
        shown_reply = page.inner_text("#log li.avatar")
        heard = page.evaluate("() => window.talker.heard")
        trace_id = page.evaluate("() => window.talker.traceId")

    finals = [e["text"] for e in got if e["type"] == "transcript" and e["final"] and e["text"]]
    finished = [e for e in got if e["type"] == "finished"]
    states = [e["state"] for e in got if e["type"] == "state"]
    # The question's transcript and a reply appeared, on the page itself.
    assert "capital" in normalise(finals[0]), finals
    assert normalise(shown_user) == normalise(finals[0])
    assert finished and finished[0]["reply_text"].strip()
    assert shown_reply.strip() == finished[0]["reply_text"].strip()
    assert states[:1] == ["listening"] and "thinking" in states and "speaking" in states, states
    # Video frames arrived, and the mouth moved (the forehead, moving with the head, less).
    assert stats["video"]["framesDecoded"] > 50, stats["video"]
    [first_audio] = [e for e in got if e["type"] == "audio"][:1]
    mouth, forehead = face_changes(samples, first_audio["at"])
    print(f"mouth brightness varied {mouth:.1f}, forehead {forehead:.1f} grey levels")
    assert mouth > 10 and mouth > 3 * forehead, (mouth, forehead)
    # Audio samples arrived, with sound in them, and the page heard the reply.
    audio = stats["audio"]
    assert audio["totalSamplesReceived"] > 48_000, audio
    assert audio["totalAudioEnergy"] > 0.01, audio
    assert heard and heard[0]["lastSpeechAt"] is not None, heard
    assert heard[0]["at"] > heard[0]["lastSpeechAt"], heard
    # Lips and voice together: the mouth starts to move when the sound starts. Loose
    # bounds: on a loaded host the browser's audio buffer grows by ~0.5 s at times
    # (see VIDEO_LEAD_MS); a reply's frames shown a second off would fail.
    opened = mouth_opens_at(samples, first_audio["at"])
    print(f"mouth moved {opened - heard[0]['at']:+.0f} ms from the first sound heard")
    assert abs(opened - heard[0]["at"]) < 800, (opened, heard[0])
    # One trace id from the page's offer through the gateway to the reply's stages.
    assert trace_id
    for program in ("web", "gateway", "chat", "synthesize", "animate"):
        assert trace_id in system.log(program), program
    # The browser is gone: its session was cleaned up.
    wait_until_no_sessions(system.web_url)


def mouth_opens_at(samples: list[dict], since_ms: float, grey_levels: float = 4) -> float:
    """When the mouth region first differs from the face at rest by `grey_levels`."""
    rest = np.mean([s for s in samples if s["at"] < since_ms][-1]["mouth"])
    moved = [
        s["at"]
        for s in samples
        if s["at"] >= since_ms and abs(np.mean(s["mouth"]) - rest) > grey_levels
    ]
    assert moved, "the mouth never moved"
    return float(moved[0])


def wait_until_no_sessions(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with urllib.request.urlopen(f"{url}/rtc/options", timeout=30) as response:
            live = json.load(response)["sessions"]["live"]
        if not live:
            return
        assert time.monotonic() < deadline, f"{live} sessions still live after the page went"
        time.sleep(0.5)


def test_speaking_over_the_reply_cuts_it_and_the_new_question_is_answered(
    system, avatar, tmp_path: Path
) -> None:
    microphone = tmp_path / "story.wav"
    spoken_wav(microphone, [1.0, STORY, 120.0])
    with chromium(microphone) as browser:
        page = browser.new_page(viewport={"width": 1180, "height": 760})
        page.add_init_script(MIXED_MICROPHONE_JS)
        page.on("console", lambda message: print(f"[page {message.type}] {message.text}"))
        page.goto(system.web_url)
        start_talking(page, avatar["avatar_id"])
        wait_for_event(page, "e.type === 'state' && e.state === 'speaking'", TURN_TIMEOUT_S)
        page.wait_for_timeout(1500)  # well into the story
        say(page, piper_speech(SECOND, 48_000))
        wait_for_event(page, "e.type === 'barge_in' || e.type === 'interrupted'", 60)
        wait_for_event(page, "e.type === 'finished' && e.turn >= 1", TURN_TIMEOUT_S)
        got = events(page)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web_barge_in.png"))
        cut_reply = page.evaluate(
            "() => [...document.querySelectorAll('#log li.avatar.cut')].map((li) => li.textContent)"
        )

    finals = [e for e in got if e["type"] == "transcript" and e["final"] and e["text"].strip()]
    assert "dragon" in normalise(finals[0]["text"]), finals
    cut = [e for e in got if e["type"] in ("barge_in", "interrupted")]
    assert cut[0]["turn"] == finals[0]["turn"], cut
    # The story did not play to its end: the cut came before its turn finished
    # playing, and the second question became its own answered turn.
    [answered] = [e for e in got if e["type"] == "finished" and e["turn"] > finals[0]["turn"]]
    assert "spider" in normalise(answered["user_text"]), answered
    assert answered["reply_text"].strip()
    assert cut_reply, "the cut reply is not marked on the page"


def post_offer(url: str, body: object) -> tuple[int, str]:
    request = urllib.request.Request(
        f"{url}/rtc/offer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["error"]["message"]


def test_bad_offers_are_refused_with_a_reason(system, avatar) -> None:
    def post(body: object) -> tuple[int, str]:
        return post_offer(system.web_url, body)

    assert post({"type": "offer", "avatar_id": avatar["avatar_id"]}) == (400, "`sdp` is required.")
    status, message = post({"sdp": "v=0", "type": "offer", "avatar_id": "no-such-face"})
    assert status == 404 and "avatar" in message.lower(), message
    status, message = post({"sdp": "not sdp", "type": "offer", "avatar_id": avatar["avatar_id"]})
    assert status == 400 and "SDP" in message, message
    status, message = post([1, 2])
    assert status == 400 and "JSON object" in message
    status, message = post({"sdp": "v=0", "type": "answer", "avatar_id": avatar["avatar_id"]})
    assert status == 400 and '"offer"' in message


@contextmanager
def web_program(  # type: ignore[no-untyped-def]
    system, log_path: Path, **settings: str
) -> Iterator[tuple[str, subprocess.Popen]]:
    """A second web program in front of the same gateway, with these TALKER_WEB_ settings;
    yields its URL and its process."""
    port = int(settings.pop("http_port", free_port()))
    env = {
        **system.env,
        "TALKER_WEB_HTTP_PORT": str(port),
        "TALKER_WEB_PORT": str(free_port()),
        "TALKER_WEB_METRICS_PORT": "0",
        **{f"TALKER_WEB_{name.upper()}": value for name, value in settings.items()},
    }
    log = log_path.open("wb")
    process = subprocess.Popen(
        [str(VENV_BIN / "python"), "-m", "web"], env=env, cwd=REPO, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(log_path.read_text()) from None
                time.sleep(0.3)
        yield url, process
    finally:
        process.terminate()
        process.wait(30)
        log.close()


@pytest.fixture()
def limited_web(system, tmp_path: Path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """Allowed one session of 8 s and uploads of 64 KiB."""
    with web_program(
        system, tmp_path / "web.log", max_sessions="1", max_session_s="8", max_upload_bytes="65536"
    ) as (url, _):
        yield url


def test_sessions_over_the_limits_are_refused_and_ended_with_a_reason(
    limited_web, avatar, tmp_path: Path
) -> None:
    microphone = tmp_path / "quiet.wav"
    spoken_wav(microphone, [30.0])
    with chromium(microphone) as browser:
        page = open_page(browser, limited_web)
        start_talking(page, avatar["avatar_id"])
        wait_for_event(page, "e.type === 'started'", 60)
        # One live session is the most: a second offer is refused, and says why.
        status, message = post_offer(
            limited_web, {"sdp": "v=0", "type": "offer", "avatar_id": avatar["avatar_id"]}
        )
        assert status == 503 and "TALKER_WEB_MAX_SESSIONS=1" in message, (status, message)
        # The live one ends at its length limit, with the sentence on the page.
        page.wait_for_function("() => window.talker.state === 'error'", timeout=60_000)
        shown = page.inner_text("#state")
        assert "limit of 8 s" in shown, shown
        page.screenshot(path=str(tmp_path / "limit.png"))
    # Its place is free again.
    wait_until_no_sessions(limited_web, 15)
    # A portrait over the upload limit, sent as the page sends it (multipart).
    boundary = "talker-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="portrait"; '
            f'filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        + portrait()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{limited_web}/rtc/avatars",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        urllib.request.urlopen(request, timeout=60)
        raise AssertionError("a portrait over the upload limit was taken")
    except urllib.error.HTTPError as error:
        status, message = error.code, json.loads(error.read())["error"]["message"]
    assert status == 413 and "TALKER_WEB_MAX_UPLOAD_BYTES" in message, (status, message)


def gateway_conversations(system) -> float:  # type: ignore[no-untyped-def]
    """Converse calls holding a gateway slot now (its /metrics)."""
    return metric(
        system.metrics_ports["gateway"], "talker_gateway_conversations_active", kind="converse"
    )


def session_endings(log: Path) -> list[str]:
    """Why each browser session ended, in the order they did, from a web program's log."""
    lines = log.read_text().splitlines()
    return [json.loads(line)["why"] for line in lines if '"webrtc session ending"' in line]


def listening_page(browser, url: str, avatar_id: str):  # type: ignore[no-untyped-def]
    """A page of the web program at `url` in a live conversation with the avatar."""
    page = open_page(browser, url)
    start_talking(page, avatar_id)
    wait_for_event(page, "e.type === 'state' && e.state === 'listening'", 60)
    return page


def test_a_page_that_vanishes_without_a_goodbye_frees_its_place(
    system, avatar, tmp_path: Path
) -> None:
    """A crashed tab or a lost network sends no "bye" and closes nothing; the session
    ends once the page's microphone audio stops (TALKER_WEB_PAGE_GONE_AFTER_S, 10 s),
    not at WebRTC's consent check (25-35 s): its gateway slot and its one place are
    free again, and a new page gets that place."""
    microphone = tmp_path / "quiet.wav"
    spoken_wav(microphone, [60.0])
    log = tmp_path / "web.log"
    with web_program(system, log, max_sessions="1") as (url, _):
        with chromium(microphone) as browser:
            listening_page(browser, url, avatar["avatar_id"])
            assert gateway_conversations(system) >= 1
            assert kill_chromium(microphone) >= 2
            killed = time.monotonic()
            wait_until_no_sessions(url, 60)
            print(f"the vanished page's session ended {time.monotonic() - killed:.1f} s after")
        ended = session_endings(log)
        assert ended == ["the page sent no microphone audio for 10 s: it is gone"], ended
        assert gateway_conversations(system) == 0
        with chromium(microphone) as browser:
            listening_page(browser, url, avatar["avatar_id"])


def test_a_page_whose_audio_stops_is_ended_and_says_so(system, avatar, tmp_path: Path) -> None:
    """A page that stops sending audio (here its sender's track is taken away) is ended
    as gone, without a word to it; the page sees its data channel close and says so."""
    microphone = tmp_path / "quiet.wav"
    spoken_wav(microphone, [60.0])
    log = tmp_path / "web.log"
    with (
        web_program(system, log, page_gone_after_s="3") as (url, _),
        chromium(microphone) as browser,
    ):
        page = listening_page(browser, url, avatar["avatar_id"])
        page.evaluate(
            "() => window.talker.pc.getSenders()"
            ".find((s) => s.track?.kind === 'audio').replaceTrack(null)"
        )
        page.wait_for_function("() => window.talker.state === 'error'", timeout=60_000)
        shown = page.inner_text("#state")
        assert shown == "Error: The server ended the conversation.", shown
        ended = session_endings(log)
        assert ended == ["the page sent no microphone audio for 3 s: it is gone"], ended


@pytest.mark.parametrize(
    ("stop", "shown_then"),
    [
        # supervisord's stop, the watchdog's graceful restart: the page is told at once.
        ("SIGTERM", "Error: The server is restarting; the page will reconnect in a few seconds."),
        # The watchdog's answer to a hung program: the page finds out when its connection fails.
        ("SIGKILL", "Error: The connection to the server was lost."),
    ],
)
def test_a_page_talks_again_by_itself_once_its_web_program_is_back(
    stop: str, shown_then: str, system, avatar, tmp_path: Path
) -> None:
    """A stopped or killed web program leaves its page with a sentence, not a page
    waiting in silence; once the program is back on its port, the page talks again."""
    microphone = tmp_path / "quiet.wav"
    spoken_wav(microphone, [180.0])
    with (
        web_program(system, tmp_path / "web.log") as (url, process),
        chromium(microphone) as browser,
    ):
        page = listening_page(browser, url, avatar["avatar_id"])
        first = page.evaluate("() => window.talker.traceId")
        process.send_signal(getattr(signal, stop))
        assert process.wait(30) == (0 if stop == "SIGTERM" else -signal.SIGKILL)
        stopped = time.monotonic()
        page.wait_for_function("() => window.talker.state === 'error'", timeout=120_000)
        print(f"{stop}: the page said so {time.monotonic() - stopped:.1f} s later")
        assert page.inner_text("#state") == shown_then
        # As supervisord would: the program again, on the same port.
        port = url.rsplit(":", 1)[1]
        with web_program(system, tmp_path / "web-again.log", http_port=port):
            page.wait_for_function("() => window.talker.state === 'listening'", timeout=60_000)
            print(f"{stop}: and was listening again {time.monotonic() - stopped:.1f} s later")
            again = page.evaluate("() => window.talker.traceId")
            assert again and again != first
            page.screenshot(path=str(tmp_path / "reconnected.png"))


def test_a_conversation_the_gateway_refuses_shows_its_sentence_on_the_page(
    system, avatar, tmp_path: Path
) -> None:
    microphone = tmp_path / "quiet.wav"
    spoken_wav(microphone, [10.0])
    with chromium(microphone) as browser:
        page = open_page(browser, system.web_url)
        page.wait_for_selector("#voice-select option", state="attached")
        # A voice the page does not list (deleted since it loaded, say).
        page.evaluate(
            """() => document.getElementById("voice-select")
                 .append(new Option("gone", "no-such-voice", true, true))"""
        )
        start_talking(page, avatar["avatar_id"])
        page.wait_for_function("() => window.talker.state === 'error'", timeout=60_000)
        shown = page.inner_text("#state")
        [error] = [e for e in events(page, "error") if e["fatal"]]
    assert shown == f"Error: {error['message']}"
    assert "no-such-voice" in shown, shown


def test_a_portrait_uploaded_on_the_page_becomes_the_avatar_or_is_refused_with_the_reason(
    system, tmp_path: Path
) -> None:
    good = tmp_path / "my-face.png"
    good.write_bytes(portrait())
    blank = tmp_path / "wall.png"
    Image.new("RGB", (400, 400), (200, 190, 180)).save(blank)
    microphone = tmp_path / "quiet.wav"
    spoken_wav(microphone, [5.0])
    with chromium(microphone) as browser:
        page = open_page(browser, system.web_url)
        page.wait_for_selector("#voice-select option", state="attached")
        page.set_input_files("#portrait", str(blank))
        page.wait_for_selector("#log li.note.error", timeout=120_000)
        refusal = page.inner_text("#log li.note.error")
        page.set_input_files("#portrait", str(good))
        page.wait_for_function(
            "() => [...document.querySelectorAll('#avatar-select option')]"
            ".some((o) => o.selected && o.textContent === 'my-face')",
            timeout=120_000,
        )
        chosen = page.eval_on_selector("#avatar-select", "(s) => s.value")
    assert refusal.startswith("The portrait was not accepted: "), refusal
    assert "face" in refusal.lower(), refusal
    with urllib.request.urlopen(f"{system.web_url}/rtc/options", timeout=30) as response:
        listed = {a["avatar_id"]: a["name"] for a in json.load(response)["avatars"]}
    assert listed[chosen] == "my-face"


def test_bad_uploads_are_refused_with_a_reason(system) -> None:
    def post(body: bytes) -> tuple[int, str]:
        request = urllib.request.Request(
            f"{system.web_url}/rtc/avatars?name=x", data=body, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())["error"]["message"]

    status, message = post(b"")
    assert status == 400 and "No portrait came" in message, (status, message)
    status, message = post(b"this is not an image")
    assert status == 400 and "image" in message.lower(), (status, message)
