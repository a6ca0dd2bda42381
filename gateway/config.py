"""Settings of the gateway program (env prefix `TALKER_GATEWAY_`)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.programs import program_settings
from services.common.settings import ServiceSettings, default_var_dir

# The stages the gateway calls, in chain order (names as in supervisord and PROGRAMS).
STAGES = ("asr", "chat", "synthesize", "animate")


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TALKER_GATEWAY_", extra="ignore")
    program: ClassVar[str] = "gateway"

    port: int = Field(default=50050, ge=0, le=65535, description="gRPC port.")
    metrics_port: int = Field(default=9150, ge=0, le=65535, description="/metrics port; 0 = off.")

    asr_address: str = Field(
        default="", description="host:port of AsrService. Empty: the asr program's own setting."
    )
    chat_address: str = Field(default="", description="host:port of ChatService (empty: chat's).")
    synthesize_address: str = Field(
        default="", description="host:port of SynthesizeService (empty: synthesize's)."
    )
    animate_address: str = Field(
        default="", description="host:port of AnimateService (empty: animate's)."
    )

    # Per-stage deadlines. A stage that overruns fails the turn with DEADLINE_EXCEEDED naming it.
    asr_timeout_s: float = Field(
        default=30, gt=0, description="Deadline of a whole-clip Recognize."
    )
    chat_timeout_s: float = Field(default=60, gt=0, description="Deadline of one reply.")
    synthesize_timeout_s: float = Field(
        default=30, gt=0, description="Deadline of speaking one reply sentence."
    )
    animate_timeout_s: float = Field(
        default=300, gt=0, description="Deadline of a turn's live animation stream."
    )
    render_timeout_s: float = Field(default=600, gt=0, description="Deadline of an mp4 render.")
    lookup_timeout_s: float = Field(
        default=5,
        gt=0,
        description="Deadline of the short bookkeeping calls: looking up a voice or avatar "
        "id before a call, taking a dropped guess back from chat when a call ends.",
    )
    converse_max_s: float = Field(
        default=3600, gt=0, description="Longest a Converse call may stay open, in seconds."
    )
    retry_attempts: int = Field(
        default=3,
        ge=1,
        le=10,
        description="Tries of a downstream call that fails UNAVAILABLE before it produced "
        "anything (a restart in progress), with backoff between them.",
    )
    retry_backoff_s: float = Field(
        default=0.1, ge=0, le=5, description="First retry wait; doubles each time."
    )
    health_wait_s: float = Field(
        default=0.5,
        ge=0,
        le=30,
        description="A stage known to be down (its health Watch says so) is waited for "
        "this long before the call fails fast with UNAVAILABLE naming it.",
    )

    speculative_replies: bool = Field(
        default=True,
        description="In Converse, start the reply when ASR hears a pause begin (its "
        "speculative result), while the end of the utterance is still being timed; the "
        "reply is held back until the final transcript confirms the guess, else thrown "
        "away. Hides the end-of-utterance wait from the user at the cost of some "
        "discarded work when people pause mid-sentence.",
    )
    max_conversations: int = Field(
        default=2,
        ge=1,
        description="Calls that run turns at once: each open Converse for its whole life, "
        "each Ask while its turn runs. The next one is refused at once with "
        "RESOURCE_EXHAUSTED and a `retry-after-ms` trailer, so the calls in progress keep "
        "their latency. Measured with `python -m bench load` on 2 cores: 2 devices kept "
        "first audio p50/p95 near one device's (1032/1653 ms vs 1182/1470), 4 pushed p95 "
        "to 4278 ms, 8 took p50 to 7430 ms. On a bigger host, measure and raise it.",
    )
    busy_retry_after_s: float = Field(
        default=5,
        gt=0,
        le=3600,
        description="The wait a refused caller is told to take (trailer `retry-after-ms`).",
    )
    archive_dir: Path = Field(
        default_factory=lambda: default_var_dir() / "archive",
        description="Root of the archive: {root}/{date}/{user_id}_{timestamp}_{scene}.mp4 + .json.",
    )
    archive_media: str = Field(
        default="video",
        pattern=r"^(video|audio|record|off)$",
        description="What each finished turn leaves in the archive: video = an mp4 rendered "
        "by Animate when the turn has an avatar (else a wav), audio = a wav, record = the "
        "JSON record only, off = nothing.",
    )
    archive_retention_days: float = Field(
        default=30, ge=0, description="Archived turns older than this are deleted; 0 keeps all."
    )
    max_question_chars: int = Field(
        default=2000, ge=1, description="Longest typed question accepted, in characters."
    )
    max_clip_s: float = Field(default=60, gt=0, description="Longest recorded question, seconds.")

    api_keys: list[str] = Field(
        default_factory=list,
        description="Accepted API keys (JSON list in the environment). When any is set, "
        "every TalkerService call needs `authorization: Bearer <key>` metadata.",
    )
    api_keys_file: Path | None = Field(
        default=None, description="A file of API keys, one a line (# comments), added to api_keys."
    )
    tls_cert: Path | None = Field(default=None, description="PEM certificate chain: serve TLS.")
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert.")

    def stage_address(self, stage: str) -> str:
        address: str = getattr(self, f"{stage}_address")
        if address:
            return address
        settings = program_settings(stage)
        return f"{settings.host}:{settings.port}"

    def accepted_keys(self) -> frozenset[str]:
        keys = {key.strip() for key in self.api_keys if key.strip()}
        if self.api_keys_file is not None:
            for line in self.api_keys_file.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    keys.add(line)
        return frozenset(keys)
