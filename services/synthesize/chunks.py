"""Speech pieces as the AudioChunk messages of one Synthesize call: resampled
to the rate asked for, cut into `chunk_ms` chunks, each carrying the phoneme
timings that start in it on the call's clock, and the sentence it belongs to."""

from __future__ import annotations

import time

import numpy as np

from services.common.audio import StreamResampler, encode_samples, streaming_wav_header
from services.synthesize.speech import SpeechPiece
from talker.v1 import audio_pb2, synthesize_pb2


class AudioChunker:
    def __init__(
        self,
        source_rate_hz: int,
        rate_hz: int,
        encoding: int,
        chunk_ms: int,
        notation: str,
        received: float,
    ) -> None:
        self.received = received  # perf_counter() when the call came in
        self.source_rate_hz = source_rate_hz
        self.rate_hz = rate_hz
        self.encoding = encoding
        self.notation = notation
        self.format = audio_pb2.AudioFormat(encoding=encoding, sample_rate_hz=rate_hz, channels=1)
        self.chunk_samples = rate_hz * chunk_ms // 1000
        self.resampler = StreamResampler(source_rate_hz, rate_hz)
        self.sent = 0
        self.source_samples = 0  # at the voice's own rate: the timings' clock
        self.pending: list[audio_pb2.PhonemeTiming] = []
        self.sentence_count = 0  # sentences whose audio has all been handed over
        self.first_chunk_ms = 0
        self.header = (
            streaming_wav_header(rate_hz) if encoding == audio_pb2.AUDIO_ENCODING_WAV else b""
        )

    def chunks(self, piece: SpeechPiece | None) -> list[synthesize_pb2.AudioChunk]:
        """The chunks of one piece; None: the end (the resampler's tail)."""
        last = piece is None
        samples, ends_sentence = np.zeros(0, np.float32), False
        if piece is not None:
            samples, ends_sentence, sounds = piece
            self._add_sounds(sounds)
            self.source_samples += len(samples)
        audio = self.resampler.process(samples, last=last)
        # The resampler's tail, flushed at the end, is the last sentence's.
        sentence_index = max(self.sentence_count - 1, 0) if last else self.sentence_count
        chunks = [
            self._chunk(audio[start : start + self.chunk_samples], sentence_index)
            for start in range(0, len(audio), self.chunk_samples)
        ]
        if ends_sentence:
            self.sentence_count += 1
        return chunks

    def _add_sounds(self, sounds: list[tuple[str, float, float]]) -> None:
        start_s = self.source_samples / self.source_rate_hz
        self.pending += [
            audio_pb2.PhonemeTiming(
                phoneme=p,
                start_ms=round((start_s + s) * 1000),
                duration_ms=round(d * 1000),
                notation=self.notation,
            )
            for p, s, d in sounds
        ]

    def _chunk(self, piece: np.ndarray, sentence_index: int) -> synthesize_pb2.AudioChunk:
        if not self.first_chunk_ms:
            self.first_chunk_ms = max(1, round((time.perf_counter() - self.received) * 1000))
        chunk = synthesize_pb2.AudioChunk(
            audio=self.header + encode_samples(piece, self.encoding),
            format=self.format,
            offset_samples=self.sent,
            offset_ms=self.sent * 1000 // self.rate_hz,
            duration_ms=len(piece) * 1000 // self.rate_hz,
            sentence_index=sentence_index,
            phonemes=self.pending,
        )
        self.pending, self.header = [], b""
        self.sent += len(piece)
        return chunk

    def finished(self) -> synthesize_pb2.SynthesisFinished:
        return synthesize_pb2.SynthesisFinished(
            duration_ms=self.sent * 1000 // self.rate_hz,
            sample_count=self.sent,
            sentence_count=self.sentence_count,
            first_chunk_ms=self.first_chunk_ms,
        )
