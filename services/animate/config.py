"""Settings of the animate program (env prefix `TALKER_ANIMATE_`)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings, default_var_dir


class AnimateSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TALKER_ANIMATE_", extra="ignore")
    program: ClassVar[str] = "animate"
    embedded_model: ClassVar[str] = "portrait-animator (embedded)"
    model_settings: ClassVar[tuple[str, ...]] = ("wav2lip_checkpoint",)

    port: int = Field(default=50054, ge=0, le=65535, description="gRPC port.")
    metrics_port: int = Field(default=9154, ge=0, le=65535, description="/metrics port; 0 = off.")
    avatars_dir: Path = Field(
        default_factory=lambda: default_var_dir() / "avatars",
        description="Where avatars (portrait + prepared face data) are kept across restarts.",
    )
    max_yaw_deg: float = Field(
        default=15.0, gt=0, le=90, description="Most head turn accepted, degrees."
    )
    min_side_px: int = Field(default=256, ge=64, description="Shortest image side accepted, px.")
    min_face_px: int = Field(default=60, ge=16, description="Narrowest face accepted, px.")
    wav2lip_checkpoint: str = Field(
        default="",
        description="Path of a Wav2Lip checkpoint (wav2lip.pth / wav2lip_gan.pth; non-commercial "
        "license, none ships). Set: Animate and Render use Wav2Lip instead of the embedded animator.",
    )
    max_render_s: float = Field(
        default=600, gt=0, description="Longest audio one Render call takes, s."
    )
    max_pixels: int = Field(
        default=16_000_000, ge=10_000, description="Largest image accepted, pixels."
    )
