"""Generic tables: a TSV, CSV or JSON Lines file with an audio path column and a transcript column (names
from the options, default `path` and `text`), optional id and speaker columns. A `language` column, when
present, gives each row's language; every other column is kept in `extras`. Relative audio paths are taken
from the table's folder; SOURCE is the table file."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diva.manifests.importers.base import (
    ImportOptions,
    Row,
    as_label,
    default_id,
    extras_of,
    read_jsonl,
    read_tsv,
    require_columns,
    resolve_audio,
    unparseable,
)
from diva.manifests.record import Candidate
from diva.manifests.store import ManifestError

LANGUAGE_COLUMN = "language"


def _table_file(source: Path) -> Path:
    if not source.is_file():
        raise ManifestError(f"{source} is not a file; for tsv/csv/jsonl, SOURCE is the table file itself")
    return source


def table_candidate(where: str, row: dict[str, Any], base: Path, options: ImportOptions) -> Row:
    """One table row as a Candidate, or an unparseable Reject when a required value is absent or mistyped."""
    path = row.get(options.path_column)
    if not isinstance(path, str) or not path.strip():
        return unparseable(where, f"no audio path in column '{options.path_column}' (got {path!r})")
    text = row.get(options.text_column)
    if text is None:
        text = ""  # a JSON null transcript: validation rejects it as empty_text
    if not isinstance(text, str):
        return unparseable(where, f"column '{options.text_column}' holds a {type(text).__name__}, not a string")
    audio = resolve_audio(path, base)
    if options.id_column:
        value = row.get(options.id_column)
        utt_id = as_label(value)
        if utt_id is None:
            return unparseable(where, f"no usable id in column '{options.id_column}' (got {value!r})")
    else:
        utt_id = default_id(audio, base)
    used = {options.path_column, options.text_column, options.id_column, options.speaker_column, LANGUAGE_COLUMN}
    return Candidate(
        id=utt_id,
        audio=audio,
        text=text,
        where=where,
        language=as_label(row.get(LANGUAGE_COLUMN)) or options.language,
        speaker=as_label(row.get(options.speaker_column)) if options.speaker_column else None,
        split=options.split,
        extras=extras_of(row, used),
    )


def _read_delimited(source: Path, options: ImportOptions, delimiter: str, quoting: int) -> Iterator[Row]:
    table = _table_file(source)
    columns = [c for c in (options.path_column, options.text_column, options.id_column, options.speaker_column) if c]
    header_checked = False
    for where, row in read_tsv(table, delimiter=delimiter, quoting=quoting):
        if isinstance(row, str):
            yield unparseable(where, row)
            continue
        if not header_checked:
            require_columns(table, row, columns)  # a wrong column name fails the import, not every row
            header_checked = True
        yield table_candidate(where, row, table.parent, options)


def read_tsv_table(source: Path, options: ImportOptions) -> Iterator[Row]:
    """Candidates of a headed TSV; quoting is off (transcripts hold `"`), as in Common Voice."""
    return _read_delimited(source, options, "\t", csv.QUOTE_NONE)


def read_csv_table(source: Path, options: ImportOptions) -> Iterator[Row]:
    """Candidates of a headed CSV with standard quoting (a field may hold commas, quotes and newlines)."""
    return _read_delimited(source, options, ",", csv.QUOTE_MINIMAL)


def read_jsonl_table(source: Path, options: ImportOptions) -> Iterator[Row]:
    """Candidates of a JSON Lines file (plain or .gz), one object per line; keys are the columns."""
    table = _table_file(source)
    for where, row in read_jsonl(table):
        if isinstance(row, str):
            yield unparseable(where, row)
            continue
        missing = [k for k in (options.path_column, options.text_column) if k not in row]
        if missing:
            yield unparseable(where, f"missing key(s) {', '.join(missing)}; keys are {', '.join(row) or 'none'}")
            continue
        yield table_candidate(where, row, table.parent, options)
