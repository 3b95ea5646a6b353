"""What every importer shares: its options and small parsing helpers."""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from diva.manifests.record import Candidate, Reason, Reject
from diva.manifests.store import ManifestError

Row = Candidate | Reject


@dataclass(frozen=True)
class ImportOptions:
    """Importer settings; each importer reads the ones that apply to it."""

    split: str | None = None  # commonvoice: which TSV (train, dev, test, validated, ...); others: a label
    language: str | None = None  # language code when the corpus does not say
    path_column: str = "path"  # tsv/csv/jsonl/hf
    text_column: str = "text"  # tsv/csv/jsonl/hf
    id_column: str | None = None  # tsv/csv/jsonl/hf; default: the audio path without its extension
    speaker_column: str | None = None  # tsv/csv/jsonl/hf
    audio_column: str = "audio"  # hf: a column of {"bytes", "path"}
    audio_dir: Path | None = None  # where importers write audio that arrives as bytes (hf)


def resolve_audio(path_text: str, base: Path) -> str:
    """An absolute, normalised path: relative paths are taken from `base` (the table's folder)."""
    path = Path(os.path.expanduser(path_text))
    return os.path.normpath(path if path.is_absolute() else base / path)


def default_id(audio: str, base: Path) -> str:
    """The audio path relative to the corpus folder, without its extension (stable across machines)."""
    rel = os.path.relpath(audio, base) if not os.path.relpath(audio, base).startswith("..") else audio
    return os.path.splitext(rel)[0].replace(os.sep, "/")


def read_tsv(path: Path, delimiter: str = "\t", quoting: int = csv.QUOTE_NONE) -> Iterator[tuple[str, dict | str]]:
    """Rows of a headed table as (where, {column: value}), or (where, error text) for a malformed row.

    Common Voice TSVs are not quoted (sentences hold `"`), so quoting is off by default. Bytes that are not
    UTF-8 become U+FFFD, which validation rejects as `bad_text` for that row alone.
    """
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:  # -sig: Excel's byte-order mark
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        if header is None:
            return
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield f"{path}:{reader.line_num}", f"malformed row ({e})"
                continue
            where = f"{path}:{reader.line_num}"
            if not fields or fields == [""]:
                continue
            if len(fields) != len(header):
                yield where, f"{len(fields)} fields, the header has {len(header)}"
                continue
            yield where, dict(zip(header, fields, strict=True))


def unparseable(where: str, detail: str) -> Reject:
    return Reject(where=where, reason=Reason.UNPARSEABLE_ROW, detail=detail)


def require_columns(path: Path, header: dict, columns: list[str]) -> None:
    missing = [c for c in columns if c not in header]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}; columns are {', '.join(header)}")


def open_text(path: Path) -> TextIO:
    """A text handle on a plain or gzip-compressed (`.gz`) file; bytes that are not UTF-8 become U+FFFD."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def read_jsonl(path: Path) -> Iterator[tuple[str, dict | str]]:
    """Objects of a JSON Lines file (plain or .gz) as (where, object), or (where, error text) for a line that
    is not a JSON object. Blank lines are skipped; a truncated .gz ends the file with one error row."""
    with open_text(path) as f:
        line_no = 0
        while True:
            try:
                line = f.readline()
            except (EOFError, OSError) as e:  # a truncated or corrupt .gz
                yield f"{path}:{line_no + 1}", f"file ends early or is corrupt ({e})"
                return
            if not line:
                return
            line_no += 1
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, f"not JSON ({e})"
                continue
            if not isinstance(obj, dict):
                yield where, f"a JSON {type(obj).__name__}, not an object"
                continue
            yield where, obj


def as_extra(value: Any) -> str:
    """An extras value as a string (the Utterance contract): strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def as_label(value: Any) -> str | None:
    """An id, speaker or language value as text: strings and integers (JSON ids are often numbers), else None."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return str(value).strip() or None


def as_seconds(value: Any) -> float | None:
    """A finite number of seconds, or None when `value` is not one (bools and numeric strings are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def extras_of(row: dict, used: set[str]) -> dict[str, str]:
    """The columns of `row` not in `used`, as strings; null values are left out."""
    return {k: as_extra(v) for k, v in row.items() if k not in used and v is not None}
