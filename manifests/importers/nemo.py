"""NeMo ASR manifests: JSON Lines (plain or .gz) with `audio_filepath`, `text` (or --text-column),
`duration` and optionally `offset`, `lang`, `speaker`; every other key is kept in `extras`. A listed
duration is trusted (no probe); a relative audio_filepath is taken from the manifest's folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diva.manifests.importers.base import (
    ImportOptions,
    Row,
    as_label,
    as_seconds,
    default_id,
    extras_of,
    read_jsonl,
    resolve_audio,
    unparseable,
)
from diva.manifests.record import Candidate
from diva.manifests.store import ManifestError

AUDIO_KEY = "audio_filepath"


def segment_id(audio: str, base: Path, offset_s: float) -> str:
    """The audio path's id, with the offset in milliseconds when the row is a segment of a longer file."""
    stem = default_id(audio, base)
    return f"{stem}-{round(offset_s * 1000):08d}" if offset_s > 0 else stem


def nemo_candidate(where: str, row: dict[str, Any], base: Path, options: ImportOptions) -> Row:
    """One NeMo manifest line as a Candidate, or an unparseable Reject."""
    path, text = row.get(AUDIO_KEY), row.get(options.text_column)
    if not isinstance(path, str) or not path.strip():
        return unparseable(where, f"no '{AUDIO_KEY}' string (got {path!r})")
    if options.text_column not in row:
        return unparseable(where, f"missing key '{options.text_column}'; keys are {', '.join(row)}")
    if not isinstance(text, str | None):
        return unparseable(where, f"'{options.text_column}' holds a {type(text).__name__}, not a string")
    duration = as_seconds(row.get("duration"))
    if row.get("duration") is not None and duration is None:
        return unparseable(where, f"'duration' is not a number of seconds (got {row['duration']!r})")
    offset = as_seconds(row.get("offset", 0.0))
    if offset is None or offset < 0:
        return unparseable(where, f"'offset' is not a number of seconds >= 0 (got {row['offset']!r})")
    audio = resolve_audio(path, base)
    utt_id = as_label(row.get(options.id_column)) if options.id_column else segment_id(audio, base, offset)
    if utt_id is None:
        return unparseable(where, f"no usable id in key '{options.id_column}'")
    used = {AUDIO_KEY, options.text_column, "duration", "offset", "lang", "speaker", options.id_column}
    return Candidate(
        id=utt_id,
        audio=audio,
        text=text or "",
        where=where,
        language=as_label(row.get("lang")) or options.language,
        speaker=as_label(row.get("speaker")),
        split=options.split,
        offset_s=offset,
        duration_s=duration,
        extras=extras_of(row, used),
    )


def read_nemo(source: Path, options: ImportOptions) -> Iterator[Row]:
    """Candidates of a NeMo manifest file, in line order."""
    if not source.is_file():
        raise ManifestError(f"{source} is not a file; for nemo, SOURCE is the manifest (.json/.jsonl, maybe .gz)")
    for where, row in read_jsonl(source):
        yield unparseable(where, row) if isinstance(row, str) else nemo_candidate(where, row, source.parent, options)
