"""Lips that form the sounds: Piper's phoneme timings through Synthesize match
its audio; the audio-driven estimator closes the mouth on silence and on
m/b/p; a Render with timings closes the lips on m/b/p frames as dlib sees
them; renders are deterministic; pinyin maps onto the same shapes; bad
timings are refused with a clear status; quiet o/u and e/i keep their lip
width."""

from __future__ import annotations

import io
from collections.abc import Iterator

import av
import cv2
import grpc
import numpy as np
import pytest
from PIL import Image
from skimage import data

from services.animate import visemes as vz
from services.animate.config import AnimateSettings
from services.animate.portrait import PortraitAnalyzer, PortraitLimits
from services.animate.server import build_program as build_animate
from services.synthesize.config import SynthesizeSettings
from services.synthesize.server import build_program as build_synthesize
from talker.v1 import animate_pb2, animate_pb2_grpc, audio_pb2, synthesize_pb2, synthesize_pb2_grpc
from tests.aligned_speech import piper_speech_with_phonemes, shifted
from tests.processes import InProcessServer
from tests.speech import espeak_speech, silence, to_wav

FPS = 25
HOP = 16_000 // FPS
TEXT = "Bob made a map, and my mom bought a pie. Please keep the paper dry."


@pytest.fixture(scope="module")
def tts(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[synthesize_pb2_grpc.SynthesizeServiceStub]:
    settings = SynthesizeSettings(
        port=0,
        metrics_port=0,
        cache_dir=tmp_path_factory.mktemp("cache"),
        voices_dir=tmp_path_factory.mktemp("voices"),
    )
    server = InProcessServer(build_synthesize(settings))
    server.start()
    with grpc.insecure_channel(server.address) as channel:
        yield synthesize_pb2_grpc.SynthesizeServiceStub(channel)
    server.stop()


@pytest.fixture(scope="module")
def animate(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[animate_pb2_grpc.AnimateServiceStub, str]]:
    server = InProcessServer(
        build_animate(
            AnimateSettings(port=0, metrics_port=0, avatars_dir=tmp_path_factory.mktemp("avatars"))
        )
    )
    server.start()
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="PNG")
    with grpc.insecure_channel(server.address) as channel:
        stub = animate_pb2_grpc.AnimateServiceStub(channel)
        avatar = stub.CreateAvatar(animate_pb2.CreateAvatarRequest(image=buffer.getvalue())).avatar
        yield stub, avatar.avatar_id
    server.stop()


def levels_10ms(audio: np.ndarray) -> np.ndarray:
    return np.array([vz.level_db(audio[at : at + 160]) for at in range(0, len(audio), 160)])


def test_piper_timings_from_synthesize_match_its_audio_within_one_frame(tts) -> None:
    request = synthesize_pb2.SynthesizeRequest(
        text=TEXT,
        output_format=audio_pb2.AudioFormat(
            encoding=audio_pb2.AUDIO_ENCODING_PCM_S16LE, sample_rate_hz=16_000
        ),
    )
    chunks = [r.chunk for r in tts.Synthesize(request, timeout=120) if r.HasField("chunk")]
    audio = np.frombuffer(b"".join(c.audio for c in chunks), "<i2").astype(np.float32) / 32768
    phonemes = [p for c in chunks for p in c.phonemes]
    assert phonemes, "Piper voices report their phonemes"
    starts = [p.start_ms for p in phonemes]
    assert starts == sorted(starts)
    # The sounds end with the audio (within one frame, 40 ms).
    end_ms = phonemes[-1].start_ms + phonemes[-1].duration_ms
    assert abs(end_ms - len(audio) / 16) <= 40, (end_ms, len(audio) / 16)
    # Speech starts where the first sound does, in each sentence (within one frame).
    levels = levels_10ms(audio)
    loud = levels > levels.max() - 30
    onset_ms = 10 * int(np.argmax(loud))
    first = next(p for p in phonemes if vz.shape_of_phoneme(p.phoneme) not in (vz.REST, None))
    assert abs(first.start_ms - onset_ms) <= 40, (first.start_ms, onset_ms)
    # Every stop (b, p) has its closure within one frame of its start: 12 dB down, because a
    # voiced b keeps a hum. Piper's noise varies the take: the b of "Bob" before "made" was
    # 15-20 dB down in 20 takes and 14.95 in one; with timings 80 ms off, some stops are 2-8 dB.
    stops = [p for p in phonemes if p.phoneme in ("b", "p")]
    assert len(stops) >= 4
    for stop in stops:
        near = levels[max(0, (stop.start_ms - 40) // 10) : (stop.start_ms + 40) // 10 + 1]
        assert near.min() < levels.max() - 12, (stop.phoneme, stop.start_ms)


def estimate(audio: np.ndarray) -> np.ndarray:
    estimator = vz.Estimator(FPS)
    frames = int(np.ceil(len(audio) / HOP))
    weights = []
    for index in range(frames):
        piece = audio[max(0, int((index - 0.5) * HOP)) : int((index + 1.5) * HOP)]
        weights.append(estimator.frame(piece, audio[index * HOP : (index + 1) * HOP])[0])
    return np.array(weights)


def test_estimator_closes_the_mouth_on_silence_and_bilabials() -> None:
    speech, timings = piper_speech_with_phonemes("Bob made a map, and my mom bought a pie.")
    audio = np.concatenate([silence(0.5), speech, silence(0.5)])
    timings = shifted(timings, 0.5)
    weights = estimate(audio)  # the estimator hears the audio only
    shut = weights[:, vz.CLOSED] + weights[:, vz.REST]
    frames = len(weights)
    quiet = [
        i
        for i in range(frames)
        if (i + 1) * HOP <= 0.5 * 16_000 or i * HOP >= len(audio) - 0.5 * 16_000
    ]
    assert np.all(shut[quiet] >= 0.99)
    bilabial = [
        i
        for i in range(frames)
        if any(p in "mbp" and s <= (i + 0.5) / FPS < s + d for p, s, d in timings)
    ]
    closed_near = [shut[max(0, i - 1) : i + 2].max() >= 0.9 for i in bilabial]
    assert len(bilabial) >= 6 and np.mean(closed_near) >= 0.6, closed_near
    speaking = [i for i in range(frames) if i not in quiet]
    assert np.mean(shut[speaking] < 0.5) >= 0.3, "the mouth opens while speaking"
    # A recorded voice that is not Piper's: espeak-ng, as plain audio.
    recorded = np.concatenate(
        [silence(0.5), espeak_speech("Please bring me a map of the moon."), silence(0.5)]
    )
    weights = estimate(recorded)
    shut = weights[:, vz.CLOSED] + weights[:, vz.REST]
    edge = int(0.5 * FPS) - 1
    assert np.all(shut[:edge] >= 0.99) and np.all(shut[-edge:] >= 0.99)
    assert np.mean(shut[edge:-edge] < 0.5) >= 0.3


def timed_render(
    stub, avatar_id: str, audio: np.ndarray, timings, background: bool = False
) -> bytes:  # type: ignore[no-untyped-def]
    request = animate_pb2.RenderRequest(
        avatar_id=avatar_id,
        audio=to_wav(audio, 16_000),
        format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_WAV),
        phonemes=[
            audio_pb2.PhonemeTiming(
                phoneme=p, start_ms=round(s * 1000), duration_ms=round(d * 1000)
            )
            for p, s, d in timings
        ],
        background=background,
    )
    return b"".join(
        r.chunk.content for r in stub.Render(request, timeout=300) if r.HasField("chunk")
    )


def decode(mp4: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(mp4)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.fixture(scope="module")
def spoken() -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    speech, timings = piper_speech_with_phonemes(
        "Papa parked the big boat by the palm, and Bob ate a plum."
    )
    return np.concatenate([silence(0.4), speech, silence(0.4)]), shifted(timings, 0.4)


def test_timed_render_shuts_the_lips_on_bilabials_as_dlib_sees_them(animate, spoken) -> None:
    stub, avatar_id = animate
    audio, timings = spoken
    frames = decode(timed_render(stub, avatar_id, audio, timings))
    assert abs(len(frames) - len(audio) / HOP) <= 1
    analyzer = PortraitAnalyzer(PortraitLimits())
    face = max(analyzer.detector(frames[0], 1), key=lambda r: r.width())
    import dlib

    rect = dlib.rectangle(2 * face.left(), 2 * face.top(), 2 * face.right(), 2 * face.bottom())
    gaps = []
    for frame in frames:
        shape = analyzer.predictor(
            cv2.resize(frame, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC), rect
        )
        p = np.array([(shape.part(i).x, shape.part(i).y) for i in range(68)], dtype=float)
        gaps.append(np.linalg.norm(p[66] - p[62]) / np.linalg.norm(p[54] - p[48]))
    gap = np.array(gaps)
    bilabial = [
        i
        for i in range(len(gap))
        if any(p in "mbp" and s <= (i + 0.5) / FPS < s + d for p, s, d in timings)
    ]
    assert len(bilabial) >= 4
    closed = np.mean(gap[bilabial] <= 0.15 * gap.max())
    print("m/b/p frames closed:", closed, "max gap", gap.max())
    # Piper speaks each take a little differently and dlib places the lips of a
    # closed frame a pixel apart now and then: over 8 runs 0.8-1.0 (the bench
    # reports the figure over 10 frames per portrait; the old animator: 0.0).
    assert closed >= 0.75
    assert gap.max() >= 0.15, "and the mouth opens for the vowels"


def test_renders_are_deterministic_and_use_the_timings(animate, spoken) -> None:
    stub, avatar_id = animate
    audio, timings = spoken
    first = timed_render(stub, avatar_id, audio, timings)
    again = timed_render(stub, avatar_id, audio, timings, background=True)
    assert first == again
    untimed = timed_render(stub, avatar_id, audio, [])
    assert untimed == timed_render(stub, avatar_id, audio, [])
    assert untimed != first, "timings change the lips"


def test_bad_phoneme_timings_are_refused_with_a_reason(animate) -> None:
    stub, avatar_id = animate
    for timing, words in (
        (
            audio_pb2.PhonemeTiming(phoneme="a", start_ms=0, duration_ms=80, notation="xsampa"),
            "notation",
        ),
        (audio_pb2.PhonemeTiming(phoneme="", start_ms=0, duration_ms=80), "phoneme"),
        (audio_pb2.PhonemeTiming(phoneme="a", start_ms=0, duration_ms=3_600_000), "duration_ms"),
    ):
        request = animate_pb2.RenderRequest(
            avatar_id=avatar_id,
            audio=to_wav(silence(0.2), 16_000),
            format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_WAV),
            phonemes=[timing],
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Render(request, timeout=60))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in caught.value.details()


def test_pinyin_syllables_map_onto_the_same_shapes() -> None:
    spans = vz.pinyin_spans(
        [
            ("ma3", 0.0, 0.3),
            ("bu4", 0.3, 0.3),
            ("xie4", 0.6, 0.3),
            ("zhi1", 0.9, 0.3),
            ("ou1", 1.2, 0.3),
        ]
    )
    shapes = [(s.shape, s.stressed) for s in spans]
    assert shapes == [
        (vz.CLOSED, False),
        (vz.OPEN, False),
        (vz.CLOSED, False),
        (vz.ROUND, True),
        (vz.MID, False),
        (vz.WIDE, True),
        (vz.ROUND, False),
        (vz.MID, True),
        (vz.ROUND, True),
    ]
    assert spans[0].duration_s == pytest.approx(0.105) and spans[1].start_s == pytest.approx(0.105)
    # A closure shorter than a frame still closes the frame holding its middle.
    weights = vz.frame_weights_from_spans(vz.pinyin_spans([("ba1", 0.0, 0.08)]), 3, FPS)
    assert weights[0, vz.CLOSED] == 1.0


def test_english_phonemes_map_with_stress_and_length() -> None:
    spans = vz.spans_from_phonemes(
        [
            ("^", 0.0, 0.05),
            ("m", 0.05, 0.05),
            ("ˈ", 0.1, 0.04),
            ("u", 0.14, 0.06),
            ("ː", 0.2, 0.05),
            ("v", 0.25, 0.06),
            (".", 0.31, 0.2),
        ]
    )
    assert [s.shape for s in spans] == [vz.REST, vz.CLOSED, vz.ROUND, vz.FV, vz.REST]
    round_ = spans[2]
    assert (
        round_.stressed
        and round_.start_s == pytest.approx(0.1)
        and round_.end_s == pytest.approx(0.25)
    )


def test_live_animate_takes_timings_with_the_audio_or_ahead_of_it(animate, spoken) -> None:
    stub, avatar_id = animate
    audio, timings = spoken
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    config = animate_pb2.AnimateConfig(
        avatar_id=avatar_id,
        format=audio_pb2.AudioFormat(
            encoding=audio_pb2.AUDIO_ENCODING_PCM_S16LE, sample_rate_hz=16_000
        ),
        frame_encoding=animate_pb2.FRAME_ENCODING_RGB24,
    )
    sounds = [
        audio_pb2.PhonemeTiming(phoneme=p, start_ms=round(s * 1000), duration_ms=round(d * 1000))
        for p, s, d in timings
    ]

    def frames(with_timings: bool) -> list[bytes]:
        def requests():  # type: ignore[no-untyped-def]
            yield animate_pb2.AnimateRequest(config=config)
            if with_timings:  # the first half ahead of the audio, alone; the rest with a chunk
                yield animate_pb2.AnimateRequest(phonemes=sounds[: len(sounds) // 2])
            for number, start in enumerate(range(0, len(pcm), 3200)):
                extra = sounds[len(sounds) // 2 :] if with_timings and number == 0 else []
                yield animate_pb2.AnimateRequest(audio=pcm[start : start + 3200], phonemes=extra)

        return [r.frame.image for r in stub.Animate(requests(), timeout=120)]

    timed, untimed = frames(True), frames(False)
    assert len(timed) == len(untimed) and abs(len(timed) - len(audio) / HOP) <= 1
    assert timed != untimed, "timings change the lips"
    assert timed == frames(True), "the same input gives the same frames"

    def bad():  # type: ignore[no-untyped-def]
        yield animate_pb2.AnimateRequest(config=config)
        yield animate_pb2.AnimateRequest(
            audio=pcm[:3200],
            phonemes=[audio_pb2.PhonemeTiming(phoneme="ma3", notation="wade-giles")],
        )

    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Animate(bad(), timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "notation" in caught.value.details()


def test_quiet_rounded_and_spread_sounds_keep_their_lip_width() -> None:
    """Loudness scales the opening, not the lips' shape: a quiet o/u (-40 dB)
    keeps lips narrower than a quiet e/i, as dlib sees them on the frames."""
    from services.animate.animator import PortraitAnimator

    portrait = data.astronaut()
    analyzer = PortraitAnalyzer(PortraitLimits())
    report = analyzer.analyze(portrait)
    animator = PortraitAnimator(portrait, report.landmarks, FPS)
    animator.add_spans([vz.Span(vz.ROUND, 0.0, 0.6), vz.Span(vz.WIDE, 0.6, 0.6)])
    noise = np.random.default_rng(0).standard_normal(int(1.2 * 16_000)).astype(np.float32)
    quiet = 10 ** (-40 / 20) * noise  # -40 dBFS: well below speech, above silence
    frames = [frame for _, frame, _ in animator.frames_for(quiet, final=True)]
    face = max(analyzer.detector(portrait, 1), key=lambda r: r.width())

    def width(frame: np.ndarray) -> float:
        shape = analyzer.predictor(frame, face)
        return float(
            np.hypot(shape.part(54).x - shape.part(48).x, shape.part(54).y - shape.part(48).y)
        )

    round_w = np.median([width(f) for f in frames[5:12]])
    wide_w = np.median([width(f) for f in frames[20:27]])
    print(f"quiet O/U : E/I width {round_w / wide_w:.3f}")
    assert round_w / wide_w <= 0.85  # 0.78 measured; 0.89 when quiet lips went to rest
