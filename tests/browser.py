"""Debian's chromium, headless, driven by Playwright, hearing a WAV file as its
microphone: for the browser tests and `python -m bench web`.

Playwright's own browser downloads are never used: it drives /usr/bin/chromium
(`make system-deps`) over CDP."""

from __future__ import annotations

import base64
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tests.speech import piper_speech, silence, to_wav

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
#: Where browser tests keep what a person may want to look at (screenshots).
ARTIFACTS = Path(os.environ.get("TALKER_TEST_ARTIFACTS", REPO / "var" / "test-artifacts"))
#: Chrome's fake microphone takes WAV at any rate; 48 kHz is what it captures at.
WAV_RATE_HZ = 48_000

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]


def spoken_wav(path: Path, parts: list[str | float]) -> list[float]:
    """Writes a WAV of the parts in order: a string is spoken (Piper's joe voice),
    a number is that many seconds of silence. Returns where each spoken part ends
    in the file, in seconds."""
    pieces: list[np.ndarray] = []
    ends: list[float] = []
    samples = 0
    for part in parts:
        audio = silence(part, WAV_RATE_HZ) if isinstance(part, float | int) else None
        if audio is None:
            audio = piper_speech(str(part), WAV_RATE_HZ)
        pieces.append(audio)
        samples += len(audio)
        if not isinstance(part, float | int):
            ends.append(samples / WAV_RATE_HZ)
    path.write_bytes(to_wav(np.concatenate(pieces), WAV_RATE_HZ))
    return ends


@contextmanager
def chromium(microphone: Path) -> Iterator[Any]:
    """A headless chromium whose microphone plays `microphone` once (then silence)."""
    from playwright.sync_api import sync_playwright

    if shutil.which(CHROMIUM) is None:
        raise RuntimeError(f"{CHROMIUM} is missing: run `make system-deps`.")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            # `%noloop`: chromium would otherwise play the file again and again.
            args=[*FLAGS, f"--use-file-for-fake-audio-capture={microphone}%noloop"],
        )
        try:
            yield browser
        finally:
            browser.close()


def kill_chromium(microphone: Path) -> int:
    """SIGKILLs the chromium started with `microphone` and every process of its group,
    as a crashed or powered-off machine would leave its page: no goodbye, no closed
    connection. Returns how many processes the group had."""
    browsers = []
    groups: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            groups[int(entry.name)] = os.getpgid(int(entry.name))
        except OSError:
            continue
        # Chromium's helpers (--type=...) carry the flags too, some as one string.
        if str(microphone).encode() in cmdline and b"--type=" not in cmdline:
            browsers.append(int(entry.name))
    if len(browsers) != 1:
        raise AssertionError(f"{len(browsers)} chromiums run with the microphone {microphone}")
    # Playwright starts chromium as the leader of a group of its own, helpers included.
    [group] = browsers
    assert groups[group] == group, "chromium does not lead a process group of its own"
    os.killpg(group, signal.SIGKILL)
    return sum(1 for member in groups.values() if member == group)


def open_page(browser: Any, url: str) -> Any:
    page = browser.new_page(viewport={"width": 1180, "height": 760})
    page.on("console", lambda message: print(f"[page {message.type}] {message.text}"))
    page.on("pageerror", lambda error: print(f"[page error] {error}"))
    page.goto(url)
    return page


def start_talking(page: Any, avatar_id: str) -> None:
    page.wait_for_selector(f'#avatar-select option[value="{avatar_id}"]', state="attached")
    page.select_option("#avatar-select", avatar_id)
    page.click("#talk")


def events(page: Any, kind: str | None = None) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = page.evaluate("() => window.talker.events")
    return [event for event in found if kind is None or event["type"] == kind]


def wait_for_event(page: Any, condition_js: str, timeout_s: float) -> None:
    """Waits until some event `e` of the page satisfies `condition_js` (a JS
    expression over `e`), or a fatal error shows (then says it)."""
    try:
        page.wait_for_function(
            f"() => window.talker.events.some((e) => ({condition_js})) || "
            "window.talker.state === 'error'",
            timeout=timeout_s * 1000,
            polling=100,
        )
    except Exception as error:
        raise AssertionError(
            f"no event with {condition_js} after {timeout_s} s; the page had: "
            f"{[(e['type'], e.get('text', e.get('state', ''))) for e in events(page)][-40:]}"
        ) from error
    state = page.evaluate("() => window.talker.state")
    assert state != "error", f"the page shows an error: {page.inner_text('#state')}"


# Samples the <video> through a canvas every 80 ms: the grey levels of the
# face's mouth region and of its forehead (from the avatar's face box, scaled to
# the video's size), kept on window.faceSamples as {at, mouth, forehead}.
SAMPLE_FRAMES_JS = """
(faceBox) => {
  const video = document.getElementById("avatar");
  const canvas = document.createElement("canvas");
  const context = canvas.getContext("2d", { willReadFrequently: true });
  window.faceSamples = [];
  const region = (pixels, width, x0, y0, x1, y1) => {
    const grey = [];
    for (let y = Math.round(y0); y < Math.round(y1); y += 2)
      for (let x = Math.round(x0); x < Math.round(x1); x += 2) {
        const i = (y * width + x) * 4;
        grey.push(Math.round((pixels[i] + pixels[i + 1] + pixels[i + 2]) / 3));
      }
    return grey;
  };
  window.faceTimer = setInterval(() => {
    if (!video.videoWidth) return;
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    context.drawImage(video, 0, 0);
    const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
    const sx = canvas.width / faceBox.frame_width, sy = canvas.height / faceBox.frame_height;
    const x0 = (faceBox.x + faceBox.width * 0.25) * sx, x1 = (faceBox.x + faceBox.width * 0.75) * sx;
    window.faceSamples.push({
      at: performance.now(),
      mouth: region(pixels, canvas.width, x0, (faceBox.y + faceBox.height * 0.65) * sy,
                    x1, (faceBox.y + faceBox.height * 0.95) * sy),
      forehead: region(pixels, canvas.width, x0, (faceBox.y + faceBox.height * 0.05) * sy,
                       x1, (faceBox.y + faceBox.height * 0.3) * sy),
    });
  }, 80);
}
"""


def face_changes(samples: list[dict[str, Any]], since_ms: float) -> tuple[float, float]:
    """How much the mean grey level of the mouth region and of the forehead
    varied from the face at rest (the last sample before `since_ms`) through the
    samples after it. The animation moves the whole head, so pixels change
    everywhere; a mouth opening and closing changes its region's brightness,
    a forehead moving with the head hardly changes its own (measured on the
    animate service's frames: 34 grey levels against 4)."""
    before = [s for s in samples if s["at"] < since_ms]
    after = [s for s in samples if s["at"] >= since_ms]
    if not before or not after:
        raise AssertionError(f"{len(before)} face samples before the reply, {len(after)} after")

    def spread(part: str) -> float:
        means = [float(np.mean(s[part])) for s in [before[-1], *after]]
        return max(means) - min(means)

    return spread("mouth"), spread("forehead")


INBOUND_STATS_JS = """
async () => {
  const stats = await window.talker.pc.getStats();
  const found = {};
  stats.forEach((report) => {
    if (report.type === "inbound-rtp") found[report.kind] = report;
  });
  return found;
}
"""


# Wraps getUserMedia: the page's microphone is the fake device (its WAV file)
# mixed with what a test or the bench plays through `say` when it chooses (to
# talk over a reply, or to ask the next question once the last reply was heard).
MIXED_MICROPHONE_JS = """
(() => {
  const real = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  navigator.mediaDevices.getUserMedia = async (constraints) => {
    const device = await real(constraints);
    const context = new AudioContext({ sampleRate: 48000 });
    const mixed = context.createMediaStreamDestination();
    context.createMediaStreamSource(device).connect(mixed);
    window.say = async (wavBase64) => {
      const bytes = Uint8Array.from(atob(wavBase64), (c) => c.charCodeAt(0));
      const source = context.createBufferSource();
      source.buffer = await context.decodeAudioData(bytes.buffer);
      source.connect(mixed);
      source.start();
      return source.buffer.duration;
    };
    return mixed.stream;
  };
})();
"""


def say(page: Any, audio: np.ndarray) -> float:
    """Plays float32 mono 48 kHz audio into the page's microphone (the page must
    have been opened with MIXED_MICROPHONE_JS); returns its length in seconds."""
    wav = base64.b64encode(to_wav(audio, WAV_RATE_HZ)).decode()
    return float(page.evaluate("(wav) => window.say(wav)", wav))
