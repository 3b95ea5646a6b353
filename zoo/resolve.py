"""Turn a model name into a local folder: an embedded name, a local path, or a Hugging Face id that is
already in the local cache. Nothing is ever downloaded."""

from __future__ import annotations

from pathlib import Path

from diva.paths import models_dir
from diva.zoo.fetch import EMBEDDED, is_complete

TINY_NAMES = ("tiny-llama", "tiny-whisper")


class ModelNotFound(FileNotFoundError):
    """A model name that is neither a folder, nor a fetched embedded model, nor in the local HF cache."""


def resolve_model(spec: str | Path) -> Path:
    """The local folder of model `spec` (see module docstring); raises ModelNotFound with a hint."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    name = str(spec)
    if name in EMBEDDED or name in TINY_NAMES:
        folder = models_dir() / name
        if is_complete(folder) or (name in TINY_NAMES and (folder / "config.json").is_file()):
            return folder
        how = "diva models fetch" if name in EMBEDDED else "diva models tiny"
        raise ModelNotFound(f"model '{name}' is not at {folder} yet; run `{how}` first")
    if "/" in name and not name.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, local_files_only=True))
        except Exception as e:  # the hub client raises several kinds for "not cached"
            raise ModelNotFound(
                f"'{name}' is not in the local Hugging Face cache and diva never downloads; "
                f"put it there first (e.g. `hf download {name}` on a machine with access) "
                f"or give a local folder"
            ) from e
    raise ModelNotFound(
        f"'{name}' is not a folder, an embedded model ({', '.join(EMBEDDED)}), "
        f"a tiny model ({', '.join(TINY_NAMES)}) or a Hugging Face id (owner/name)"
    )
