"""A run's resumable state: checkpoint folders (the trainable weights, AdamW, the LR schedule, every rank's RNG
and the data position), written under a temporary name and renamed, and read back exactly (`diva train --resume`).
The folder layout and names live in `student.run_folder`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from diva.student.model.network import DiVAStudent
from diva.student.run_folder import CHECKPOINTS, INFO_FILE, STATE_FILE, WEIGHTS_FILE
from diva.student.training import distributed
from diva.student.training.data import MixPosition
from diva.student.training.distributed import SINGLE, Dist
from diva.teacher_cache.index import CacheError


def rng_states() -> dict[str, Any]:
    """The torch RNG states (dropout draws); the data order needs none (it is a function of seed and epoch)."""
    states: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def full_weights(student: DiVAStudent) -> dict[str, torch.Tensor]:
    """The trainable weights on the CPU, gathered from the shards under FSDP (a collective: every rank calls it)."""
    return {k: distributed.gathered(v).detach().cpu().contiguous() for k, v in student.trainable_state_dict().items()}


def full_state(student: DiVAStudent, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The trainable weights and the optimizer state, gathered under FSDP (a collective: every rank calls it), so
    a checkpoint has the same layout with or without FSDP."""
    return full_weights(student), distributed.full_optimizer_state(optimizer)


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    schedule: Any,
    position: MixPosition,
    rank_rngs: list[dict[str, Any]] | None = None,
    num_workers: int = 0,
) -> Path:
    """checkpoints/step_XXXXXX/ with weights, state and a json, written under a temp name and renamed.

    `weights`, `optimizer_state`: the trainable weights and optimizer state (`full_state`).
    `rank_rngs`: every rank's RNG states in a distributed run (the world size is their count); None: this
    process alone. `num_workers` is for the record only: the data order does not depend on it."""
    from safetensors.torch import save_file

    final = run_dir / CHECKPOINTS / f"step_{step:06d}"
    tmp = run_dir / CHECKPOINTS / f".step_{step:06d}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"step": str(step)})
    rngs = rank_rngs or [rng_states()]
    state = {
        "step": step,
        "optimizer": optimizer_state,
        "schedule": schedule.state_dict(),
        "rng": rngs[0],
        "rank_rngs": rngs,
        "world_size": len(rngs),
        "position": position.to_dict(),
        "num_workers": num_workers,
    }
    torch.save(state, tmp / STATE_FILE)
    info = {"step": step, "position": position.to_dict(), "world_size": len(rngs), "num_workers": num_workers,
            "files": [WEIGHTS_FILE, STATE_FILE], "tensors": len(weights)}  # fmt: skip
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if final.exists():  # a checkpoint of the same step from a run that was resumed before it
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_checkpoint(
    path: Path,
    student: DiVAStudent,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    layout: Dist = SINGLE,
    num_caches: int = 1,
) -> tuple[int, MixPosition]:
    """Restore weights, optimizer, schedule and this rank's RNG from a checkpoint folder; returns (step, data
    position). Refuses a checkpoint written by a run of another world size (its data split would differ) or
    over another number of caches. Under FSDP the gathered tensors are cut to this rank's shards."""
    from safetensors.torch import load_file

    weights = load_file(str(path / WEIGHTS_FILE))
    expected = set(student.trainable_state_dict())
    if set(weights) != expected:
        raise CacheError(f"{path}: the checkpoint's tensors do not match this student's trainable parameters")
    state = torch.load(path / STATE_FILE, weights_only=True)
    saved_world = int(state.get("world_size", 1))  # checkpoints from before DDP: one process
    if saved_world != layout.world_size:
        raise CacheError(
            f"{path} was written by a run of {saved_world} process(es) but this run has {layout.world_size}; "
            f"resume with --nproc_per_node {saved_world} (the data split depends on the world size)"
        )
    position = MixPosition.from_dict(state["position"])
    if len(position.caches) != num_caches:
        raise CacheError(
            f"{path} was written by a run over {len(position.caches)} cache(s) but this run has {num_caches}; "
            "resume with the same --cache list (and weights) as the run that wrote it"
        )
    current = student.trainable_state_dict()
    student.load_state_dict({k: distributed.shard_like(v, current[k]) for k, v in weights.items()}, strict=False)
    optimizer.load_state_dict(distributed.shard_optimizer_state(state["optimizer"], optimizer))
    schedule.load_state_dict(state["schedule"])
    set_rng_states(state["rank_rngs"][layout.rank] if "rank_rngs" in state else state["rng"])
    return int(state["step"]), position


# --- metrics ------------------------------------------------------------------------------------------
