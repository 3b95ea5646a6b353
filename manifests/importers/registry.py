"""The importers besides Common Voice, by corpus kind."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from diva.manifests.importers.base import ImportOptions, Row
from diva.manifests.importers.hf import read_hf
from diva.manifests.importers.lhotse import read_lhotse
from diva.manifests.importers.librispeech import read_librispeech
from diva.manifests.importers.nemo import read_nemo
from diva.manifests.importers.tables import read_csv_table, read_jsonl_table, read_tsv_table

IMPORTERS: dict[str, Callable[[Path, ImportOptions], Iterator[Row]]] = {
    "librispeech": read_librispeech,
    "tsv": read_tsv_table,
    "csv": read_csv_table,
    "jsonl": read_jsonl_table,
    "nemo": read_nemo,
    "lhotse": read_lhotse,
    "hf": read_hf,
}
