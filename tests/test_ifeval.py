"""IFEval's checks (student/eval/tasks/ifeval.py): every one of the 25 instruction types on a response that follows
it and one that does not, strict against loose, the set-level numbers by hand, and what a bad row says."""

from __future__ import annotations

import pytest

from diva.errors import UserError
from diva.student.eval.tasks.ifeval import (
    CHECKS,
    count_sentences,
    count_words,
    detect_language,
    followed,
    parse_instructions,
    set_scores,
    words,
)

LONG = " ".join(["word"] * 120)
# (instruction id, kwargs, a response that follows it, one that does not)
CASES = [
    ("keywords:existence", {"keywords": ["river", "stone"]}, "A stone by the River.", "A stone by the lake."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 3, "relation": "at least"}, "cat Cat CAT", "cat cat"),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "one cat", "cat cat"),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "A badge is fine.", "That was Bad."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "Zoo zone",
     "Zoo"),
    ("language:response_language", {"language": "de"}, "Das ist ein kleiner Test, und er ist auf Deutsch geschrieben.",
     "This is a short test, and it is written in English."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}, "One. Two!",
     "One. Two? Three."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First part.\n***\nSecond part.",
     "First part.\n***\n\n***\nSecond part."),
    ("length_constraints:number_words", {"num_words": 100, "relation": "at least"}, LONG, "too short"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First.\n\n\"Then, second.", "First.\n\nAfter that, second."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].",
     "Dear [name]."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\nP.S. see you", "Hello. PS see you"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\np. p. s. later", "Hi.\nP.S. later"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n- two", "* one\n* two\n* three"),
    ("detectable_format:constrained_response", {}, "I think... My answer is maybe.", "Maybe."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**", "*one* only"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nintro\nSection 2\nbody", "Section 1\nonly"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "{a: 1}"),
    ("detectable_format:title", {}, "<<The Sea>>\nWaves.", "The Sea\nWaves."),
    ("combination:two_responses", {}, "Yes.\n******\nNo.", "Yes.\n******\nYes."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "write a poem. Roses...", "Roses..."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, 'Done. "Any other questions?"',
     "Any other questions? Done."),
    ("startend:quotation", {}, '"All quoted."', 'All "quoted".'),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "The NASA and ESA teams.", "The NASA team."),
    ("change_case:english_capital", {}, "THIS IS ALL IN CAPITAL LETTERS, AS ASKED, IN ENGLISH.",
     "This is not all capitals."),
    ("change_case:english_lowercase", {}, "this is all in lower case letters, as asked, in english.",
     "this is Not all lower case."),
    ("punctuation:no_comma", {}, "No commas here.", "One, two."),
]  # fmt: skip


def test_every_instruction_type_has_a_case() -> None:
    assert {c[0] for c in CASES} == set(CHECKS)
    assert len(CHECKS) == 25


@pytest.mark.parametrize(("ident", "kwargs", "good", "bad"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_check_passes_what_follows_and_fails_what_does_not(ident, kwargs, good, bad) -> None:
    instructions = parse_instructions([ident], [kwargs], "row 0")
    assert followed(good, instructions) == [True]
    assert followed(bad, instructions) == [False]


def test_loose_forgives_a_first_line_and_asterisks() -> None:
    """The loose score takes the response without its first line (a preamble) or its markdown asterisks."""
    ends = parse_instructions(["startend:quotation"], [{}], "row 0")
    assert followed('Sure, here it is:\n"Quoted."', ends) == [False]
    assert followed('Sure, here it is:\n"Quoted."', ends, loose=True) == [True]
    title = parse_instructions(["punctuation:no_comma", "startend:end_checker"], [{}, {"end_phrase": "bye"}], "r")
    assert followed("**Hello** bye**", title) == [True, False]
    assert followed("**Hello** bye**", title, loose=True) == [True, True]
    assert followed("   ", title, loose=True) == [False, False]  # an empty answer follows nothing


def test_counts() -> None:
    assert count_sentences("Dr. Smith paid $3.50 for it. Then he left! Did he? Yes...") == 4
    assert count_sentences("J. R. R. Tolkien wrote it. The U.S. agreed.") == 2
    assert count_sentences("Wait... What happened? \"Nothing.\" OK") == 4
    assert count_words("It's a well-known fact: 3 cats.") == 8  # \w+ runs, as the reference counts
    assert words("DON'T stop, STATE-OF-THE-ART!") == ["DO", "N'T", "stop", ",", "STATE-OF-THE-ART", "!"]
    assert detect_language("12345 !!!") is None  # nothing to detect: the language checks count as followed
    assert detect_language("Ceci est une phrase écrite en français, pour voir.") == "fr"


def test_set_scores_by_hand() -> None:
    rows = [([True, True], [True, True]), ([True, False], [True, True]), ([False], [False])]
    scores = set_scores(rows)
    assert scores["strict_prompt"] == pytest.approx(1 / 3)
    assert scores["strict_instruction"] == pytest.approx(3 / 5)
    assert scores["loose_prompt"] == pytest.approx(2 / 3)
    assert scores["loose_instruction"] == pytest.approx(4 / 5)
    assert scores["ifeval_mean"] == pytest.approx((1 / 3 + 3 / 5 + 2 / 3 + 4 / 5) / 4)


def test_rows_as_the_hub_stores_them() -> None:
    """kwargs as the hub's struct rows (every key, None where unused) or JSON text; bad rows name themselves."""
    hub = {"num_words": None, "relation": None, "keywords": ["sun"], "language": None, "num_bullets": None}
    parsed = parse_instructions(["keywords:existence"], [hub], "r")
    assert parsed.kwargs == ({"keywords": ["sun"]},)
    assert parse_instructions('["punctuation:no_comma"]', "[{}]", "r").ids == ("punctuation:no_comma",)
    with pytest.raises(UserError, match="data row 3: unknown IFEval instruction"):
        parse_instructions(["keywords:key_sentences"], [{}], "data row 3")
    with pytest.raises(UserError, match="row 4: 2 instruction ids but 1 kwargs"):
        parse_instructions(["punctuation:no_comma", "startend:quotation"], [{}], "row 4")
    with pytest.raises(UserError, match="row 5: no instructions"):
        parse_instructions([], [], "row 5")
