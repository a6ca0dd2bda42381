"""The script Chinese transcripts are written in. Whisper writes Mandarin in
traditional or simplified characters as its training data happened to, often
both in one sentence ("这个週末"); a reader expects one. OpenCC converts by
phrase, not character by character (hanziconv leaves 週 as it is, and would
turn 皇后 into 皇後)."""

from __future__ import annotations

from collections.abc import Callable

import opencc

CONFIGS = {"simplified": "t2s", "traditional": "s2t"}


class ChineseScript:
    def __init__(self, script: str) -> None:
        """`script`: simplified, traditional, or as_heard (no conversion)."""
        config = CONFIGS.get(script)
        self._convert: Callable[[str], str] | None = (
            opencc.OpenCC(config).convert if config else None
        )

    def __call__(self, text: str, language: str) -> str:
        if self._convert is None or not text or language != "zh":
            return text
        return self._convert(text)
