"""The utterance record every later stage reads, and the account of every row left out."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Reason(StrEnum):
    """Why a corpus row was left out (the `reason` of a line in rejects.jsonl)."""

    UNPARSEABLE_ROW = "unparseable_row"  # a truncated JSON line, a TSV row with the wrong number of fields
    MISSING_FILE = "missing_file"
    UNDECODABLE_AUDIO = "undecodable_audio"
    TOO_SHORT = "too_short"  # zero or below the minimum duration
    TOO_LONG = "too_long"  # above the maximum duration (keep with --max-duration-s 0)
    EMPTY_TEXT = "empty_text"  # empty or whitespace-only transcript
    BAD_TEXT = "bad_text"  # undecodable text or control characters
    DUPLICATE_ID = "duplicate_id"
    PATH_ESCAPES_ROOT = "path_escapes_root"  # only with --confine
    SEGMENT_PAST_END = "segment_past_end"  # a listed offset + duration beyond the end of the audio file
    AUDIO_CHANGED = "audio_changed"  # `diva manifest validate`: the file no longer matches its record


@dataclass(frozen=True)
class Utterance:
    """One utterance of a manifest (one JSON object per line of manifest.jsonl.gz).

    `audio` is an absolute path; `offset_s` > 0 or a `duration_s` shorter than the file marks a segment of
    a longer recording (Lhotse supervisions). `extras` keeps the corpus-specific fields as strings.
    """

    id: str
    audio: str
    duration_s: float
    sample_rate: int
    channels: int
    text: str
    language: str | None = None
    speaker: str | None = None
    split: str | None = None
    corpus: str = ""
    offset_s: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Utterance:
        return cls(**data)


@dataclass(frozen=True)
class Candidate:
    """A row as an importer read it, before validation: the audio may not exist, the text may be empty.

    `where` says where the row came from (file:line) for error messages and rejects. Audio given as bytes
    (HF datasets) is written under the output folder by the importer before validation.
    """

    id: str
    audio: str
    text: str
    where: str
    language: str | None = None
    speaker: str | None = None
    split: str | None = None
    offset_s: float = 0.0
    duration_s: float | None = None  # known without probing (clip_durations.tsv, a NeMo/Lhotse manifest)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reject:
    """A row left out: where it came from, the reason code and a human-readable detail."""

    where: str
    reason: Reason
    detail: str
    id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"where": self.where, "reason": str(self.reason), "detail": self.detail, "id": self.id}
