"""How reply text is cut for speech, in one place for chat, the pipeline and
synthesize alike:

- `SentenceSplitter`: a stream of reply text into sentences as soon as each one
  ends, so speech synthesis starts on the first sentence while the model writes on
  (chat sends them as `sentence` events).
- `OpeningClause`: the first clause of the first sentence ("Well, as far as I
  know,") as soon as its comma arrives, so speech starts before that sentence ends
  (the pipeline sends it to synthesis ahead of the rest).
- `split_first_clause`: the same cut on a whole text, or else a cut before a word
  that starts a phrase, so the first audio of a long sentence does not wait for all
  of it (synthesize, for text it is given whole).

A clause ends at a comma-like mark followed by a space (so "1,000" is not cut) or
at a CJK one, and counts only with at least `CLAUSE_MIN_WORDS` words or
`CLAUSE_MIN_CJK_CHARS` CJK characters, so the seam falls where a speaker pauses
and the voice never sounds cut."""

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


CLAUSE_MIN_WORDS = 4
CLAUSE_MIN_CJK_CHARS = 6
_CLAUSE_END = re.compile(r"[,;:\u2014\u2013](?=\s)|[\uff0c\uff1b\uff1a\u3001]")
# Without a clause mark, a long first sentence (at least MIN_WORDS_TO_SPLIT words) is
# cut before one of these, between its 5th and 9th word.
MIN_WORDS_TO_SPLIT = 9
_PHRASE_STARTS = frozenset(
    [
        "and",
        "but",
        "or",
        "because",
        "which",
        "that",
        "who",
        "where",
        "when",
        "while",
        "if",
        "in",
        "on",
        "at",
        "for",
        "with",
        "to",
        "from",
        "of",
        "about",
        "after",
        "before",
        "into",
        "through",
    ]
)


def _cjk_chars(text: str) -> int:
    return sum(1 for ch in text if "\u3000" <= ch <= "\u9fff" or "\uff00" <= ch <= "\uffef")


def first_clause_end(text: str) -> int | None:
    """Where the opening clause of `text` ends, if its first sentence has one long
    enough; None otherwise (a clause after the first sentence never counts)."""
    sentence_end = SentenceSplitter._first_end(text)
    for match in _CLAUSE_END.finditer(text):
        if sentence_end is not None and match.end() > sentence_end:
            return None
        clause = text[: match.end()]
        if len(clause.split()) >= CLAUSE_MIN_WORDS or _cjk_chars(clause) >= CLAUSE_MIN_CJK_CHARS:
            return match.end()
    return None


def split_first_clause(text: str) -> list[str]:
    """`text` as [opening clause, rest], or [text] when it has no place to cut."""
    end = first_clause_end(text)
    if end is not None and text[end:].strip():
        return [text[:end].strip(), text[end:].strip()]
    first_sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    words = first_sentence.split()
    if len(words) < MIN_WORDS_TO_SPLIT:
        return [text]
    for index in range(4, min(9, len(words) - 2)):
        if words[index].lower() in _PHRASE_STARTS:
            head = " ".join(words[:index])
            return [head, text[len(head) :].lstrip()]
    return [text]


class OpeningClause:
    """The opening clause of a reply streamed in deltas, spoken before its
    sentence ends (a pause is natural there). Only the first sentence: after it,
    whole sentences already arrive faster than they are spoken."""

    def __init__(self) -> None:
        self._text = ""
        self._spoken = ""
        self._open = True  # still inside the first sentence

    def feed(self, delta: str) -> str:
        """The opening clause to speak now, or ""."""
        if not self._open or self._spoken:
            return ""
        self._text += delta
        end = first_clause_end(self._text)
        if end is None:
            return ""
        self._spoken = self._text[:end].strip()
        return self._spoken

    def rest_of(self, sentence: str) -> str:
        """What of a complete sentence is still to be spoken."""
        if not self._open:
            return sentence
        self._open = False
        text = sentence.strip()
        if self._spoken and text.startswith(self._spoken):
            return text[len(self._spoken) :].strip()
        return sentence
