"""Local copies of benchmark data in the layouts their authors publish on the Hugging Face hub.

    DIR/                         a `Dataset.save_to_disk` folder (dataset_info.json + state.json + *.arrow), or a
                                 `DatasetDict.save_to_disk` folder (dataset_dict.json + one folder per split)
    DIR/**/*.parquet             Parquet files (a hub repo's `data/test-00000-of-00001.parquet` ...); with several
                                 splits, the files whose path names the split (`--split`) are read

The audio column holds what `datasets.Audio` stores: {"bytes": ..., "path": ...} (read with decode=False, so no
audio backend of `datasets` is needed) or a decoded {"array": ..., "sampling_rate": ...}; either is decoded and
resampled to 16 kHz here. Nothing is downloaded: a folder that is missing or holds neither layout is an error
naming it, and a row whose audio cannot be read is an error naming the folder and the row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from diva.audio import AudioError, load_audio, resample
from diva.errors import UserError

SAMPLE_RATE = 16_000


class TaskDataError(UserError):
    """Benchmark data that cannot be read: the message names the folder (and the row)."""


def _pick_split(splits: list[str], split: str | None, where: Path) -> str:
    if split is not None:
        if split not in splits:
            raise TaskDataError(f"{where}: no split {split!r}; it has {', '.join(splits)}")
        return split
    for preferred in ("test", "validation", "dev"):
        if preferred in splits:
            return preferred
    if len(splits) == 1:
        return splits[0]
    raise TaskDataError(f"{where}: several splits ({', '.join(splits)}); choose one with --split")


def load_table(data_dir: Path, split: str | None = None) -> Any:
    """The rows of `data_dir` as a `datasets.Dataset` (see the module docstring)."""
    import datasets

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TaskDataError(f"{data_dir}: no such folder (benchmark data is read from a local copy, never downloaded)")
    if (data_dir / "dataset_dict.json").is_file():
        table = datasets.load_from_disk(str(data_dir))
        return table[_pick_split(list(table), split, data_dir)]
    if (data_dir / "state.json").is_file():
        return datasets.load_from_disk(str(data_dir))
    files = sorted(data_dir.rglob("*.parquet"))
    if not files:
        raise TaskDataError(f"{data_dir}: neither a save_to_disk folder nor Parquet files")
    named = {s: [f for f in files if s in f.relative_to(data_dir).as_posix()] for s in ("test", "validation", "dev",
                                                                                    "train")}  # fmt: skip
    present = [s for s, fs in named.items() if fs]
    if split is not None and not present:
        raise TaskDataError(f"{data_dir}: no Parquet file names a split, so --split {split} cannot choose; "
                            f"drop --split to read all {len(files)} files")  # fmt: skip
    if len(present) > 1 or split is not None:
        files = named[_pick_split(present, split, data_dir)]
    return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")


def without_decoding(table: Any, column: str) -> Any:
    """The table with `column` read as stored bytes / path (no audio backend needed)."""
    import datasets

    feature = table.features.get(column)
    if isinstance(feature, datasets.Audio):
        return table.cast_column(column, datasets.Audio(decode=False))
    return table


def row_audio(value: Any, where: str) -> np.ndarray:
    """One audio cell -> 16 kHz mono float32 (TaskDataError naming `where` when it is unreadable)."""
    try:
        if isinstance(value, dict) and value.get("bytes"):
            return load_audio(value["bytes"], SAMPLE_RATE, name=str(value.get("path") or where))[0]
        if isinstance(value, dict) and value.get("array") is not None:
            samples = np.asarray(value["array"], dtype=np.float32)
            samples = samples.mean(axis=0) if samples.ndim > 1 else samples
            rate = int(value["sampling_rate"])
            return resample(samples, rate, SAMPLE_RATE) if rate != SAMPLE_RATE else samples
        if isinstance(value, dict) and value.get("path"):
            return load_audio(value["path"], SAMPLE_RATE)[0]
        if isinstance(value, str):
            return load_audio(value, SAMPLE_RATE)[0]
    except (AudioError, FileNotFoundError, KeyError, ValueError) as e:
        raise TaskDataError(f"{where}: cannot read the audio ({e})") from e
    raise TaskDataError(f"{where}: the audio cell is neither bytes, an array nor a path ({type(value).__name__})")

