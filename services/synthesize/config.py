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
    mandarin_voices: list[str] = Field(
        default=["Aiyue", "biaobei", "Xiaobei", "Aicheng", "Aida"],
        description="Built-in speakers of the Mandarin voice (ttskit's Mellotron + MelGAN, "
        "in its PyPI wheel) to offer, listed as `zh_CN-mellotron-<name>`; any of its 24 "
        "(Aibao ... Yina, biaobei). Empty: no Mandarin voice (its model is not loaded). "
        "Aiyue, biaobei, Aicheng and Aida came back from Whisper base at 1.7% character "
        "error; Xiaogang, Xiaomei, Xiaowei and Yina are unintelligible.",
    )
    default_mandarin_voice_id: str = Field(
        default="zh_CN-mellotron-aiyue",
        description="Voice for text in Chinese characters sent with no voice or the default "
        "(English) voice. A Piper voice for `zh` in the voices folder takes precedence.",
    )
    mandarin_model_dir: Path | None = Field(
        default=None,
        description="Folder holding mellotron.kuangdd-mspk.pt and melgan.kuangdd.pt; unset: "
        "the ones inside the installed ttskit package.",
    )
    mandarin_torch_threads: int = Field(
        default=1,
        ge=1,
        le=64,
        description="torch intra-op threads for the Mandarin voice. 1 by default: on a "
        "shared 2-core host, 2 threads made one clause 14x slower (OpenMP threads spinning "
        "against other programs' work: 8.6 s vs 0.25 s for 1.7 s of speech, measured).",
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
        # Piper voices always; Mellotron for Mandarin unless switched off; XTTS
        # as well for cloned voices when it is configured.
        model = self.embedded_model
        if self.mandarin_voices:
            model += " + mellotron (ttskit)"
        if self.coqui_model_dir:
            model += f" + xtts {self.coqui_model_dir}"
        return model
