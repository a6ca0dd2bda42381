"""Settings of the web program (env prefix `TALKER_WEB_`)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from gateway.config import GatewaySettings
from pipeline.config import STAGE_SETTINGS
from services.common.settings import ServiceSettings


class WebSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TALKER_WEB_", extra="ignore")
    program: ClassVar[str] = "web"

    # `host` (inherited) is loopback by default: browsers allow the microphone on
    # localhost without TLS; to face other machines set host and the TLS files.
    port: int = Field(
        default=50055,
        ge=0,
        le=65535,
        description="gRPC port of the program's grpc.health.v1 and reflection (what the "
        "watchdog and the readiness wait probe, as for every program). The page and the "
        "HTTP endpoints are on `http_port`.",
    )
    http_port: int = Field(
        default=8090, ge=0, le=65535, description="HTTP(S) port of the page and the /v1 endpoints."
    )
    metrics_port: int = Field(default=9156, ge=0, le=65535, description="/metrics port; 0 = off.")

    gateway_address: str = Field(
        default="", description="host:port of the gateway (TalkerService). Empty: its own setting."
    )
    gateway_api_key: str = Field(
        default="",
        description="Key sent to the gateway when the HTTP request itself carried none "
        "(a web program without keys in front of a gateway with keys). A request's own "
        "key is always passed on as it came.",
    )
    gateway_tls_ca: Path | None = Field(
        default=None,
        description="PEM certificate(s) to trust for a gateway that serves TLS; unset: plaintext.",
    )
    asr_address: str = Field(
        default="", description="host:port of AsrService (empty: the asr program's own)."
    )
    chat_address: str = Field(default="", description="host:port of ChatService (empty: chat's).")
    synthesize_address: str = Field(
        default="", description="host:port of SynthesizeService (empty: synthesize's)."
    )
    animate_address: str = Field(
        default="",
        description="host:port of AnimateService (empty: animate's): the page's avatar list, "
        "portrait uploads and the avatar's face at rest.",
    )

    api_keys: list[str] = Field(
        default_factory=list,
        description="Accepted API keys (JSON list in the environment), as the gateway's. "
        "When any is set, the page and every endpoint need one: `Authorization: Bearer "
        "<key>`, `x-api-key: <key>`, or (the page) `?key=<key>` once, kept in a cookie.",
    )
    api_keys_file: Path | None = Field(
        default=None, description="A file of API keys, one a line (# comments), added to api_keys."
    )
    tls_cert: Path | None = Field(default=None, description="PEM certificate chain: serve HTTPS.")
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert.")

    max_upload_bytes: int = Field(
        default=25 * 1024 * 1024,
        ge=1024,
        description="Largest request body (an uploaded clip or portrait), in bytes; "
        "larger ones get 413.",
    )
    max_sessions: int = Field(
        default=4, ge=1, description="Live browser (WebRTC) sessions at once; more get 503."
    )
    max_session_s: float = Field(
        default=600, gt=0, description="Longest a live browser session may last, in seconds."
    )
    page_gone_after_s: float = Field(
        default=10,
        gt=0,
        description="A live session whose page sends no microphone audio for this long (from "
        "the answer to its offer, then from its last audio) is closed, and its place and its "
        "gateway conversation freed: the page vanished without "
        "a goodbye (a crashed tab, a lost network). A live page sends audio all the time; "
        "WebRTC's own consent check would take 25-35 s.",
    )
    request_timeout_s: float = Field(
        default=120, gt=0, description="Deadline of one HTTP endpoint's downstream calls."
    )
    download_chunk_bytes: int = Field(
        default=256 * 1024,
        ge=4096,
        le=4 * 1024 * 1024,
        description="Size of the chunks a download asks the gateway for, in bytes.",
    )

    def address_of(self, program: str) -> str:
        """host:port of the gateway or a stage: this program's setting, else the program's own."""
        address: str = getattr(self, f"{program}_address")
        if address:
            return address
        settings = GatewaySettings() if program == "gateway" else STAGE_SETTINGS[program]()
        return f"{settings.host}:{settings.port}"

    def accepted_keys(self) -> frozenset[str]:
        keys = {key.strip() for key in self.api_keys if key.strip()}
        if self.api_keys_file is not None:
            for line in self.api_keys_file.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    keys.add(line)
        return frozenset(keys)
