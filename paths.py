"""Where diva keeps what it makes outside a run folder."""

from __future__ import annotations

import os
from pathlib import Path


def diva_home() -> Path:
    """The folder for fetched models and other shared state: `$DIVA_HOME`, else `~/.cache/diva`."""
    home = os.environ.get("DIVA_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "diva"


def models_dir() -> Path:
    """Where `diva models fetch` writes the embedded default models."""
    return diva_home() / "models"
