"""SynthesizeService: streaming speech from installed Piper voices and the
Mandarin voice (chosen for Chinese text when the caller names no voice), from
voices matched to a reference recording, and from voices cloned from one by a
Coqui XTTS model when one is configured (CreateVoice)."""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import numpy as np
from grpc import aio

from services.common.audio import (
    OUTPUT_ENCODINGS,
    StreamResampler,
    decode_clip,
    encode_samples,
    encoding_name,
    streaming_wav_header,
)
from services.common.errors import InvalidInput, LimitExceeded, PreconditionFailed
from services.common.runtime import GrpcProgram, run_program
from services.common.work_queue import WorkQueue
from services.synthesize.config import SynthesizeSettings
from services.synthesize.engine import InstalledVoice, PiperEngine
from services.synthesize.voice_profiles import (
    ADVICE,
    CLONED,
    MATCHED,
    QualityReport,
    VoiceProfile,
    assess_reference,
    now,
)
from talker.v1 import audio_pb2, synthesize_pb2, synthesize_pb2_grpc

# Trailing metadata naming the voice that spoke (archive records cite it).
VOICE_METADATA_KEY = "x-talker-voice"
MIN_OUTPUT_RATE_HZ = 8_000
MAX_OUTPUT_RATE_HZ = 48_000
# The first phrase of the first sentence is synthesised on its own, so the
# first audio chunk does not wait for a whole long sentence (Piper takes ~40 ms
# per second of speech on 2 cores). It is cut at a clause mark, or else before
# a word that starts a phrase, so the seam falls where a speaker could pause.
_FIRST_CLAUSE = re.compile(r"^([^.!?。！？]{12,}?[,;:，；：])\s+(?=\S)")
_PHRASE_STARTS = frozenset(
    [
        "and",
        "but",
        "or",
        "because",
        "which",
        "that",
        "who",
        "where",
        "when",
        "while",
        "if",
        "in",
        "on",
        "at",
        "for",
        "with",
        "to",
        "from",
        "of",
        "about",
        "after",
        "before",
        "into",
        "through",
    ]
)
MIN_WORDS_TO_SPLIT = 9
_DONE = object()


class SynthesizeServicer(synthesize_pb2_grpc.SynthesizeServiceServicer):
    def __init__(self, engine: PiperEngine, settings: SynthesizeSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.queue = WorkQueue("synthesize", settings.workers, settings.max_waiting)

    async def Synthesize(
        self, request: synthesize_pb2.SynthesizeRequest, context: aio.ServicerContext
    ) -> AsyncIterator[synthesize_pb2.SynthesizeResponse]:
        received = time.perf_counter()
        text = request.text.strip()
        if not text:
            raise InvalidInput("text is empty: send the words to speak.")
        if len(text) > self.settings.max_text_chars:
            raise LimitExceeded(
                f"text has {len(text)} characters; one call speaks at most "
                f"{self.settings.max_text_chars}. Split it into several calls."
            )
        rate_hz, encoding = self._output(request.output_format)
        speaking_rate = request.speaking_rate or 1.0
        if not (math.isfinite(speaking_rate) and 0.5 <= speaking_rate <= 2.0):
            raise InvalidInput(
                f"speaking_rate is {request.speaking_rate}; it must be 0 (normal) or from 0.5 to 2.0."
            )
        profile = self.engine.profiles.get(request.voice_id)
        cloned = profile if profile is not None and profile.kind == CLONED else None
        if cloned is not None:
            self.engine.check_cloned(cloned, text)
            source_rate_hz = self.engine.require_cloner().sample_rate_hz
        else:
            voice = (
                self.engine.voice(profile.base_voice_id)
                if profile
                else self.engine.voice_for_text(request.voice_id, text)
            )
            self.engine.check_speakable(voice, text)
            source_rate_hz = voice.sample_rate_hz
        # The voice that speaks, which may not be the one asked for (Chinese text
        # sent to the default voice), for the caller's records. A trailer, not a
        # header: the shared interceptor sends the headers before this handler runs.
        context.set_trailing_metadata(
            ((VOICE_METADATA_KEY, profile.voice_id if profile else voice.voice_id),)
        )
        out_format = audio_pb2.AudioFormat(encoding=encoding, sample_rate_hz=rate_hz, channels=1)
        chunk_samples = rate_hz * self.settings.chunk_ms // 1000
        async with self.queue.slot():
            stop = threading.Event()
            sentences: asyncio.Queue[object] = asyncio.Queue()
            loop = asyncio.get_running_loop()

            def piper_audio() -> Iterator[tuple[np.ndarray, bool, list[tuple[str, float, float]]]]:
                # The Mandarin voice cuts its text into clauses itself.
                pieces = [text] if voice.mandarin_speaker else split_first_clause(text)
                for piece in pieces:
                    timings: list[list[tuple[str, float, float]]] = []
                    for audio, ends_sentence in self.engine.synthesize_marked(
                        voice, piece, speaking_rate, stop, timings
                    ):
                        sounds = timings[-1] if timings else []
                        if profile is not None:
                            length = len(audio)
                            audio = self.engine.match(audio, voice, profile)
                            # Matching may stretch the audio: the timings stretch with it.
                            stretch = len(audio) / max(1, length)
                            sounds = [(p, s * stretch, d * stretch) for p, s, d in sounds]
                        yield audio, ends_sentence, sounds
                    if stop.is_set():
                        return

            def produce() -> None:
                try:
                    audio_pieces = (
                        self.engine.synthesize_cloned(cloned, text, speaking_rate, stop)
                        if cloned is not None
                        else piper_audio()
                    )
                    for item in audio_pieces:
                        loop.call_soon_threadsafe(sentences.put_nowait, item)
                finally:
                    loop.call_soon_threadsafe(sentences.put_nowait, _DONE)

            worker = asyncio.ensure_future(asyncio.to_thread(produce))
            resampler = StreamResampler(source_rate_hz, rate_hz)
            sent = 0
            source_samples = 0  # at the voice's own rate: the timings' clock
            # Piper reports IPA phonemes, the Mandarin voice pinyin syllables.
            notation = "pinyin" if cloned is None and voice.mandarin_speaker else "ipa"
            pending_sounds: list[audio_pb2.PhonemeTiming] = []
            sentence_count = 0  # sentences whose audio has all been handed over
            first_chunk_ms = 0
            header = (
                streaming_wav_header(rate_hz) if encoding == audio_pb2.AUDIO_ENCODING_WAV else b""
            )
            try:
                while True:
                    item = await sentences.get()
                    last = item is _DONE
                    samples: np.ndarray = np.zeros(0, np.float32)
                    ends_sentence = False
                    if not last:
                        parts = cast(tuple[Any, ...], item)
                        samples, ends_sentence = parts[0], parts[1]
                        # Piper's items carry the sentence's phoneme timings; cloned voices' do not.
                        sounds: list[tuple[str, float, float]] = parts[2] if len(parts) > 2 else []
                        start_s = source_samples / source_rate_hz
                        pending_sounds += [
                            audio_pb2.PhonemeTiming(
                                phoneme=p,
                                start_ms=round((start_s + s) * 1000),
                                duration_ms=round(d * 1000),
                                notation=notation,
                            )
                            for p, s, d in sounds
                        ]
                        source_samples += len(samples)
                    audio = resampler.process(samples, last=last)
                    # The resampler's tail, flushed at the end, is the last sentence's.
                    sentence_index = max(sentence_count - 1, 0) if last else sentence_count
                    for start in range(0, len(audio), chunk_samples):
                        piece = audio[start : start + chunk_samples]
                        if not first_chunk_ms:
                            first_chunk_ms = max(1, round((time.perf_counter() - received) * 1000))
                        yield synthesize_pb2.SynthesizeResponse(
                            chunk=synthesize_pb2.AudioChunk(
                                audio=header + encode_samples(piece, encoding),
                                format=out_format,
                                offset_samples=sent,
                                offset_ms=sent * 1000 // rate_hz,
                                duration_ms=len(piece) * 1000 // rate_hz,
                                sentence_index=sentence_index,
                                phonemes=pending_sounds,
                            )
                        )
                        pending_sounds = []
                        header = b""
                        sent += len(piece)
                    if last:
                        break
                    if ends_sentence:
                        sentence_count += 1
                await worker
            finally:
                stop.set()
                await asyncio.shield(worker)
        yield synthesize_pb2.SynthesizeResponse(
            finished=synthesize_pb2.SynthesisFinished(
                duration_ms=sent * 1000 // rate_hz,
                sample_count=sent,
                sentence_count=sentence_count,
                first_chunk_ms=first_chunk_ms,
            )
        )

    async def CreateVoice(
        self,
        request_iterator: AsyncIterator[synthesize_pb2.CreateVoiceRequest],
        context: aio.ServicerContext,
    ) -> synthesize_pb2.CreateVoiceResponse:
        config: synthesize_pb2.CreateVoiceConfig | None = None
        pieces: list[bytes] = []
        size = 0
        async for message in request_iterator:
            which = message.WhichOneof("request")
            if config is None:
                if which != "config":
                    raise InvalidInput(
                        "The first message of CreateVoice must carry `config`; it carried "
                        f"{which or 'nothing'}."
                    )
                config = message.config
                continue
            if which != "audio":
                raise InvalidInput("Only the first message may carry config; send audio after it.")
            size += len(message.audio)
            if size > self.settings.max_reference_bytes:
                raise LimitExceeded(
                    f"The reference recording is over {self.settings.max_reference_bytes // 2**20} MiB; "
                    "one to five minutes of speech is plenty."
                )
            pieces.append(message.audio)
        if config is None:
            raise InvalidInput("The stream ended before its first message (the config).")
        display_name = config.display_name.strip()
        if not display_name or len(display_name) > 80:
            raise InvalidInput("display_name must be 1 to 80 characters.")
        # Unset: the best this server can do (a neural clone when a model is configured).
        kind = config.kind or (
            synthesize_pb2.VOICE_KIND_CLONED
            if self.engine.cloner is not None
            else synthesize_pb2.VOICE_KIND_MATCHED
        )
        # The caller's own answer first: before any check of what this server can do.
        required = self.settings.require_consent
        if not config.consent and (
            required == "all" or (required == "cloned" and kind == synthesize_pb2.VOICE_KIND_CLONED)
        ):
            what = "cloned" if required == "cloned" else "new"
            raise InvalidInput(
                f"This server makes {what} voices only with the speaker's consent: set "
                "`consent` (`talker voices add ... --consent`) once the recorded person has "
                "agreed to have their voice reproduced."
            )
        base = self.engine.voice(self.settings.default_voice_id)
        if config.language.lower().startswith("zh"):
            # A matched Mandarin voice is the Mandarin voice moved toward the speaker.
            base = self.engine.voice_for_script("CJK") or base
        language = config.language or base.language
        if kind == synthesize_pb2.VOICE_KIND_CLONED:
            # Refused before the recording is analysed: no model, or not its language.
            self.engine.require_cloner().language_code(language)
        elif kind != synthesize_pb2.VOICE_KIND_MATCHED:
            raise InvalidInput(
                "kind must be VOICE_KIND_MATCHED or VOICE_KIND_CLONED (or unset); built-in "
                "voices are added as files to the voices folder."
            )
        fmt = config.format
        audio, rate_hz = decode_clip(
            b"".join(pieces), fmt.encoding, fmt.sample_rate_hz, fmt.channels
        )
        if len(audio) / rate_hz > self.settings.max_reference_s:
            raise LimitExceeded(
                f"The reference is {len(audio) / rate_hz:.0f} s long; at most "
                f"{self.settings.max_reference_s:.0f} s is used. Send a shorter excerpt."
            )
        report = await asyncio.to_thread(assess_reference, audio, rate_hz)
        if not report.acceptable:
            reasons = " ".join(f"({i}) {p}" for i, p in enumerate(report.problems, start=1))
            raise InvalidInput(f"The reference recording cannot be used: {reasons} {ADVICE}")
        cloned = kind == synthesize_pb2.VOICE_KIND_CLONED
        if config.validate_only:
            return synthesize_pb2.CreateVoiceResponse(
                voice=synthesize_pb2.Voice(
                    display_name=display_name,
                    language=language,
                    kind=kind,
                    quality=quality_message(report),
                    matched_voice_id="" if cloned else base.voice_id,
                )
            )
        voice_id = self.engine.profiles.new_id()
        async with self.queue.slot():
            fitted: dict[str, Any]
            if cloned:
                fitted = await asyncio.to_thread(self.engine.clone, audio, rate_hz, voice_id)
            else:
                fitted = await asyncio.to_thread(self.engine.fit_match, audio, rate_hz, base)
        profile = VoiceProfile(
            voice_id=voice_id,
            display_name=display_name,
            language=language,
            base_voice_id="" if cloned else base.voice_id,
            description=config.description[:500],
            consent=config.consent,
            created=now(),
            quality=report.__dict__ | {"problems": [], "warnings": report.warnings},
            embedding=fitted["embedding"],
            f0_log_mean=fitted["f0_log_mean"],
            f0_log_std=fitted["f0_log_std"],
            formant_ratio=fitted["formant_ratio"],
            similarity_before=fitted["similarity_before"],
            similarity_after=fitted["similarity_after"],
            kind=CLONED if cloned else MATCHED,
            clone_model=fitted.get("clone_model", ""),
        )
        await asyncio.to_thread(self.engine.profiles.save, profile)
        return synthesize_pb2.CreateVoiceResponse(voice=self.made_voice_message(profile))

    def made_voice_message(self, profile: VoiceProfile) -> synthesize_pb2.Voice:
        """A MATCHED or CLONED voice as a message."""
        voice = profile_message(profile)
        if profile.kind != CLONED:
            return voice
        voice.kind = synthesize_pb2.VOICE_KIND_CLONED
        voice.ClearField("matched_voice_id")
        voice.ClearField("match_similarity")
        if self.engine.cloner is not None:
            voice.sample_rate_hz = self.engine.cloner.sample_rate_hz
        return voice

    def _output(self, output: audio_pb2.AudioFormat) -> tuple[int, int]:
        rate_hz = output.sample_rate_hz or self.settings.default_sample_rate_hz
        if not MIN_OUTPUT_RATE_HZ <= rate_hz <= MAX_OUTPUT_RATE_HZ:
            raise InvalidInput(
                f"output sample_rate_hz is {rate_hz}; choose from {MIN_OUTPUT_RATE_HZ} to "
                f"{MAX_OUTPUT_RATE_HZ} Hz (default {self.settings.default_sample_rate_hz})."
            )
        encoding = output.encoding or audio_pb2.AUDIO_ENCODING_PCM_S16LE
        if encoding not in OUTPUT_ENCODINGS:
            raise InvalidInput(
                f"output encoding {encoding_name(encoding)} is not supported; use "
                "AUDIO_ENCODING_PCM_S16LE, AUDIO_ENCODING_PCM_F32LE or AUDIO_ENCODING_WAV."
            )
        if output.channels > 1:
            raise InvalidInput(f"output channels is {output.channels}; voices are mono (1).")
        return rate_hz, encoding

    async def GetVoice(
        self, request: synthesize_pb2.GetVoiceRequest, context: aio.ServicerContext
    ) -> synthesize_pb2.GetVoiceResponse:
        profile = self.engine.profiles.get(request.voice_id)
        if profile is not None:
            return synthesize_pb2.GetVoiceResponse(voice=self.made_voice_message(profile))
        return synthesize_pb2.GetVoiceResponse(
            voice=voice_message(self.engine.voice(request.voice_id))
        )

    async def ListVoices(
        self, request: synthesize_pb2.ListVoicesRequest, context: aio.ServicerContext
    ) -> synthesize_pb2.ListVoicesResponse:
        voices = [
            v
            for v in self.engine.voices.values()
            if request.kind
            in (synthesize_pb2.VOICE_KIND_UNSPECIFIED, synthesize_pb2.VOICE_KIND_BUILTIN)
            and language_matches(v.language, request.language)
        ]
        made = [
            message
            for message in map(self.made_voice_message, self.engine.profiles.all())
            if request.kind in (synthesize_pb2.VOICE_KIND_UNSPECIFIED, message.kind)
            and language_matches(message.language, request.language)
        ]
        return synthesize_pb2.ListVoicesResponse(
            voices=[voice_message(v) for v in sorted(voices, key=lambda v: v.voice_id)] + made
        )

    async def DeleteVoice(
        self, request: synthesize_pb2.DeleteVoiceRequest, context: aio.ServicerContext
    ) -> synthesize_pb2.DeleteVoiceResponse:
        if self.engine.profiles.get(request.voice_id) is not None:
            self.engine.profiles.delete(request.voice_id)
            self.engine.forget(request.voice_id)
            return synthesize_pb2.DeleteVoiceResponse()
        voice = self.engine.voice(request.voice_id)
        raise PreconditionFailed(
            f"{voice.voice_id!r} is a built-in voice and cannot be deleted; remove its files "
            "from the voices folder instead."
        )


def split_first_clause(text: str) -> list[str]:
    match = _FIRST_CLAUSE.match(text)
    if match is not None:
        return [match.group(1), text[match.end() :]]
    first_sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    words = first_sentence.split()
    if len(words) < MIN_WORDS_TO_SPLIT:
        return [text]
    for index in range(4, min(9, len(words) - 2)):
        if words[index].lower() in _PHRASE_STARTS:
            head = " ".join(words[:index])
            return [head, text[len(head) :].lstrip()]
    return [text]


def language_matches(language: str, wanted: str) -> bool:
    """`zh`, `zh-CN` and `zh_cn` all select zh_CN voices."""
    return language.lower().replace("-", "_").startswith(wanted.lower().replace("-", "_"))


def voice_message(voice: InstalledVoice) -> synthesize_pb2.Voice:
    return synthesize_pb2.Voice(
        voice_id=voice.voice_id,
        display_name=voice.voice_id,
        language=voice.language,
        kind=synthesize_pb2.VOICE_KIND_BUILTIN,
        description=voice.description,
        sample_rate_hz=voice.sample_rate_hz,
    )


def quality_message(report: QualityReport) -> synthesize_pb2.VoiceQualityReport:
    return synthesize_pb2.VoiceQualityReport(
        duration_ms=round(report.duration_s * 1000),
        snr_db=report.snr_db,
        noise_floor_dbfs=report.noise_floor_dbfs,
        clipping_ratio=report.clipping_ratio,
        sample_rate_hz=report.sample_rate_hz,
        speech_ratio=report.speech_ratio,
        warnings=report.warnings,
        advice=ADVICE if report.warnings else "",
    )


def profile_message(profile: VoiceProfile) -> synthesize_pb2.Voice:
    voice = synthesize_pb2.Voice(
        voice_id=profile.voice_id,
        display_name=profile.display_name,
        language=profile.language,
        kind=synthesize_pb2.VOICE_KIND_MATCHED,
        description=profile.description,
        quality=quality_message(QualityReport(**profile.quality)),  # type: ignore[arg-type]
        matched_voice_id=profile.base_voice_id,
        match_similarity=profile.similarity_after,
        consent=profile.consent,
    )
    voice.create_time.FromNanoseconds(int(profile.created * 1e9))
    return voice


def build_program(settings: SynthesizeSettings) -> GrpcProgram:
    engine = PiperEngine(settings)
    servicer = SynthesizeServicer(engine, settings)
    program = GrpcProgram(
        settings,
        [synthesize_pb2.DESCRIPTOR.services_by_name["SynthesizeService"].full_name],
        lambda server: synthesize_pb2_grpc.add_SynthesizeServiceServicer_to_server(
            servicer, server
        ),
        engine.load,
        engine,
    )
    servicer.queue.on_saturation = program.set_overloaded
    return program


def main(argv: list[str] | None = None) -> None:
    run_program(SynthesizeSettings, build_program, argv)


if __name__ == "__main__":
    main()
