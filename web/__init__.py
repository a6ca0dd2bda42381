"""The `web` program: the browser page (WebRTC, web/rtc.py), file downloads and
OpenAI-style HTTP endpoints, a client of the gateway and the stages."""
