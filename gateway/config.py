"""Settings of the gateway program (env prefix `TALKER_GATEWAY_`): how it calls
the stages and where it archives (`pipeline.config.StageSettings`), and its own."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from pipeline.config import StageSettings


class GatewaySettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="TALKER_GATEWAY_", extra="ignore")
    program: ClassVar[str] = "gateway"

    port: int = Field(default=50050, ge=0, le=65535, description="gRPC port.")
    metrics_port: int = Field(default=9150, ge=0, le=65535, description="/metrics port; 0 = off.")

    speculative_replies: bool = Field(
        default=True,
        description="In Converse, start the reply when ASR hears a pause begin (its "
        "speculative result), while the end of the utterance is still being timed; the "
        "reply is held back until the final transcript confirms the guess, else thrown "
        "away. Hides the end-of-utterance wait from the user at the cost of some "
        "discarded work when people pause mid-sentence.",
    )
    stages_wait_s: float = Field(
        default=45,
        gt=0,
        description="At start the gateway reports SERVING once every stage does, or after "
        "this long: then its own health is SERVING and its talker.v1.TalkerService status "
        "NOT_SERVING until the missing stages come (a stage that never does must not get the "
        "gateway restarted by the watchdog).",
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
    archive_media: str = Field(
        default="video",
        pattern=r"^(video|audio|record|off)$",
        description="What each finished turn leaves in the archive: video = an mp4 rendered "
        "by Animate when the turn has an avatar (else a wav), audio = a wav, record = the "
        "JSON record only, off = nothing.",
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
    user_api_keys: dict[str, str] = Field(
        default_factory=dict,
        description="API keys bound to a user: {key: user_id} (JSON in the environment). "
        "Accepted like api_keys; DownloadFile with such a key serves only that user's "
        "files (the keys in api_keys read every file).",
    )
    tls_cert: Path | None = Field(default=None, description="PEM certificate chain: serve TLS.")
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert.")

    def accepted_keys(self) -> frozenset[str]:
        keys = {key.strip() for key in [*self.api_keys, *self.user_api_keys] if key.strip()}
        if self.api_keys_file is not None:
            for line in self.api_keys_file.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    keys.add(line)
        return frozenset(keys)
