"""SynthesizeService: streaming speech from installed Piper voices and the
Mandarin voice (chosen for Chinese text when the caller names no voice), from
voices matched to a reference recording, and from voices cloned from one by a
Coqui XTTS model when one is configured (CreateVoice)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from services.common.audio import OUTPUT_ENCODINGS, decode_clip, encoding_name
from services.common.bridge import ThreadStream
from services.common.errors import InvalidInput, LimitExceeded, PreconditionFailed
from services.common.runtime import GrpcProgram, run_program
from services.common.text import split_first_clause
from services.common.work_queue import WorkQueue
from services.synthesize.chunks import AudioChunker
from services.synthesize.config import SynthesizeSettings
from services.synthesize.engine import InstalledVoice, NewVoice, PiperEngine
from services.synthesize.voice_profiles import (
    ADVICE,
    CLONED,
    QualityReport,
    VoiceProfile,
    assess_reference,
)
from talker.v1 import audio_pb2, synthesize_pb2, synthesize_pb2_grpc

log = logging.getLogger("talker.synthesize")

# Trailing metadata naming the voice that spoke (archive records cite it).
VOICE_METADATA_KEY = "x-talker-voice"
MIN_OUTPUT_RATE_HZ = 8_000
MAX_OUTPUT_RATE_HZ = 48_000


class SynthesizeServicer(synthesize_pb2_grpc.SynthesizeServiceServicer):
    def __init__(self, engine: PiperEngine, settings: SynthesizeSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.queue = WorkQueue("synthesize", settings.workers, settings.max_waiting)

    async def Synthesize(
        self, request: synthesize_pb2.SynthesizeRequest, context: aio.ServicerContext
    ) -> AsyncIterator[synthesize_pb2.SynthesizeResponse]:
        received = time.perf_counter()
        text = self._text(request.text)
        rate_hz, encoding = self._output(request.output_format)
        speaking_rate = check_speaking_rate(request.speaking_rate)
        await self._mandarin_if_needed(request.voice_id, text)
        # A Piper voice says the first phrase on its own: the first chunk comes early.
        speech = self.engine.speech_for(request.voice_id, text, split_first_clause)
        # The voice that speaks, which may not be the one asked for (Chinese text
        # sent to the default voice), for the caller's records. A trailer, not a
        # header: the shared interceptor sends the headers before this handler runs.
        context.set_trailing_metadata(((VOICE_METADATA_KEY, speech.voice_id),))
        chunker = AudioChunker(
            speech.sample_rate_hz,
            rate_hz,
            encoding,
            self.settings.chunk_ms,
            speech.notation,
            received,
        )
        async with (
            self.queue.slot(),
            ThreadStream(lambda stop: speech.speak(text, speaking_rate, stop)) as pieces,
        ):
            async for piece in pieces:
                for chunk in chunker.chunks(piece):
                    yield synthesize_pb2.SynthesizeResponse(chunk=chunk)
            for chunk in chunker.chunks(None):
                yield synthesize_pb2.SynthesizeResponse(chunk=chunk)
        yield synthesize_pb2.SynthesizeResponse(finished=chunker.finished())

    def _text(self, text: str) -> str:
        text = text.strip()
        if not text:
            raise InvalidInput("text is empty: send the words to speak.")
        if len(text) > self.settings.max_text_chars:
            raise LimitExceeded(
                f"text has {len(text)} characters; one call speaks at most "
                f"{self.settings.max_text_chars}. Split it into several calls."
            )
        return text

    async def _mandarin_if_needed(self, voice_id: str | None = None, text: str = "") -> None:
        """Waits (off the event loop) for the Mandarin voice while it still loads
        after SERVING, when this call may need it; `voice_id` None: any call."""
        if (voice_id is None and self.engine.mandarin_loading) or (
            voice_id is not None and self.engine.waits_for_mandarin(voice_id, text)
        ):
            log.info("waiting for the Mandarin voice to finish loading")
            await asyncio.to_thread(self.engine.wait_for_voices)

    async def CreateVoice(
        self,
        request_iterator: AsyncIterator[synthesize_pb2.CreateVoiceRequest],
        context: aio.ServicerContext,
    ) -> synthesize_pb2.CreateVoiceResponse:
        config, recording = await self._reference(request_iterator)
        named = NewVoice(
            display_name=config.display_name.strip(),
            language=config.language,
            description=config.description[:500],
            consent=config.consent,
        )
        if not named.display_name or len(named.display_name) > 80:
            raise InvalidInput("display_name must be 1 to 80 characters.")
        cloned = self._cloned(config)
        await self._mandarin_if_needed()
        base = self.engine.base_for(config.language)
        named.language = config.language or base.language
        if cloned:  # refused before the recording is analysed: no model, or not its language
            self.engine.require_cloner().language_code(named.language)
        audio, rate_hz = self._reference_audio(config.format, recording)
        report = await asyncio.to_thread(assess_reference, audio, rate_hz)
        if not report.acceptable:
            reasons = " ".join(f"({i}) {p}" for i, p in enumerate(report.problems, start=1))
            raise InvalidInput(f"The reference recording cannot be used: {reasons} {ADVICE}")
        if config.validate_only:
            return synthesize_pb2.CreateVoiceResponse(
                voice=checked_voice_message(named, report, cloned, base.voice_id)
            )
        async with self.queue.slot():
            profile = await asyncio.to_thread(
                self.engine.make_voice, audio, rate_hz, cloned, base, report, named
            )
        return synthesize_pb2.CreateVoiceResponse(voice=self.made_voice_message(profile))

    async def _reference(
        self, request_iterator: AsyncIterator[synthesize_pb2.CreateVoiceRequest]
    ) -> tuple[synthesize_pb2.CreateVoiceConfig, bytes]:
        """The config (first message) and the recording (the rest), bounded."""
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
        return config, b"".join(pieces)

    def _cloned(self, config: synthesize_pb2.CreateVoiceConfig) -> bool:
        """Whether the voice is to be cloned (else matched), consent checked first."""
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
        if kind not in (synthesize_pb2.VOICE_KIND_CLONED, synthesize_pb2.VOICE_KIND_MATCHED):
            raise InvalidInput(
                "kind must be VOICE_KIND_MATCHED or VOICE_KIND_CLONED (or unset); built-in "
                "voices are added as files to the voices folder."
            )
        return kind == synthesize_pb2.VOICE_KIND_CLONED

    def _reference_audio(self, fmt: audio_pb2.AudioFormat, recording: bytes) -> tuple[Any, int]:
        audio, rate_hz = decode_clip(recording, fmt.encoding, fmt.sample_rate_hz, fmt.channels)
        if len(audio) / rate_hz > self.settings.max_reference_s:
            raise LimitExceeded(
                f"The reference is {len(audio) / rate_hz:.0f} s long; at most "
                f"{self.settings.max_reference_s:.0f} s is used. Send a shorter excerpt."
            )
        return audio, rate_hz

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
        await self._mandarin_if_needed()
        profile = self.engine.profiles.get(request.voice_id)
        if profile is not None:
            return synthesize_pb2.GetVoiceResponse(voice=self.made_voice_message(profile))
        return synthesize_pb2.GetVoiceResponse(
            voice=voice_message(self.engine.voice(request.voice_id))
        )

    async def ListVoices(
        self, request: synthesize_pb2.ListVoicesRequest, context: aio.ServicerContext
    ) -> synthesize_pb2.ListVoicesResponse:
        await self._mandarin_if_needed()
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
        await self._mandarin_if_needed()
        if self.engine.profiles.get(request.voice_id) is not None:
            self.engine.profiles.delete(request.voice_id)
            self.engine.forget(request.voice_id)
            return synthesize_pb2.DeleteVoiceResponse()
        voice = self.engine.voice(request.voice_id)
        raise PreconditionFailed(
            f"{voice.voice_id!r} is a built-in voice and cannot be deleted; remove its files "
            "from the voices folder instead."
        )


def check_speaking_rate(speaking_rate: float) -> float:
    rate = speaking_rate or 1.0
    if not (math.isfinite(rate) and 0.5 <= rate <= 2.0):
        raise InvalidInput(
            f"speaking_rate is {speaking_rate}; it must be 0 (normal) or from 0.5 to 2.0."
        )
    return rate


def checked_voice_message(
    named: NewVoice, report: QualityReport, cloned: bool, base_voice_id: str
) -> synthesize_pb2.Voice:
    """A voice that would be made (validate_only)."""
    return synthesize_pb2.Voice(
        display_name=named.display_name,
        language=named.language,
        kind=synthesize_pb2.VOICE_KIND_CLONED if cloned else synthesize_pb2.VOICE_KIND_MATCHED,
        quality=quality_message(report),
        matched_voice_id="" if cloned else base_voice_id,
    )


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
