"""A `diva train` run folder: what it holds and how its checkpoints are found (the trainer writes them, inference,
export and the report read them; this module imports neither, so neither imports the other).

    RUN_DIR/config.yaml                     TrainRun: everything that made the run
    RUN_DIR/metrics.jsonl                   one JSON record per logged step and per held-out evaluation
    RUN_DIR/checkpoints/step_XXXXXX/        trainable.safetensors, state.pt, checkpoint.json (written last)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diva.config import RuntimeConfig, StudentConfig, TrainConfig

CHECKPOINTS = "checkpoints"
WEIGHTS_FILE = "trainable.safetensors"
STATE_FILE = "state.pt"
INFO_FILE = "checkpoint.json"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainRun:
    """Everything that made a run: saved as run_dir/config.yaml."""

    cache_dir: str = ""  # the training cache (with several, the first)
    cache_dirs: list[str] = field(default_factory=list)  # every training cache, in mixing order
    cache_weights: list[float] = field(default_factory=list)  # their mixing weights
    eval_cache_dir: str | None = None
    whisper_dir: str = ""
    llm_dir: str = ""
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    # What inference needs to check and rebuild the student without the cache (runs from before: read the cache)
    whisper_checksum: str = ""  # zoo.checksum.weights_checksum of whisper_dir
    llm_checksum: str = ""  # of llm_dir (equal to the caches' teacher_weights_sha256)
    prompt: dict[str, Any] = field(default_factory=dict)  # the training cache's prompt (PromptSpec.to_json)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (the json is written last, renames are atomic), oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / INFO_FILE).is_file())


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
