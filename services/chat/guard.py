"""The guard in front of the model: prompt-injection and abuse patterns,
matched on normalised text, answered with a refusal instead of the model."""

from __future__ import annotations

import re
import unicodedata

from services.common.errors import PreconditionFailed

# Zero-width and bidi controls are stripped first: they are a classic way to
# split a trigger phrase so a pattern no longer sees it.
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")


def normalise(text: str) -> str:
    text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))
    return re.sub(r"\s+", " ", text).strip()


class Guard:
    def __init__(self, patterns: list[str]) -> None:
        compiled = []
        for pattern in patterns:
            try:
                compiled.append(re.compile(pattern, re.IGNORECASE))
            except re.error as error:
                raise PreconditionFailed(
                    f"Guard pattern {pattern!r} is not a valid regular expression: {error}"
                ) from None
        self._patterns = compiled

    def check(self, text: str) -> str | None:
        """The pattern that matched, or None when the text may go to the model."""
        clean = normalise(text)
        for pattern in self._patterns:
            if pattern.search(clean):
                return pattern.pattern
        return None
