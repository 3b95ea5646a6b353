"""Hugging Face `datasets` on disk: a `save_to_disk` folder (a Dataset or a DatasetDict) or Parquet files (a
file, or a folder laid out as on the Hub: train-00000-of-00001.parquet, data/test-*.parquet, train/*.parquet).

The audio column (--audio-column) is read undecoded as {"bytes", "path"} (datasets' own decoding needs
torchcodec, which cannot live beside CPU torch). Audio that comes as bytes is written once to
`audio_dir/<id><ext>` (a re-run leaves identical files alone); audio given only as a path is used where it
is, a relative path taken from the dataset's folder. A dataset without an audio column may name a column of
paths (--path-column). A `language` column gives each row's language; the other scalar columns are kept in
`extras` (list, dict and binary columns are left out). Rows stream: nothing is materialised."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from diva.manifests.importers.base import (
    ImportOptions,
    Row,
    as_extra,
    as_label,
    resolve_audio,
    unparseable,
)
from diva.manifests.record import Candidate
from diva.manifests.store import ManifestError

AUDIO_SUFFIXES = {
    ".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".aiff", ".aif", ".au", ".caf", ".w64", ".sph", ".raw",
    ".pcm", ".m4a", ".webm",
}  # fmt: skip
LANGUAGE_COLUMN = "language"


def sniff_suffix(data: bytes) -> str:
    """The file extension that the first bytes of an audio file announce ('.bin' when none does)."""
    if data[:4] == b"RIFF":
        return ".wav"
    if data[:4] == b"fLaC":
        return ".flac"
    if data[:4] == b"OggS":
        return ".ogg"
    if data[:4] == b"FORM":
        return ".aiff"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return ".mp3"  # an ID3 tag, or an MPEG frame sync
    return ".bin"


def file_name(utt_id: str) -> str:
    """A relative file path for an id that cannot leave the audio folder ('/' keeps sub-folders)."""
    parts = [re.sub(r"[^\w.\-]", "_", part) for part in utt_id.split("/") if part]
    return "/".join(part if part.strip(".") else "_" for part in parts) or "_"


def write_once(path: Path, data: bytes) -> None:
    """Write `data` to `path` under a temporary name, unless an identical file is already there."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _choose_split(splits: list[str], wanted: str | None, source: Path) -> str:
    if wanted is not None:
        if wanted not in splits:
            raise ManifestError(f"{source}: no split '{wanted}'; the splits are: {', '.join(splits)}")
        return wanted
    if len(splits) == 1:
        return splits[0]
    if "train" in splits:
        return "train"
    raise ManifestError(f"{source}: several splits ({', '.join(splits)}); pick one with --split")


def open_dataset(source: Path, split: str | None) -> tuple[Any, str | None]:
    """(dataset, split name) for a save_to_disk folder or Parquet files; Parquet is streamed (no cache copy)."""
    from datasets import Dataset, load_dataset, load_from_disk

    if source.is_dir() and ((source / "dataset_dict.json").is_file() or (source / "state.json").is_file()):
        ds = load_from_disk(str(source))
        if isinstance(ds, Dataset):
            return ds, split or (str(ds.split) if ds.split else None)
        name = _choose_split(list(ds), split, source)
        return ds[name], name
    if source.is_file() and source.suffix == ".parquet":
        name = split or "train"
        return load_dataset("parquet", data_files={name: str(source)}, streaming=True)[name], name
    if source.is_dir() and next(source.rglob("*.parquet"), None) is not None:
        dsd = load_dataset("parquet", data_dir=str(source), streaming=True)
        name = _choose_split(list(dsd), split, source)
        return dsd[name], name
    raise FileNotFoundError(f"{source}: neither a save_to_disk folder nor Parquet files")


def _columns(ds: Any) -> list[str]:
    # a streamed dataset may not know its features until asked (Parquet written without datasets' metadata)
    features = ds.features if ds.features is not None else ds._resolve_features().features
    return list(features)


def _undecoded(ds: Any, source: Path, options: ImportOptions) -> tuple[Any, str]:
    """(dataset, audio column): the audio column cast to undecoded {bytes, path}, or a column of paths."""
    from datasets import Audio

    columns = _columns(ds)
    wanted = [options.text_column, options.id_column, options.speaker_column]
    missing = [c for c in wanted if c and c not in columns]
    if missing:
        raise ManifestError(f"{source}: missing column(s) {', '.join(missing)}; columns are {', '.join(columns)}")
    if options.audio_column in columns:
        return ds.cast_column(options.audio_column, Audio(decode=False)), options.audio_column
    if options.path_column in columns:
        return ds, options.path_column
    raise ManifestError(
        f"{source}: no audio column '{options.audio_column}' nor path column '{options.path_column}'; "
        f"columns are {', '.join(columns)} (use --audio-column or --path-column)"
    )


def row_id(path: str | None, split: str | None, index: int) -> str:
    """Default id of a row: its audio path without extension (just the file name when the path is absolute
    or climbs out, as the Hub's cache paths do), else the split and row number."""
    if not path:
        return f"{split or 'row'}-{index:08d}"
    pure = PurePosixPath(path.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts:
        return pure.stem
    return str(pure.with_suffix(""))


class _AudioWriter:
    """Writes audio bytes under `folder`, one file per row, never two rows to one file."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.taken: set[str] = set()

    def write(self, utt_id: str, data: bytes, path: str | None, index: int) -> str:
        if self.folder is None:
            raise ValueError("this dataset holds audio bytes: ImportOptions.audio_dir must say where to write them")
        suffix = PurePosixPath(path or "").suffix.lower()
        suffix = suffix if suffix in AUDIO_SUFFIXES else sniff_suffix(data)
        name = file_name(utt_id) + suffix
        if name in self.taken:  # a repeated id (rejected later) must not overwrite the first row's audio
            name = f"{file_name(utt_id)}~{index}{suffix}"
        self.taken.add(name)
        target = self.folder / name
        write_once(target, data)
        return str(target)


def hf_candidates(
    rows: Iterable[dict[str, Any]], column: str, source: Path, split: str | None, options: ImportOptions
) -> Iterator[Row]:
    """Candidates of dataset rows (streamed) whose audio is in `column` ({bytes, path} or a path string)."""
    base = source if source.is_dir() else source.parent
    writer = _AudioWriter(options.audio_dir)
    used = {column, options.text_column, options.id_column, options.speaker_column, LANGUAGE_COLUMN}
    label = f"{source}[{split}]" if split else str(source)
    for index, row in enumerate(rows):
        where = f"{label}:{index}"
        value = row[column]
        data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, value)
        text = row[options.text_column]
        if not isinstance(text, str | None):
            yield unparseable(where, f"column '{options.text_column}' holds a {type(text).__name__}, not a string")
            continue
        if not data and not (isinstance(path, str) and path):
            yield unparseable(where, f"column '{column}' holds neither audio bytes nor a path")
            continue
        if options.id_column:
            utt_id = as_label(row[options.id_column])
            if utt_id is None:
                yield unparseable(where, f"no usable id in column '{options.id_column}'")
                continue
        else:
            utt_id = row_id(path, split, index)
        audio = writer.write(utt_id, data, path, index) if data else resolve_audio(path, base)
        yield Candidate(
            id=utt_id,
            audio=audio,
            text=text or "",
            where=where,
            language=as_label(row.get(LANGUAGE_COLUMN)) or options.language,
            speaker=as_label(row[options.speaker_column]) if options.speaker_column else None,
            split=split,
            extras={
                k: as_extra(v) for k, v in row.items() if k not in used and isinstance(v, str | int | float | bool)
            },
        )


def read_hf(source: Path, options: ImportOptions) -> Iterator[Row]:
    """Candidates of one split of a datasets folder or Parquet files, row by row."""
    ds, split = open_dataset(source, options.split)
    ds, column = _undecoded(ds, source, options)
    yield from hf_candidates(ds, column, source, split, options)
