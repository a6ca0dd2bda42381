"""Settings of the synthesize program (env prefix `TALKER_SYNTHESIZE_`)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings, default_var_dir


class SynthesizeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TALKER_SYNTHESIZE_", extra="ignore")
    program: ClassVar[str] = "synthesize"
    embedded_model: ClassVar[str] = "piper (voices folder)"

    port: int = Field(default=50053, ge=0, le=65535, description="gRPC port.")
    metrics_port: int = Field(default=9153, ge=0, le=65535, description="/metrics port; 0 = off.")

    voices_dir: Path = Field(
        default_factory=lambda: default_var_dir() / "voices",
        description="Extra Piper voices: drop `<name>.onnx` + `<name>.onnx.json` here; the "
        "voice id is `<name>`. The embedded en_US-joe-medium is always there.",
    )
    default_voice_id: str = Field(
        default="en_US-joe-medium", description="Voice used when a request names none."
    )
    default_sample_rate_hz: int = Field(
        default=24_000, ge=8_000, le=48_000, description="Output rate when a request sets none."
    )
    max_text_chars: int = Field(
        default=5000, ge=1, description="Longest text one Synthesize call takes, characters."
    )
    chunk_ms: int = Field(
        default=200,
        ge=20,
        le=2000,
        description="Audio per streamed chunk, ms. Piper makes a sentence at a time; it "
        "is sent in pieces this long so players can start at once.",
    )
    onnx_threads: int = Field(
        default=2,
        ge=1,
        le=64,
        description="onnxruntime intra-op threads per voice. 2 halves the time to the "
        "first chunk on a 2-core host (measured 82 vs 141 ms for a 1.8 s clause); lower it "
        "to share the host with other programs.",
    )
    max_waiting: int = Field(
        default=16, ge=0, description="Syntheses waiting for a voice; more get RESOURCE_EXHAUSTED."
    )
    max_reference_s: float = Field(
        default=300, gt=0, description="Longest reference recording CreateVoice uses, s."
    )
    max_reference_bytes: int = Field(
        default=64 * 2**20, ge=1, description="Largest reference recording accepted, bytes."
    )
    workers: int = Field(default=2, ge=1, le=32, description="Syntheses running at once.")
    torch_threads: int = Field(
        default=2,
        ge=1,
        le=64,
        description="torch intra-op threads, set only when a Coqui XTTS model is configured "
        "(setting them otherwise slows Piper: torch's thread pool competes with onnxruntime's); "
        "lower it to share the host with other programs.",
    )
    coqui_model_dir: Path | None = Field(
        default=None,
        description="Folder of a Coqui XTTS model (config.json, model.pth, vocab.json; e.g. "
        "XTTS-v2) for neural voice cloning. Set: CreateVoice makes VOICE_KIND_CLONED voices "
        "(the default kind) and Synthesize streams them from XTTS. Unset: only "
        "VOICE_KIND_MATCHED voices, and coqui-tts is never imported.",
    )
    require_consent: Literal["cloned", "all", "none"] = Field(
        default="cloned",
        description="Which voices CreateVoice makes only with `consent` set (the caller "
        "confirms the recorded speaker agreed): `cloned` (neural clones reproduce a "
        "person's voice), `all` (matched voices too) or `none`. Refused: INVALID_ARGUMENT.",
    )
    coqui_stream_chunk_tokens: int = Field(
        default=20,
        ge=1,
        le=200,
        description="XTTS GPT tokens per streamed chunk (one token is ~46 ms of speech): "
        "fewer give the first audio sooner, at more decoder work per second of speech.",
    )

    def model_id(self) -> str:
        # Piper voices always; XTTS as well for cloned voices when it is configured.
        if self.coqui_model_dir:
            return f"{self.embedded_model} + xtts {self.coqui_model_dir}"
        return self.embedded_model
