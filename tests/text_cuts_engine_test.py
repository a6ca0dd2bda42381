"""The one text-cutting policy (services/common/text.py): sentences, and the
opening clause that goes to speech before its sentence ends."""

from __future__ import annotations

from services.common.text import OpeningClause, split_first_clause


def feed_all(opening: OpeningClause, deltas: list[str]) -> list[str]:
    return [clause for delta in deltas if (clause := opening.feed(delta))]


def test_a_long_enough_clause_is_spoken_first_and_the_rest_after() -> None:
    opening = OpeningClause()
    deltas = ["Well", ",", " as far", " as I", " know", ",", " it is", " Paris", "."]
    assert feed_all(opening, deltas) == ["Well, as far as I know,"]
    assert opening.rest_of("Well, as far as I know, it is Paris.") == "it is Paris."
    # Later sentences are spoken whole.
    assert opening.rest_of("It is lovely in spring.") == "It is lovely in spring."


def test_short_clauses_numbers_and_plain_sentences_wait_for_the_sentence() -> None:
    opening = OpeningClause()
    assert (
        feed_all(opening, ["Yes", ",", " about", " 1,000", " people", " live", " there", "."]) == []
    )
    assert opening.rest_of("Yes, about 1,000 people live there.") == (
        "Yes, about 1,000 people live there."
    )


def test_chinese_clauses_count_characters() -> None:
    opening = OpeningClause()
    assert feed_all(opening, ["法国的首都是巴黎", "，", "一个美丽的城市", "。"]) == [
        "法国的首都是巴黎，"
    ]
    assert opening.rest_of("法国的首都是巴黎，一个美丽的城市。") == "一个美丽的城市。"


def test_a_clause_after_the_first_sentence_is_not_an_opening() -> None:
    opening = OpeningClause()
    assert feed_all(opening, ["Yes.", " Well", ", as far as I know", ", it is Paris."]) == []
    assert opening.rest_of("Yes.") == "Yes."


def test_whole_text_is_cut_by_the_same_rule() -> None:
    # Too short a clause: no cut at the comma; too short a sentence: no phrase cut.
    assert split_first_clause("Well, the weather is fine today.") == [
        "Well, the weather is fine today."
    ]
    assert split_first_clause("The weather in Paris, they say, is fine.") == [
        "The weather in Paris,",
        "they say, is fine.",
    ]
    assert split_first_clause("法国的首都是巴黎，一个美丽的城市。") == [
        "法国的首都是巴黎，",
        "一个美丽的城市。",
    ]
    # No clause mark in a long sentence: cut before a word that starts a phrase.
    assert split_first_clause(
        "The old lighthouse keeper walked slowly with his dog every evening."
    ) == ["The old lighthouse keeper walked slowly", "with his dog every evening."]
