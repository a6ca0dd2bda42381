"""Cuts a stream of reply text into sentences as soon as each one ends, so
speech synthesis can start on the first sentence while the model writes on."""

from __future__ import annotations

import re

# A sentence ends at . ! ? … (and their CJK forms), plus any closing quotes or
# brackets. Latin stops need following whitespace to count (so "3.5" and
# "e.g." mid-word do not split); CJK stops end a sentence on their own.
_LATIN_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?:\s|(?=[\u3000-\u9fff]))")
_CJK_END = re.compile(r"[。！？；]+[”’」』）]*")
# Abbreviations after which a period does not end a sentence.
_ABBREVIATIONS = frozenset(
    {"mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "vs.", "e.g.", "i.e.", "etc."}
)


class SentenceSplitter:
    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, delta: str) -> list[str]:
        """Adds text; returns the sentences it completed, trimmed."""
        self._buffer += delta
        sentences: list[str] = []
        while True:
            cut = self._first_end(self._buffer)
            if cut is None:
                return sentences
            sentence, self._buffer = self._buffer[:cut].strip(), self._buffer[cut:]
            if sentence:
                sentences.append(sentence)

    def flush(self) -> list[str]:
        """The rest of the text, once generation ended."""
        rest, self._buffer = self._buffer.strip(), ""
        return [rest] if rest else []

    @staticmethod
    def _first_end(text: str) -> int | None:
        ends = []
        for match in _LATIN_END.finditer(text):
            words = text[: match.start() + 1].split()
            if words and words[-1].lower() in _ABBREVIATIONS:
                continue
            ends.append(match.end())
            break
        cjk = _CJK_END.search(text)
        if cjk:
            ends.append(cjk.end())
        return min(ends) if ends else None
