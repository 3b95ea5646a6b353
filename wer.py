"""The one text normaliser and word error rate used everywhere in the project.

Every WER figure (manifest checks of synthetic speech, the cascade baseline, evaluation reports) goes
through `normalize` so that figures mean the same thing across stages. English text uses Whisper's
English normaliser (lower case, punctuation and fillers removed, numbers written as digits, British
spellings made American, contractions expanded); other languages use Whisper's basic normaliser
(lower case, punctuation and diacritic marks removed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache


@lru_cache(maxsize=1)
def _english():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


@lru_cache(maxsize=1)
def _basic():
    from whisper_normalizer.basic import BasicTextNormalizer

    return BasicTextNormalizer()


def normalize(text: str, language: str = "en") -> str:
    """Normalise `text` for scoring; `language` is an ISO code ("en", "en-US", "fr", ...)."""
    if language.lower().split("-")[0].split("_")[0] == "en":
        return _english()(text)
    return _basic()(text)


def _edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance between two word sequences (substitution, insertion, deletion cost 1)."""
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        current = [i] + [0] * len(hyp)
        for j, hyp_word in enumerate(hyp, start=1):
            current[j] = min(
                previous[j] + 1,  # deletion
                current[j - 1] + 1,  # insertion
                previous[j - 1] + (ref_word != hyp_word),  # substitution or match
            )
        previous = current
    return previous[-1]


@dataclass(frozen=True)
class WordErrors:
    """Word errors summed over a set of utterances; `wer` is errors / reference words."""

    errors: int
    ref_words: int
    utterances: int

    @property
    def wer(self) -> float:
        if self.ref_words == 0:
            return 0.0 if self.errors == 0 else float("inf")
        return self.errors / self.ref_words


def word_errors(refs: Sequence[str], hyps: Sequence[str], language: str = "en") -> WordErrors:
    """Corpus-level word errors of `hyps` against `refs`, both normalised with `normalize`."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    errors = ref_words = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        ref_tokens = normalize(ref, language).split()
        hyp_tokens = normalize(hyp, language).split()
        errors += _edit_distance(ref_tokens, hyp_tokens)
        ref_words += len(ref_tokens)
    return WordErrors(errors=errors, ref_words=ref_words, utterances=len(refs))


def word_error_rate(refs: Sequence[str], hyps: Sequence[str], language: str = "en") -> float:
    """Corpus-level WER (total errors / total reference words) after normalisation."""
    return word_errors(refs, hyps, language).wer
