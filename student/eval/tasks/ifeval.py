"""IFEval's verifiable instructions (Zhou et al. 2023, as VoiceBench scores its spoken `ifeval` set).

Each row carries `instruction_id_list` (e.g. ["punctuation:no_comma", "length_constraints:number_words"]) and
`kwargs` (one dict per instruction: {"relation": "at least", "num_words": 300}; missing or empty values are
dropped, as VoiceBench does). A response follows an instruction when its check passes:

    strict   the response as it is
    loose    any of eight variants passes: as it is, without its first line, its last line or both, each with
             and without the markdown asterisks (the upper bound Google's evaluation reports)

and the scores are prompt-level (all of a row's instructions followed) and instruction-level (the share of all
instructions followed), strict and loose, as in Google's and VoiceBench's evaluations. The checks are written
here from the published rules (the 25 instruction types VoiceBench's registry enables), with three deliberate
differences, because the reference's helpers need data that is downloaded at run time:

    sentences        counted by rules (abbreviations, initials, decimals and ellipses do not end a sentence)
                     instead of NLTK's punkt model
    capital words    words from a regex tokenizer (contractions split as the Treebank tokenizer splits them)
                     instead of nltk.word_tokenize
    language         langdetect (the `tasks` extra), seeded so a response is always given the same language;
                     the reference does not seed it

so a count near a threshold can differ from the reference's on rare text. An instruction id outside the 25 is an
error naming the row.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from diva.errors import UserError

Check = Callable[[str, dict[str, Any]], bool]


def _compare(count: int, relation: str, threshold: int) -> bool:
    if relation == "less than":
        return count < threshold
    if relation == "at least":
        return count >= threshold
    raise ValueError(f"relation {relation!r} is neither 'less than' nor 'at least'")


_ABBREVIATIONS = re.compile(r"\b(Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|Inc|Ltd|Co|vs|etc|e\.g|i\.e|Ph\.D|U\.S|No)\.", re.I)


def count_sentences(text: str) -> int:
    """Sentences: runs of text ended by . ! or ? (and a space, a quote, a bracket or the end); abbreviations,
    initials, decimals and ellipses do not end one."""
    text = text.replace("\n", " ")
    text = _ABBREVIATIONS.sub(lambda m: m.group(0).replace(".", "<p>"), text)
    text = re.sub(r"(\d)\.(\d)", r"\1<p>\2", text)  # 3.14
    text = re.sub(r"\b([A-Za-z])\.(?=\s*[A-Za-z]\.|\s+[A-Z][a-z])", r"\1<p>", text)  # J. R. R. Tolkien, U.S.A.
    text = re.sub(r"\.{2,}", "<e>", text)  # an ellipsis ends a sentence only when a capital follows
    text = re.sub(r"<e>(?=\s+[A-Z])", ".", text).replace("<e>", "<p>")
    pieces = re.split(r"[.!?]+[\"'”’)\]]*(?=\s|$)", text)
    return sum(1 for p in pieces if re.search(r"\w", p))


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


_WORD = re.compile(r"[A-Za-z]+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.]\w+)*|[^\w\s]", re.I)


def words(text: str) -> list[str]:
    """Word tokens as the Treebank tokenizer makes them (punctuation apart, "don't" -> "do", "n't")."""
    return _WORD.findall(text)


def _language():
    try:
        from langdetect import DetectorFactory, detect
        from langdetect.lang_detect_exception import LangDetectException
    except ImportError as e:
        raise UserError("IFEval's language checks need langdetect: pip install 'diva-distill[tasks]'") from e
    DetectorFactory.seed = 0
    return detect, LangDetectException


def detect_language(text: str) -> str | None:
    """The response's language code (langdetect, seeded), or None when it cannot tell (no letters)."""
    detect, error = _language()
    try:
        return detect(text)
    except error:
        return None


def _in_language(text: str, code: str) -> bool:
    found = detect_language(text)
    return found is None or found == code  # undetectable counts as followed, as in the reference


def _paragraphs_first_word(r: str, kw: dict[str, Any]) -> bool:
    paragraphs = re.split(r"\n\n", r)
    n = sum(1 for p in paragraphs if p.strip())
    nth = int(kw["nth_paragraph"])
    if nth > n or not paragraphs[nth - 1].strip():
        return False
    word = paragraphs[nth - 1].split()[0].strip().lstrip("'\"")
    first = re.split(r"[.,?!'\"]", word, maxsplit=1)[0].lower()
    return n == int(kw["num_paragraphs"]) and first == str(kw["first_word"]).lower()


def _paragraphs(r: str, kw: dict[str, Any]) -> bool:
    parts = re.split(r"\s?\*\*\*\s?", r)
    inner_empty = any(not p.strip() for p in parts[1:-1])
    n = len(parts) - (not parts[0].strip()) - (len(parts) > 1 and not parts[-1].strip())
    return not inner_empty and n == int(kw["num_paragraphs"])


def _two_responses(r: str, kw: dict[str, Any]) -> bool:
    parts = r.split("******")
    if any(not p.strip() for p in parts[1:-1]):
        return False
    kept = [p.strip() for p in parts if p.strip()]
    return len(kept) == 2 and kept[0] != kept[1]


def _highlights(r: str, kw: dict[str, Any]) -> bool:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h[2:-2].strip()]
    return len(single) + len(double) >= int(kw["num_highlights"])


def _postscript(r: str, kw: dict[str, Any]) -> bool:
    marker = str(kw["postscript_marker"]).strip()
    known = {"P.P.S": r"\s*p\.\s?p\.\s?s.*$", "P.S.": r"\s*p\.\s?s\..*$"}
    pattern = known.get(marker, r"\s*" + re.escape(marker.lower()) + ".*$")
    return re.search(pattern, r.lower(), flags=re.MULTILINE) is not None


def _json(r: str, kw: dict[str, Any]) -> bool:
    text = r.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(fence)
    try:
        json.loads(text.removesuffix("```").strip())
    except ValueError:
        return False
    return True


CONSTRAINED = ("My answer is yes.", "My answer is no.", "My answer is maybe.")

CHECKS: dict[str, Check] = {
    "keywords:existence": lambda r, kw: all(re.search(re.escape(k), r, re.I) for k in kw["keywords"]),
    "keywords:frequency": lambda r, kw: _compare(len(re.findall(re.escape(str(kw["keyword"]).strip()), r, re.I)),
                                                 kw["relation"], int(kw["frequency"])),
    "keywords:forbidden_words": lambda r, kw: not any(re.search(rf"\b{re.escape(w)}\b", r, re.I)
                                                      for w in kw["forbidden_words"]),
    "keywords:letter_frequency": lambda r, kw: _compare(Counter(r.lower())[str(kw["letter"]).strip().lower()],
                                                        kw["let_relation"], int(kw["let_frequency"])),
    "language:response_language": lambda r, kw: _in_language(r, str(kw["language"])),
    "length_constraints:number_sentences": lambda r, kw: _compare(count_sentences(r), kw["relation"],
                                                                  int(kw["num_sentences"])),
    "length_constraints:number_paragraphs": _paragraphs,
    "length_constraints:number_words": lambda r, kw: _compare(count_words(r), kw["relation"], int(kw["num_words"])),
    "length_constraints:nth_paragraph_first_word": _paragraphs_first_word,
    "detectable_content:number_placeholders": lambda r, kw: len(re.findall(r"\[.*?\]", r)) >= int(
        kw["num_placeholders"]),
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": lambda r, kw: (len(re.findall(r"^\s*\*[^\*].*$", r, re.M))
                                                            + len(re.findall(r"^\s*-.*$", r, re.M))
                                                            == int(kw["num_bullets"])),
    "detectable_format:constrained_response": lambda r, kw: any(c in r.strip() for c in CONSTRAINED),
    "detectable_format:number_highlighted_sections": _highlights,
    "detectable_format:multiple_sections": lambda r, kw: len(re.split(
        r"\s?" + re.escape(str(kw["section_spliter"]).strip()) + r"\s?\d+\s?", r)) - 1 >= int(kw["num_sections"]),
    "detectable_format:json_format": _json,
    "detectable_format:title": lambda r, kw: any(t[2:-2].strip() for t in re.findall(r"<<[^\n]+>>", r)),
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": lambda r, kw: r.strip().lower().startswith(str(kw["prompt_to_repeat"]).strip()
                                                                             .lower()),
    "startend:end_checker": lambda r, kw: r.strip().strip('"').lower().endswith(str(kw["end_phrase"]).strip()
                                                                                 .lower()),
    "startend:quotation": lambda r, kw: len(r.strip()) > 1 and r.strip()[0] == '"' and r.strip()[-1] == '"',
    "change_case:capital_word_frequency": lambda r, kw: _compare(sum(w.isupper() for w in words(r)),
                                                                 kw["capital_relation"], int(kw["capital_frequency"])),
    "change_case:english_capital": lambda r, kw: r.isupper() and _in_language(r, "en"),
    "change_case:english_lowercase": lambda r, kw: r.islower() and _in_language(r, "en"),
    "punctuation:no_comma": lambda r, kw: "," not in r,
}  # fmt: skip


@dataclass(frozen=True)
class Instructions:
    """One row's instructions: ids and their arguments (empty values dropped)."""

    ids: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]


def parse_instructions(ids: Any, kwargs: Any, where: str) -> Instructions:
    """A row's `instruction_id_list` and `kwargs` columns (lists, or JSON text) as Instructions."""
    if isinstance(ids, str):
        ids = json.loads(ids)
    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs)
    ids, kwargs = list(ids or []), list(kwargs or [])
    if not ids:
        raise UserError(f"{where}: no instructions in instruction_id_list")
    if len(kwargs) != len(ids):
        raise UserError(f"{where}: {len(ids)} instruction ids but {len(kwargs)} kwargs")
    unknown = [i for i in ids if i not in CHECKS]
    if unknown:
        raise UserError(f"{where}: unknown IFEval instruction(s) {', '.join(unknown)}; known: "
                        f"{', '.join(sorted(CHECKS))}")  # fmt: skip
    return Instructions(tuple(ids), tuple({k: v for k, v in (kw or {}).items() if v} for kw in kwargs))


def loose_variants(response: str) -> list[str]:
    lines = response.split("\n")
    cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return cut + [c.replace("*", "") for c in cut]


def followed(response: str, instructions: Instructions, loose: bool = False) -> list[bool]:
    """For each instruction, whether the response follows it (strict, or loose: any variant)."""
    candidates = loose_variants(response) if loose else [response]
    out = []
    for ident, kw in zip(instructions.ids, instructions.kwargs, strict=True):
        out.append(any(c.strip() and CHECKS[ident](c, kw) for c in candidates))
    return out


def set_scores(per_row: Sequence[tuple[list[bool], list[bool]]]) -> dict[str, float]:
    """Google's four numbers over (strict, loose) follow lists, and their mean."""
    out = {}
    for k, mode in enumerate(("strict", "loose")):
        lists = [row[k] for row in per_row]
        out[f"{mode}_prompt"] = sum(all(f) for f in lists) / len(lists)
        out[f"{mode}_instruction"] = sum(sum(f) for f in lists) / sum(len(f) for f in lists)
    out["ifeval_mean"] = sum(out.values()) / 4
    return out
