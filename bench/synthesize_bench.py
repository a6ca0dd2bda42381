"""Synthesize: time to the first audio chunk and real-time factor, through
gRPC, for the embedded Piper voice. Voice matching is not built yet, so its
rows are missing from this table."""

from __future__ import annotations

import os
import time

import grpc

from bench.tables import percentile, print_table
from services.synthesize.config import SynthesizeSettings
from services.synthesize.server import build_program
from talker.v1 import synthesize_pb2, synthesize_pb2_grpc
from tests.processes import InProcessServer
from tests.speech import SENTENCES

TEXTS = [
    "Hello! How can I help you today?",
    "The capital of France is Paris, a city famous for its museums, its food and its long history.",
    *SENTENCES,
    "I'm sorry, I didn't catch that. Could you say it again, a little more slowly?",
]


def main() -> None:
    rounds = int(os.environ.get("BENCH_ROUNDS", "5"))
    server = InProcessServer(build_program(SynthesizeSettings(port=0, metrics_port=0)))
    server.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = synthesize_pb2_grpc.SynthesizeServiceStub(channel)
            firsts, rtfs, long_firsts = [], [], []
            for _ in range(rounds):
                for text in TEXTS:
                    started = time.perf_counter()
                    first = None
                    for response in stub.Synthesize(
                        synthesize_pb2.SynthesizeRequest(text=text), timeout=60
                    ):
                        if first is None and response.HasField("chunk"):
                            first = time.perf_counter() - started
                    elapsed = time.perf_counter() - started
                    audio_s = response.finished.duration_ms / 1000
                    firsts.append(1000 * (first or elapsed))
                    if len(text) > 60:
                        long_firsts.append(1000 * (first or elapsed))
                    rtfs.append(elapsed / audio_s)
            print_table(
                f"Piper en_US-joe-medium through gRPC, 24 kHz s16le, {len(TEXTS)} texts x {rounds}",
                ["measure", "p50", "p95"],
                [
                    [
                        "first audio chunk, ms (all texts)",
                        percentile(firsts, 50),
                        percentile(firsts, 95),
                    ],
                    [
                        "first audio chunk, ms (texts over 60 chars)",
                        percentile(long_firsts, 50),
                        percentile(long_firsts, 95),
                    ],
                    ["real-time factor (wall / audio)", percentile(rtfs, 50), percentile(rtfs, 95)],
                ],
            )
            print("targets: first chunk < 100 ms p50; RTF < 0.1 (voice matching: not built yet)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
