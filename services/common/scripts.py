"""Which writing system a text is in: how chat picks the language of its
instructions and how synthesis picks a voice that can speak the text."""

from __future__ import annotations

import unicodedata

_SCRIPTS = (
    "CJK",
    "HIRAGANA",
    "KATAKANA",
    "HANGUL",
    "CYRILLIC",
    "ARABIC",
    "HEBREW",
    "GREEK",
    "DEVANAGARI",
    "THAI",
    "GEORGIAN",
    "LATIN",
)


def script_of(char: str) -> str:
    name = unicodedata.name(char, "")
    for script in _SCRIPTS:
        if name.startswith(script):
            return "CJK" if script in ("HIRAGANA", "KATAKANA") else script
    return ""


def dominant_script(text: str) -> str | None:
    """The writing system most letters of the text are in (None if no letters)."""
    counts: dict[str, int] = {}
    for char in text:
        if char.isalpha():
            script = script_of(char) or "OTHER"
            counts[script] = counts.get(script, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None


def is_chinese(text: str) -> bool:
    """Mostly Chinese, counting a character as a word's worth of Latin letters:
    "用Python写hello world" is a Chinese question about code."""
    han = latin = 0
    for char in text:
        if char.isalpha():
            script = script_of(char)
            if script == "CJK":
                han += 1
            elif script == "LATIN":
                latin += 1
    return han > 0 and 4 * han >= latin
