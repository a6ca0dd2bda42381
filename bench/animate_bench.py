"""Animate: how believable the embedded animator's lips are, measured by an
independent detector (dlib's 68 landmarks on the rendered frames), before
(the loudness-driven animator, bench/legacy_animator.py) and after (visemes),
on three portraits and two clips; contact sheets to judge by eye; frames per
second at 512x512; first frame latency after the first audio chunk (through
gRPC) and Render speed against real time for a 60 s clip."""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from PIL import Image
from skimage import data

from bench.lipsync import lipsync_report
from bench.tables import percentile, print_table
from services.animate.animator import PortraitAnimator
from services.animate.config import AnimateSettings
from services.animate.portrait import PortraitAnalyzer, PortraitLimits
from services.animate.server import build_program
from talker.v1 import animate_pb2, animate_pb2_grpc, audio_pb2
from tests.processes import InProcessServer
from tests.speech import SENTENCES, piper_speech, silence, to_s16le, to_wav


def speech_clip(seconds: float) -> np.ndarray:
    pieces, total = [], 0.0
    while total < seconds:
        for sentence in SENTENCES:
            piece = np.concatenate([piper_speech(sentence), silence(0.4)])
            pieces.append(piece)
            total += len(piece) / 16_000
    return np.concatenate(pieces)[: int(seconds * 16_000)]


def main() -> None:
    lipsync_report()
    rounds = int(os.environ.get("BENCH_ROUNDS", "5"))
    portrait = data.astronaut()
    landmarks = PortraitAnalyzer(PortraitLimits()).analyze(portrait).landmarks
    clip = speech_clip(10)
    rates = []
    for _ in range(rounds):
        animator = PortraitAnimator(portrait, landmarks, 25)
        started = time.perf_counter()
        frames = sum(1 for _ in animator.frames_for(clip, final=True))
        rates.append(frames / (time.perf_counter() - started))
    print_table(
        "Embedded animator, 512x512, 25 fps, 10 s of speech",
        ["measure", "p50", "p5"],
        [["frames per second (raw RGB)", percentile(rates, 50), percentile(rates, 5)]],
    )
    print("target: >= 50 fps (twice real time)")

    with tempfile.TemporaryDirectory() as folder:
        server = InProcessServer(
            build_program(AnimateSettings(port=0, metrics_port=0, avatars_dir=Path(folder)))
        )
        server.start()
        try:
            with grpc.insecure_channel(server.address) as channel:
                stub = animate_pb2_grpc.AnimateServiceStub(channel)
                buffer = io.BytesIO()
                Image.fromarray(portrait).save(buffer, format="PNG")
                avatar_id = stub.CreateAvatar(
                    animate_pb2.CreateAvatarRequest(image=buffer.getvalue())
                ).avatar.avatar_id
                pcm = to_s16le(clip[: 16_000 * 2])
                firsts = []

                def requests(sent: dict[str, float]):  # type: ignore[no-untyped-def]
                    yield animate_pb2.AnimateRequest(
                        config=animate_pb2.AnimateConfig(
                            avatar_id=avatar_id,
                            format=audio_pb2.AudioFormat(
                                encoding=audio_pb2.AUDIO_ENCODING_PCM_S16LE, sample_rate_hz=16_000
                            ),
                        )
                    )
                    for start in range(0, len(pcm), 640):
                        if start == 0:
                            sent["first_audio"] = time.perf_counter()
                        yield animate_pb2.AnimateRequest(audio=pcm[start : start + 640])

                for _ in range(rounds * 4):
                    sent: dict[str, float] = {}
                    for _response in stub.Animate(requests(sent), timeout=60):
                        firsts.append(1000 * (time.perf_counter() - sent["first_audio"]))
                        break
                long_clip = speech_clip(60)
                started = time.perf_counter()
                responses = list(
                    stub.Render(
                        animate_pb2.RenderRequest(
                            avatar_id=avatar_id,
                            audio=to_wav(long_clip, 16_000),
                            format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_WAV),
                        ),
                        timeout=600,
                    )
                )
                render_s = time.perf_counter() - started
                result = responses[-1].result
                print_table(
                    "Through gRPC",
                    ["measure", "value"],
                    [
                        [
                            "first frame after the first 20 ms audio chunk, p50 ms",
                            percentile(firsts, 50),
                        ],
                        [
                            "first frame after the first 20 ms audio chunk, p95 ms",
                            percentile(firsts, 95),
                        ],
                        ["Render of 60 s of speech, seconds", render_s],
                        ["Render speed vs real time (x)", 60 / render_s],
                        ["mp4 size, MB", result.size_bytes / 1e6],
                    ],
                )
                print("targets: first frame < 100 ms; render >= 2x real time")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
