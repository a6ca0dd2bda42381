"""The guard in front of the model: prompt-injection and abuse, answered with a
refusal in the user's language instead of the model.

Two checks, cheapest first. Regular expressions on normalised text catch the
textbook phrasings for free; a sentence-embedding classifier
(semantic_guard.py) catches paraphrases that no keyword list anticipates.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import unicodedata
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.chat.config import ChatSettings
from services.common.errors import PreconditionFailed
from services.common.scripts import is_chinese

if TYPE_CHECKING:
    from services.chat.semantic_guard import SemanticCheck

log = logging.getLogger("talker.chat.guard")

# Zero-width and bidi controls are stripped first: they are a classic way to
# split a trigger phrase so a pattern no longer sees it.
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")


def normalise(text: str) -> str:
    text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))
    return re.sub(r"\s+", " ", text).strip()


def language_of(text: str) -> str:
    """'zh' for a text mostly in Chinese characters (the rule chat uses to pick
    its system prompt), else 'en': the language of the refusal."""
    return "zh" if is_chinese(text) else "en"


@dataclass(frozen=True)
class Refusal:
    """Why a text was refused, and what to say instead."""

    check: str  # "pattern" or "semantic"
    reason: str  # the pattern that matched, or the score against the threshold
    language: str  # "en" or "zh": the script of the refused text
    text: str  # the refusal to send, in that language
    score: float | None = None  # the semantic check's score, when it ran

    def __str__(self) -> str:
        return f"{self.check}: {self.reason}"


class Guard:
    def __init__(
        self,
        patterns: list[str],
        semantic: SemanticCheck | Future[SemanticCheck] | None = None,
        refusals: dict[str, str] | None = None,
    ) -> None:
        compiled = []
        for pattern in patterns:
            try:
                compiled.append(re.compile(pattern, re.IGNORECASE))
            except re.error as error:
                raise PreconditionFailed(
                    f"Guard pattern {pattern!r} is not a valid regular expression: {error}"
                ) from None
        self._patterns = compiled
        self._semantic = semantic
        defaults = ChatSettings.model_fields
        self._refusals = {
            "en": defaults["refusal_text"].default,
            "zh": defaults["refusal_text_zh"].default,
            **(refusals or {}),
        }

    @classmethod
    def from_settings(cls, settings: ChatSettings) -> Guard:
        """A guard as configured. The semantic check's settings are checked here;
        its model loads and its classifier is fitted in a background thread, beside
        the chat model's own loading, so neither waits for the other; the program
        reports SERVING once both are done (`wait_loaded`)."""
        semantic: Future[SemanticCheck] | None = None
        if settings.guard_semantic:
            # Imported here: numpy and the embedding engine load only when the check is on.
            from services.chat.semantic_guard import (
                SemanticCheck,
                check_model_file,
                embedded_model_path,
                load_examples,
            )

            model_path = (
                Path(settings.guard_model_path).expanduser()
                if settings.guard_model_path
                else embedded_model_path()
            )
            check_model_file(model_path)
            examples = load_examples(settings.guard_examples_path)
            semantic = Future()

            def load() -> None:
                started = time.perf_counter()
                try:
                    check = SemanticCheck(
                        model_path,
                        settings.guard_threshold,
                        cache_dir=settings.cache_dir,
                        examples=examples,
                    )
                except BaseException as error:  # handed to whoever waits for the check
                    semantic.set_exception(error)
                    return
                log.info(
                    "semantic guard loaded",
                    extra={"load_s": round(time.perf_counter() - started, 3)},
                )
                semantic.set_result(check)

            threading.Thread(target=load, name="guard-load", daemon=True).start()
        return cls(
            settings.guard_patterns,
            semantic,
            {"en": settings.refusal_text, "zh": settings.refusal_text_zh},
        )

    @property
    def semantic(self) -> SemanticCheck | None:
        """The second check, once loaded (waits for it; re-raises a load failure)."""
        if isinstance(self._semantic, Future):
            return self._semantic.result()
        return self._semantic

    def wait_loaded(self) -> None:
        """Returns once the semantic check (if on) is loaded; raises its load failure."""
        _ = self.semantic

    def refusal_text(self, text: str) -> str:
        return self._refusals[language_of(text)]

    def check(self, text: str) -> Refusal | None:
        """Why the text is refused, or None when it may go to the model."""
        clean = normalise(text)
        language = language_of(clean)
        for pattern in self._patterns:
            if pattern.search(clean):
                return Refusal("pattern", pattern.pattern, language, self._refusals[language])
        semantic = self.semantic
        if semantic is not None:
            score = semantic.score(clean)
            if score >= semantic.threshold:
                return Refusal(
                    "semantic",
                    f"score {score:.2f} >= threshold {semantic.threshold}",
                    language,
                    self._refusals[language],
                    score,
                )
        return None
