"""AsrService: translates between talker.v1 messages and the Whisper engine."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from grpc import aio

from services.asr.config import AsrSettings
from services.asr.engine import SAMPLE_RATE_HZ, Transcript, WhisperEngine
from services.asr.script import ChineseScript
from services.asr.streaming import (
    EndOfUtterance,
    Result,
    SilenceTimeout,
    SpeechStarted,
    StreamingRecognizer,
    StreamOptions,
    StreamOutput,
)
from services.common.audio import (
    PcmLayout,
    StreamResampler,
    decode_clip,
    decode_pcm,
    raw_layout,
    resample,
)
from services.common.errors import InvalidInput, LimitExceeded
from services.common.runtime import GrpcProgram, run_program
from services.common.work_queue import WorkQueue
from talker.v1 import asr_pb2, asr_pb2_grpc

log = logging.getLogger("talker.asr")

MAX_BEAM_SIZE = 10
MAX_PROMPT_CHARS = 1000


class AsrServicer(asr_pb2_grpc.AsrServiceServicer):
    def __init__(self, engine: WhisperEngine, settings: AsrSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.clips = WorkQueue("asr_clips", settings.decode_workers, settings.max_waiting_clips)
        self.script = ChineseScript(settings.chinese_script)
        self.live_streams = 0

    # ---- Recognize ------------------------------------------------------------
    async def Recognize(
        self, request: asr_pb2.RecognizeRequest, context: aio.ServicerContext
    ) -> asr_pb2.RecognizeResponse:
        config = request.config
        language = self.engine.check_language(config.language)
        self._check_common(config)
        audio_format = request.format
        audio, rate = decode_clip(
            request.audio, audio_format.encoding, audio_format.sample_rate_hz, audio_format.channels
        )
        duration_s = len(audio) / rate
        if duration_s > self.settings.max_clip_s:
            raise LimitExceeded(
                f"The clip is {duration_s:.0f} s long; Recognize takes at most "
                f"{self.settings.max_clip_s:.0f} s. Use StreamingRecognize for longer audio."
            )
        audio16 = resample(audio, rate, SAMPLE_RATE_HZ)
        async with self.clips.slot():
            transcript = await asyncio.to_thread(
                self.engine.transcribe_clip,
                audio16,
                language,
                config.initial_prompt,
                config.beam_size,
                config.word_timestamps,
            )
        return transcript_message(transcript, self.script)

    def _check_common(self, config: asr_pb2.RecognitionConfig) -> None:
        if config.beam_size > MAX_BEAM_SIZE:
            raise InvalidInput(f"beam_size is {config.beam_size}; it must be 0 (default) to 10.")
        if len(config.initial_prompt) > MAX_PROMPT_CHARS:
            raise InvalidInput(
                f"initial_prompt has {len(config.initial_prompt)} characters; "
                f"at most {MAX_PROMPT_CHARS} are used."
            )

    # ---- StreamingRecognize ---------------------------------------------------
    async def StreamingRecognize(
        self,
        request_iterator: AsyncIterator[asr_pb2.StreamingRecognizeRequest],
        context: aio.ServicerContext,
    ) -> AsyncIterator[asr_pb2.StreamingRecognizeResponse]:
        if self.live_streams >= self.settings.max_streams:
            raise LimitExceeded(
                f"ASR is already serving {self.live_streams} live streams, its limit; "
                "try again shortly."
            )
        self.live_streams += 1
        incoming: asyncio.Queue[Any] = asyncio.Queue(maxsize=256)
        reader = asyncio.create_task(_pump(request_iterator, incoming))
        stream: LiveStream | None = None
        try:
            stream = self._open(await incoming.get())
            while not stream.recognizer.finished:
                for response in stream_messages(await stream.step(incoming), self.script):
                    yield response
            if stream.failure is not None:
                raise stream.failure
        finally:
            self.live_streams -= 1
            reader.cancel()
            if stream is not None:
                stream.close()

    def _open(self, first: Any) -> LiveStream:
        """A stream's recognizer from its first message (the config)."""
        if first is _END:
            raise InvalidInput("The stream ended before its first message (the config).")
        if isinstance(first, BaseException):
            raise first
        if first.WhichOneof("request") != "config":
            raise InvalidInput(
                "The first message of a stream must carry `config`; it carried "
                f"{first.WhichOneof('request') or 'nothing'}."
            )
        layout, options = self._stream_options(first.config)
        ready = asyncio.Event()
        loop = asyncio.get_running_loop()

        def wake() -> None:  # called from the stream's decoder thread
            if not loop.is_closed():  # a decode may end after the server shut down
                loop.call_soon_threadsafe(ready.set)

        return LiveStream(
            StreamingRecognizer(self.engine, options, on_ready=wake),
            StreamResampler(layout.sample_rate_hz, SAMPLE_RATE_HZ),
            layout,
            self.settings.max_stream_s,
            ready,
        )

    def _stream_options(
        self, config: asr_pb2.StreamingRecognitionConfig
    ) -> tuple[Any, StreamOptions]:
        settings = self.settings
        recognition = config.config
        language = self.engine.check_language(recognition.language)
        self._check_common(recognition)
        layout = raw_layout(
            config.format.encoding, config.format.sample_rate_hz, config.format.channels
        )
        check_stream_config(config)
        options = StreamOptions(
            language=language,
            initial_prompt=recognition.initial_prompt,
            beam_size=recognition.beam_size or settings.stream_beam_size,
            interim_results=config.interim_results,
            interim_interval_ms=config.interim_interval_ms or settings.interim_interval_ms,
            end_of_utterance_silence_ms=config.end_of_utterance_silence_ms
            or settings.end_of_utterance_silence_ms,
            silence_timeout_s=float(config.silence_timeout_s or settings.silence_timeout_s),
            single_utterance=config.single_utterance,
            vad_threshold=settings.vad_threshold,
            max_utterance_s=settings.max_utterance_s,
            speculative_results=config.speculative_results,
            # A beam_size the caller asks for applies to every decode of the stream.
            final_beam_size=recognition.beam_size or settings.final_beam_size,
        )
        return layout, options


def check_stream_config(config: asr_pb2.StreamingRecognitionConfig) -> None:
    if config.interim_interval_ms and config.interim_interval_ms < 200:
        raise InvalidInput(
            f"interim_interval_ms is {config.interim_interval_ms}; it must be 0 (default) "
            "or at least 200."
        )
    if config.end_of_utterance_silence_ms and not (
        100 <= config.end_of_utterance_silence_ms <= 5000
    ):
        raise InvalidInput(
            f"end_of_utterance_silence_ms is {config.end_of_utterance_silence_ms}; it must be "
            "0 (default) or between 100 and 5000."
        )
    if config.silence_timeout_s > 3600:
        raise InvalidInput(
            f"silence_timeout_s is {config.silence_timeout_s}; it must be at most 3600."
        )


@dataclass
class LiveStream:
    """One StreamingRecognize call after its config: audio in, speech events and
    results out. Audio goes through the VAD on the event loop as it comes (a
    fraction of a millisecond a chunk); decodes finish on the recognizer's own
    thread and wake the loop through `ready`."""

    recognizer: StreamingRecognizer
    resampler: StreamResampler
    layout: PcmLayout
    max_stream_s: float
    ready: asyncio.Event
    received: int = 0  # samples at the caller's rate
    chunks: int = 0
    failure: Exception | None = None  # raised once every result before it is sent
    _next: asyncio.Future[Any] | None = None

    async def step(self, incoming: asyncio.Queue[Any]) -> list[StreamOutput]:
        """What the next message or decode brings."""
        recognizer = self.recognizer
        if recognizer.done:
            await self.ready.wait()
            self.ready.clear()
            return recognizer.take()
        if self._next is None:
            self._next = asyncio.ensure_future(incoming.get())
        woken = asyncio.ensure_future(self.ready.wait())
        finished, _ = await asyncio.wait(
            {self._next, woken},
            timeout=recognizer.options.silence_timeout_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
        woken.cancel()
        self.ready.clear()
        if not finished:
            # Nothing at all arrived: a device that stopped sending is a silent one.
            recognizer.stop()
            return [*recognizer.take(), SilenceTimeout(recognizer.audio_ms)]
        if self._next not in finished:
            return recognizer.take()
        message, self._next = self._next.result(), None
        if message is _END:
            tail = self.resampler.process(np.zeros(0, np.float32), last=True)
            return [*recognizer.accept(tail), *recognizer.finish()]
        if isinstance(message, BaseException):
            raise message
        return self._audio(message)

    def _audio(self, message: asr_pb2.StreamingRecognizeRequest) -> list[StreamOutput]:
        self.chunks += 1
        which = message.WhichOneof("request")
        if which != "audio":
            raise InvalidInput(
                f"Message {self.chunks} of the stream carried {which or 'nothing'}; only the "
                "first message may carry config, every later one carries audio."
            )
        samples = decode_pcm(message.audio, self.layout, f"audio chunk {self.chunks}")
        self.received += len(samples)
        if self.received > self.max_stream_s * self.layout.sample_rate_hz:
            self.failure = LimitExceeded(
                f"The stream reached its limit of {self.max_stream_s:.0f} s of audio; the "
                "utterance in progress was finalised. Open a new stream to continue."
            )
            return self.recognizer.finish()
        return self.recognizer.accept(self.resampler.process(samples))

    def close(self) -> None:
        self.recognizer.close()
        if self._next is not None:
            self._next.cancel()


_END = object()


async def _pump(request_iterator: AsyncIterator[Any], incoming: asyncio.Queue[Any]) -> None:
    """Reads the client's messages into a queue, so the handler can wait on it
    with a timeout (cancelling a gRPC read mid-way is not safe)."""
    try:
        async for message in request_iterator:
            await incoming.put(message)
        await incoming.put(_END)
    except asyncio.CancelledError:
        raise
    except Exception as error:
        await incoming.put(error)


def transcript_message(transcript: Transcript, script: ChineseScript) -> asr_pb2.RecognizeResponse:
    language = transcript.language
    return asr_pb2.RecognizeResponse(
        text=script(transcript.text, language),
        language=language,
        language_probability=transcript.language_probability,
        segments=[
            asr_pb2.Segment(
                text=script(s.text, language),
                start_ms=round(s.start_s * 1000),
                end_ms=round(s.end_s * 1000),
                avg_logprob=s.avg_logprob,
                no_speech_probability=s.no_speech_probability,
                words=[
                    asr_pb2.Word(
                        text=script(w.text, language),
                        start_ms=round(w.start_s * 1000),
                        end_ms=round(w.end_s * 1000),
                        probability=w.probability,
                    )
                    for w in s.words
                ],
            )
            for s in transcript.segments
        ],
        audio_duration_ms=round(transcript.audio_duration_s * 1000),
        speech_duration_ms=round(transcript.speech_duration_s * 1000),
    )


_EVENT_TYPES = {
    SpeechStarted: asr_pb2.SPEECH_EVENT_TYPE_SPEECH_STARTED,
    EndOfUtterance: asr_pb2.SPEECH_EVENT_TYPE_END_OF_UTTERANCE,
    SilenceTimeout: asr_pb2.SPEECH_EVENT_TYPE_SILENCE_TIMEOUT,
}


def stream_messages(
    outputs: list[StreamOutput], script: ChineseScript
) -> list[asr_pb2.StreamingRecognizeResponse]:
    messages = []
    for output in outputs:
        if isinstance(output, Result):
            text = script(output.text, output.language)
            messages.append(
                asr_pb2.StreamingRecognizeResponse(
                    result=asr_pb2.StreamingRecognitionResult(
                        text=text,
                        is_final=output.is_final,
                        language=output.language,
                        start_ms=output.start_ms,
                        end_ms=output.end_ms,
                        utterance_index=output.utterance_index,
                        stability=output.stability,
                        speculative=output.speculative,
                        segments=[
                            asr_pb2.Segment(
                                text=text,
                                start_ms=output.start_ms,
                                end_ms=output.end_ms,
                                no_speech_probability=output.no_speech_probability,
                            )
                        ]
                        if output.is_final and output.text
                        else [],
                    )
                )
            )
        else:
            messages.append(
                asr_pb2.StreamingRecognizeResponse(
                    event=asr_pb2.SpeechEvent(
                        type=_EVENT_TYPES[type(output)], offset_ms=output.offset_ms
                    )
                )
            )
    return messages


def build_program(settings: AsrSettings) -> GrpcProgram:
    engine = WhisperEngine(settings)
    servicer = AsrServicer(engine, settings)
    return GrpcProgram(
        settings,
        [asr_pb2.DESCRIPTOR.services_by_name["AsrService"].full_name],
        lambda server: asr_pb2_grpc.add_AsrServiceServicer_to_server(servicer, server),
        engine.load,
        engine,
    )


def main(argv: list[str] | None = None) -> None:
    run_program(AsrSettings, build_program, argv)


if __name__ == "__main__":
    main()
