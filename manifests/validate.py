"""Checks that turn a Candidate into an Utterance or a Reject (each failure a reason code)."""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from diva.audio import AudioError, load_audio, probe
from diva.manifests.record import Candidate, Reason, Reject, Utterance


@dataclass(frozen=True)
class ValidationOptions:
    """What counts as a usable utterance."""

    min_duration_s: float = 0.1
    max_duration_s: float = 30.0  # 0 keeps long audio (the student encodes it in 30 s chunks)
    confine: bool = False  # reject audio paths that resolve outside the corpus root
    probe: Literal["header", "decode"] = "header"  # decode: fully decode every file (slow, thorough)
    # sentence: an ALL-CAPS transcript of 3+ words (LibriSpeech's, TED-LIUM's style) is kept in sentence case
    # (`sentence_case`); the original goes to extras["text_original"]. keep: transcripts as the corpus has them.
    text_case: Literal["sentence", "keep"] = "sentence"

    def __post_init__(self) -> None:
        if self.min_duration_s < 0 or self.max_duration_s < 0:
            raise ValueError("durations must be >= 0")
        if self.max_duration_s and self.max_duration_s < self.min_duration_s:
            raise ValueError(f"max_duration_s {self.max_duration_s} < min_duration_s {self.min_duration_s}")
        if self.probe not in ("header", "decode"):
            raise ValueError(f"probe must be 'header' or 'decode', got {self.probe!r}")
        if self.text_case not in ("sentence", "keep"):
            raise ValueError(f"text_case must be 'sentence' or 'keep', got {self.text_case!r}")


_PRONOUN_I = re.compile(r"\bi\b")  # "i", and the i of "i'm", "i'll", "i'd", "i've"


def shouted(text: str, min_words: int = 3) -> bool:
    """True for an ALL-CAPS transcript: cased letters, none of them lower case, in at least `min_words` words (a
    lone "NASA" or "OK" is left alone)."""
    cased = [c for c in text if c.lower() != c.upper()]
    words = sum(any(c.lower() != c.upper() for c in w) for w in text.split())
    return bool(cased) and words >= min_words and not any(c.islower() for c in cased)


def sentence_case(text: str) -> str:
    """An ALL-CAPS transcript as a sentence: lower case, its first letter and the pronoun I upper case
    ("IF THE READER WILL EXCUSE ME I WILL SAY" -> "If the reader will excuse me I will say"). Names lose their
    capital; the LLM reads an ordinary sentence instead of one shouted (the teacher answers them differently,
    and speech carries no case for the student to hear)."""
    lowered = _PRONOUN_I.sub("I", text.lower())
    for i, c in enumerate(lowered):
        if c.isalpha():
            return lowered[:i] + c.upper() + lowered[i + 1 :]
    return lowered


def check_text(text: str) -> tuple[Reason, str] | None:
    """Empty text, undecodable text (U+FFFD from a bad decode) or control characters."""
    if not text.strip():
        return Reason.EMPTY_TEXT, "transcript is empty or whitespace only"
    if "\ufffd" in text:
        return Reason.BAD_TEXT, "transcript holds U+FFFD (text that did not decode)"
    bad = sorted({f"U+{ord(c):04X}" for c in text if unicodedata.category(c) == "Cc"})
    if bad:
        return Reason.BAD_TEXT, f"transcript holds control characters {', '.join(bad)}"
    return None


def escapes_root(audio: str, roots: tuple[Path, ...]) -> bool:
    """True when `audio` resolves (symlinks followed) outside every one of `roots`."""
    real = os.path.realpath(audio)
    for root in roots:
        real_root = os.path.realpath(root)
        if os.path.commonpath([real_root, real]) == real_root:
            return False
    return True


class SegmentPastEnd(ValueError):
    """A listed offset + duration that runs past the end of the audio file."""


def _measure(candidate: Candidate, mode: str) -> tuple[float, int, int]:
    """(duration_s, sample_rate, channels) of the candidate's audio, from the header or a full decode.
    A duration the corpus lists is trusted, within a tolerance of the file's real length."""
    info = probe(candidate.audio)
    if mode == "decode":
        samples, _ = load_audio(candidate.audio, target_rate=None)
        file_duration = len(samples) / info.sample_rate
    else:
        file_duration = info.duration_s
    if candidate.duration_s is not None:
        duration = candidate.duration_s  # a segment, or a duration the corpus lists
        end = candidate.offset_s + duration
        if end > file_duration + max(0.1, 0.01 * file_duration):  # mp3 headers and ms roundings differ a little
            raise SegmentPastEnd(
                f"offset {candidate.offset_s:.2f} s + duration {duration:.2f} s runs past the end "
                f"of {candidate.audio} ({file_duration:.2f} s)"
            )
    else:
        duration = max(0.0, file_duration - candidate.offset_s)
    return duration, info.sample_rate, info.channels


def validate(
    candidate: Candidate, roots: tuple[Path, ...], corpus: str, options: ValidationOptions
) -> Utterance | Reject:
    """Check one candidate; never raises for bad data (that becomes a Reject). `roots` are the folders audio
    may live in under --confine (the corpus, and the folder the import writes extracted audio to)."""

    def reject(reason: Reason, detail: str) -> Reject:
        return Reject(where=candidate.where, reason=reason, detail=detail, id=candidate.id)

    text = candidate.text.strip()
    problem = check_text(candidate.text)
    if problem:
        return reject(*problem)
    if options.confine and escapes_root(candidate.audio, roots):
        return reject(Reason.PATH_ESCAPES_ROOT, f"{candidate.audio} resolves outside {roots[0]}")
    if not os.path.isfile(candidate.audio):
        return reject(Reason.MISSING_FILE, f"{candidate.audio} does not exist")
    try:
        duration, sample_rate, channels = _measure(candidate, options.probe)
    except AudioError as e:
        return reject(Reason.UNDECODABLE_AUDIO, str(e))
    except SegmentPastEnd as e:
        return reject(Reason.SEGMENT_PAST_END, str(e))
    if duration <= 0 or duration < options.min_duration_s:
        return reject(Reason.TOO_SHORT, f"{duration:.3f} s < minimum {options.min_duration_s} s")
    if options.max_duration_s and duration > options.max_duration_s:
        return reject(Reason.TOO_LONG, f"{duration:.2f} s > maximum {options.max_duration_s} s")
    extras = candidate.extras
    if options.text_case == "sentence" and shouted(text):
        text, extras = sentence_case(text), {**extras, "text_original": text}
    return Utterance(
        id=candidate.id,
        audio=candidate.audio,
        duration_s=round(duration, 4),
        sample_rate=sample_rate,
        channels=channels,
        text=text,
        language=candidate.language,
        speaker=candidate.speaker,
        split=candidate.split,
        corpus=corpus,
        offset_s=candidate.offset_s,
        extras=extras,
    )


def recheck(utt: Utterance, probe_mode: str = "header", tolerance_s: float = 0.05) -> Reject | None:
    """Re-check one manifest record against its audio (e.g. after files moved): None when it still holds."""

    def problem(reason: Reason, detail: str) -> Reject:
        return Reject(where=utt.audio, reason=reason, detail=detail, id=utt.id)

    if not os.path.isfile(utt.audio):
        return problem(Reason.MISSING_FILE, f"{utt.audio} does not exist")
    candidate = Candidate(id=utt.id, audio=utt.audio, text=utt.text, where=utt.audio, offset_s=utt.offset_s)
    try:
        duration, sample_rate, channels = _measure(candidate, probe_mode)
    except AudioError as e:
        return problem(Reason.UNDECODABLE_AUDIO, str(e))
    if sample_rate != utt.sample_rate or channels != utt.channels:
        return problem(
            Reason.AUDIO_CHANGED,
            f"audio is {sample_rate} Hz x {channels} ch; the manifest says {utt.sample_rate} Hz x {utt.channels} ch",
        )
    if duration + tolerance_s < utt.duration_s:  # `duration` counts from the offset to the end of the file
        return problem(Reason.AUDIO_CHANGED, f"audio lasts {duration:.2f} s, the manifest says {utt.duration_s:.2f} s")
    return None
