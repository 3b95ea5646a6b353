from __future__ import annotations

import pytest

from diva.wer import normalize, word_error_rate, word_errors


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Hello, World!", "hello world"),
        ("It costs twenty-one dollars.", "it costs 21 dollars"),
        ("My favourite colour", "my favorite color"),
        ("Mr. Smith isn't here", "mister smith is not here"),
        ("SOMEHOW OR OTHER CAT HAS TAUGHT THEM", "Somehow or other, cat has taught them."),
    ],
)
def test_english_normaliser_makes_equivalent_texts_equal(a: str, b: str) -> None:
    assert normalize(a) == normalize(b)
    assert word_error_rate([a], [b]) == 0.0


def test_other_languages_use_the_basic_normaliser() -> None:
    assert normalize("Ça va, Monsieur ?", "fr").split() == ["ça", "va", "monsieur"]


def test_word_error_rate_counts_substitutions_insertions_deletions() -> None:
    counts = word_errors(["the cat sat on the mat", "hello"], ["the cat sit on mat", "hello there"])
    # sat->sit (1 substitution), "the" deleted (1), "there" inserted (1); 7 reference words
    assert (counts.errors, counts.ref_words, counts.utterances) == (3, 7, 2)
    assert counts.wer == pytest.approx(3 / 7)


def test_lengths_must_match() -> None:
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        word_error_rate(["a", "b"], ["a"])
