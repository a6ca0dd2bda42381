"""Synthesize: time to the first audio chunk and real-time factor through
gRPC, with and without voice matching, for the Mandarin voice beside Piper's
(ratios to Piper measured in the same run), and the similarity table: for each
reference speaker, speaker-encoder similarity of the base voice and of the
matched voice to that speaker, on a held-out sentence."""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench.tables import percentile, print_table
from services.synthesize.config import SynthesizeSettings
from services.synthesize.server import build_program
from services.synthesize.voice_matching import VoiceMatcher, cosine
from talker.v1 import audio_pb2, synthesize_pb2, synthesize_pb2_grpc
from tests.processes import InProcessServer
from tests.speech import CHINESE_SENTENCES, SENTENCES, mandarin_speech, piper_speech, to_wav
from tests.voices_engine_test import REFERENCE_TEXT, create, espeak_reference, speak

HELD_OUT = "I would like to order a pizza with mushrooms and olives, please."
TEXTS = [
    "Hello! How can I help you today?",
    "The capital of France is Paris, a city famous for its museums, its food and its long history.",
    *SENTENCES,
    "I'm sorry, I didn't catch that. Could you say it again, a little more slowly?",
]

ZH_TEXTS = [
    "你好！有什么可以帮你的吗？",
    "法国的首都是巴黎，一座以博物馆、美食和悠久历史闻名的城市。",
    *CHINESE_SENTENCES,
    "对不起，我没有听清楚。你能再慢一点说一遍吗？",
]
MANDARIN_VOICE = "zh_CN-mellotron-aiyue"
HELD_OUT_ZH = "我想要一个加蘑菇和橄榄的比萨饼，谢谢。"


def cpu_description() -> str:
    """CPU model and its widest vector units (AVX-512 or AVX2), from lscpu."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    model = fields.get("Model name", "unknown CPU").strip()
    flags = fields.get("Flags", "").split()
    vector = (
        "AVX-512" if "avx512f" in flags else "AVX2 (no AVX-512)" if "avx2" in flags else "no AVX2"
    )
    return f"{model}, {os.cpu_count()} logical CPUs, {vector}"


def timings(
    stub: synthesize_pb2_grpc.SynthesizeServiceStub,
    voice_id: str,
    rounds: int,
    texts: list[str] = TEXTS,
) -> tuple[list[float], list[float]]:
    firsts, rtfs = [], []
    for _ in range(rounds):
        for text in texts:
            started = time.perf_counter()
            first = None
            request = synthesize_pb2.SynthesizeRequest(text=text, voice_id=voice_id)
            for response in stub.Synthesize(request, timeout=60):
                if first is None and response.HasField("chunk"):
                    first = time.perf_counter() - started
            elapsed = time.perf_counter() - started
            firsts.append(1000 * (first or elapsed))
            rtfs.append(elapsed / (response.finished.duration_ms / 1000))
    return firsts, rtfs


def reference_speakers() -> dict[str, tuple[np.ndarray, int]]:
    """Speakers unlike the base voice: espeak-ng voices, and Piper's own voice
    with its pitch and formants moved (another 'person' made from it)."""
    speakers = {
        name: espeak_reference(voice)
        for name, voice in [
            ("espeak en-us female 3", "en-us+f3"),
            ("espeak en male 7", "en+m7"),
            ("espeak en-gb female 2", "en-gb+f2"),
            ("espeak en-us male 2", "en-us+m2"),
        ]
    }
    piper = piper_speech(REFERENCE_TEXT, 22_050)
    base_f0 = VoiceMatcher.f0_stats(piper, 22_050)
    for label, pitch, formant in [
        ("Piper, pitch x1.5, formants x1.15", 1.5, 1.15),
        ("Piper, pitch x0.7, formants x0.88", 0.7, 0.88),
    ]:
        target = (base_f0[0] + float(np.log(pitch)), base_f0[1])
        speakers[label] = (VoiceMatcher.convert(piper, 22_050, base_f0, target, formant), 22_050)
    return speakers


def main() -> None:
    rounds = int(os.environ.get("BENCH_ROUNDS", "5"))
    with tempfile.TemporaryDirectory() as voices:
        settings = SynthesizeSettings(port=0, metrics_port=0, voices_dir=Path(voices))
        server = InProcessServer(build_program(settings))
        server.start()
        try:
            with grpc.insecure_channel(server.address) as channel:
                stub = synthesize_pb2_grpc.SynthesizeServiceStub(channel)
                matcher = VoiceMatcher()
                rows, matched_ids = [], []
                for label, (audio, rate) in reference_speakers().items():
                    started = time.perf_counter()
                    voice = create(stub, to_wav(audio, rate), audio_pb2.AUDIO_ENCODING_WAV)
                    fit_s = time.perf_counter() - started
                    matched_ids.append(voice.voice_id)
                    target = matcher.embed(audio, rate)
                    base_audio = speak(stub, HELD_OUT, "en_US-joe-medium")
                    base = cosine(matcher.embed(base_audio, 16_000), target)
                    matched_audio = speak(stub, HELD_OUT, voice.voice_id)
                    matched = cosine(matcher.embed(matched_audio, 16_000), target)
                    moved = "yes" if matched > base else "NO"
                    rows.append([label, base, matched, matched - base, moved, fit_s])
                # Matched voices on the Mandarin base (zh_CN-mellotron-aiyue), with
                # other Mandarin speakers of the same model as the references.
                for speaker in ("Aicheng", "Xiaobei"):
                    audio = np.concatenate(
                        [mandarin_speech(s, 22_050, speaker) for s in CHINESE_SENTENCES * 3]
                    )
                    started = time.perf_counter()
                    voice = create(stub, to_wav(audio, 22_050), language="zh-CN")
                    fit_s = time.perf_counter() - started
                    target = matcher.embed(audio, 22_050)
                    base = cosine(
                        matcher.embed(speak(stub, HELD_OUT_ZH, MANDARIN_VOICE), 16_000), target
                    )
                    matched_audio = speak(stub, HELD_OUT_ZH, voice.voice_id)
                    matched = cosine(matcher.embed(matched_audio, 16_000), target)
                    moved = "yes" if matched > base else "NO"
                    label = f"Mellotron {speaker} (Mandarin base)"
                    rows.append([label, base, matched, matched - base, moved, fit_s])
                print_table(
                    "Voice matching: similarity to the reference speaker "
                    "(resemblyzer cosine, held-out sentence)",
                    [
                        "reference speaker",
                        "base voice",
                        "matched voice",
                        "gain",
                        "moved",
                        "CreateVoice s",
                    ],
                    rows,
                )
                plain_first, plain_rtf = timings(stub, "en_US-joe-medium", rounds)
                matched_first, matched_rtf = timings(stub, matched_ids[0], rounds)
                zh_first, zh_rtf = timings(stub, MANDARIN_VOICE, rounds, ZH_TEXTS)
                runs = [
                    ("en_US-joe-medium (Piper)", plain_first, plain_rtf),
                    ("matched voice (Piper + WORLD)", matched_first, matched_rtf),
                    (f"{MANDARIN_VOICE} (Mellotron + MelGAN)", zh_first, zh_rtf),
                ]
                base_first, base_rtf = percentile(plain_first, 50), percentile(plain_rtf, 50)
                print_table(
                    f"Through gRPC, 24 kHz s16le, {len(TEXTS)} English / {len(ZH_TEXTS)} Chinese "
                    f"texts x {rounds}; {cpu_description()}",
                    [
                        "voice",
                        "first chunk p50 ms",
                        "p95 ms",
                        "RTF p50",
                        "RTF p95",
                        "first chunk / Piper",
                        "RTF / Piper",
                    ],
                    [
                        [
                            label,
                            percentile(first, 50),
                            percentile(first, 95),
                            percentile(rtf, 50),
                            percentile(rtf, 95),
                            percentile(first, 50) / base_first,
                            percentile(rtf, 50) / base_rtf,
                        ]
                        for label, first, rtf in runs
                    ],
                )
                print(
                    "targets: first chunk < 100 ms p50; RTF < 0.1 with voice matching; "
                    "matched above base for every speaker; Mandarin RTF < 1 (faster than real time)"
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
