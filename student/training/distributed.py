"""Data-parallel training under torchrun: the process group, gradient averaging and metric reduction.

    torchrun sets RANK / WORLD_SIZE / LOCAL_RANK --> `setup()` joins the group (gloo on CPU, nccl on CUDA)
    start:            `replicate` wraps the student in torch's DistributedDataParallel, the frozen encoder and
                      LLM registered as parameters to ignore: DDP broadcasts rank 0's TRAINABLE parameters and
                      averages only their gradients (the frozen ones are loaded on every rank and never change)
    every micro-batch: each rank's own samples (`data.rank_stream`) -> forward through the DDP wrapper ->
                      backward; DDP all-reduces the gradients in buckets while the backward runs (overlapping
                      communication with compute), and skips that under `no_sync()` for all but the last
                      micro-batch of a step (grad_accum)
    every step:       clip -> AdamW: the same averaged grads and the same update on every rank, so weights stay equal

FSDP (train.fsdp, for large students): `shard_trainable` applies torch's FSDP2 `fully_shard` to the TRAINABLE
parts only: each Q-Former decoder layer, then the adapter (queries, positions, final norm, or the MLP), then the
projection. Their parameters, gradients and AdamW state become DTensors sharded over the ranks (dim 0); the
frozen encoder and LLM stay whole on every rank. FSDP all-gathers a unit's parameters for its forward and
backward and reduce-scatters (averages) its gradients, so no DDP wrapper is used; the clip uses the
DTensor-aware `clip_grad_norm_` (the norm is global). Checkpoints hold gathered tensors (`full_tensor`,
a collective every rank joins; rank 0 writes), in the same layout as a run without FSDP, so either kind of run
resumes the other's checkpoint (`shard_like` scatters them back). Works on CUDA/nccl and on the CPU with gloo
(the two-process test); with grad_accum the gradients are reduce-scattered after every micro-batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank of world_size (1: a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # whether `setup` initialised the process group (and `teardown` destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes metrics, TensorBoard, checkpoints and the config."""
        return self.rank == 0


SINGLE = Dist()  # a plain single-process run


def from_env() -> Dist:
    """The job layout torchrun put in the environment (RANK, WORLD_SIZE, LOCAL_RANK); none: a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join torchrun's process group if there is one; on CUDA each rank takes the GPU of its LOCAL_RANK."""
    layout = from_env()
    if not layout.enabled:
        return layout, device
    if device.type == "cuda":
        device = torch.device("cuda", layout.local_rank)
        torch.cuda.set_device(device)
    if dist.is_initialized():  # the caller set the group up itself
        return Dist(dist.get_rank(), dist.get_world_size(), layout.local_rank), device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), layout.local_rank, owns_group=True), device


def teardown(layout: Dist) -> None:
    if layout.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


@torch.no_grad()
def broadcast_trainable(module: nn.Module, layout: Dist) -> None:
    """Give every rank rank 0's trainable parameters (the same seed should already make them equal)."""
    if layout.enabled:
        for p in trainable(module):
            dist.broadcast(p.data, src=0)


def replicate(student: nn.Module, layout: Dist, device: torch.device) -> nn.Module:
    """torch DistributedDataParallel over the student's trainable parameters (module doc); the frozen ones are
    ignored (no broadcast at the start, no gradient buckets). The forward goes through the returned wrapper, every
    other use (state dicts, evaluation, generation) through the student itself, whose parameters DDP shares."""
    from torch.nn.parallel import DistributedDataParallel

    if not layout.enabled:
        raise ValueError("replicate wraps the student for a torchrun job of two or more processes")
    frozen = [name for name, p in student.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in student.named_buffers()]  # equal on every rank by construction
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(student, frozen)
    return DistributedDataParallel(
        student,
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,
        find_unused_parameters=False,  # every trainable tensor (queries, decoder layers, projection) gets a gradient
    )


def reduce_metrics(
    values: dict[str, float], layout: Dist, device: torch.device, sums: tuple[str, ...] = ()
) -> dict[str, float]:
    """The mean over ranks of each value (the sum for the keys in `sums`, e.g. counts); the same on every rank."""
    if not layout.enabled:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    reduced = dict(zip(keys, t.tolist(), strict=True))
    return {k: int(reduced[k]) if k in sums else reduced[k] / layout.world_size for k in values}


def gather_objects(obj: object, layout: Dist) -> list[object]:
    """`obj` of every rank, in rank order (on every rank)."""
    if not layout.enabled:
        return [obj]
    out: list[object] = [None] * layout.world_size
    dist.all_gather_object(out, obj)
    return out


def check_shards(num_shards: int, layout: Dist, workers: int = 1) -> None:
    """Refuse a cache with fewer shards than ranks x data workers: a reader (or a shard-level split) would idle."""
    needed = layout.world_size * workers
    if num_shards < needed:
        raise ValueError(
            f"the cache has {num_shards} shard(s) but {layout.world_size} rank(s) x {workers} data worker(s) need at "
            f"least {needed}; rebuild it with a smaller cache.shard_size or run fewer processes"
        )


# --- FSDP2 over the trainable parts ---------------------------------------------------------------------------


def shard_trainable(student: nn.Module, layout: Dist, device: torch.device) -> None:
    """FSDP2 `fully_shard` over the student's trainable parts (module doc); the frozen parts stay replicated.

    Call it after `broadcast_trainable` (the shards are cut from the weights every rank holds) and before the
    optimizer is built (it must see the sharded parameters)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not layout.enabled:
        raise ValueError("train.fsdp shards over the ranks of a torchrun job; run with torchrun --nproc_per_node >= 2")
    if any(p.requires_grad for m in (student.encoder, student.llm) for p in m.parameters()):
        raise ValueError("train.fsdp shards the adapter and projection only; the encoder and LLM must be frozen")
    mesh = init_device_mesh(device.type, (layout.world_size,))
    for layer in getattr(student.adapter, "layers", []):  # a Q-Former: one unit per decoder layer
        fully_shard(layer, mesh=mesh)
    fully_shard(student.adapter, mesh=mesh)
    fully_shard(student.projection, mesh=mesh)


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a collective: every rank must call it in the same order), else itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every sharded state tensor gathered: the layout of a run without FSDP."""
    state = optimizer.state_dict()
    for index in sorted(state["state"]):
        state["state"][index] = {k: gathered(v) for k, v in sorted(state["state"][index].items())}
    return state


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` cut like the (possibly sharded) `like`: a DTensor on its mesh and placements, else `full` as is."""
    from torch.distributed.tensor import distribute_tensor

    if not is_sharded(like):
        return full
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A gathered (or non-FSDP) optimizer state dict cut to this run's sharded parameters, ready to load."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in state["state"].items():
        param = params[int(index)]
        state["state"][index] = {k: v if k == "step" else shard_like(v, param) for k, v in values.items()}
    return state


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm (over all ranks' shards under FSDP); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(gathered(norm))
