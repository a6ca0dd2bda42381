"""The programs supervisord runs, and where each one's settings live (named by
string, imported only when asked for). The readiness wait and the watchdog find
every program's port here."""

from __future__ import annotations

import importlib

from services.common.settings import ServiceSettings

# program name (as in supervisor/supervisord.conf) -> "module:SettingsClass"
PROGRAMS: dict[str, str] = {
    "asr": "services.asr.config:AsrSettings",
    "chat": "services.chat.config:ChatSettings",
    "synthesize": "services.synthesize.config:SynthesizeSettings",
    "animate": "services.animate.config:AnimateSettings",
    # It waits for the four above before it reports SERVING.
    "gateway": "gateway.config:GatewaySettings",
    # A client of the gateway (the page, downloads) and of the stages (OpenAI-style HTTP).
    # Its `port` serves grpc.health.v1 only; the HTTP port is `http_port`.
    "web": "web.config:WebSettings",
}


def program_settings(name: str) -> ServiceSettings:
    module_name, _, class_name = PROGRAMS[name].partition(":")
    settings_class = getattr(importlib.import_module(module_name), class_name)
    return settings_class()
