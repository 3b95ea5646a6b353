"""Train the DiVA student on a teacher cache: one recipe function, `train`, over small parts.

    cache index --(fingerprint must match the LLM)--> student built from the index's prompt ids
    loop for `steps` optimizer steps:
        grad_accum x [batch -> student -> combined_loss / grad_accum -> backward]
        clip grad norm -> AdamW step -> LR schedule step (1% linear warm-up, cosine to 0.1 x peak)
        metrics.jsonl + TensorBoard; held-out eval every eval_every; checkpoint every checkpoint_every

A checkpoint holds the trainable weights (safetensors), the optimizer, scheduler and RNG states and the data
position (torch.save of tensors and plain types, read back with weights_only=True), written under a temporary
name and renamed. `resume=True` continues from the latest one and logs the same losses an uninterrupted run
would (bitwise on CPU, with encoder-output reuse off: reused outputs are computed in whichever batch an
utterance first appears in, and a different batch shape can round differently).

Under torchrun (`torchrun --nproc_per_node N -m diva.cli train ...`) each rank trains on its share of the
stream (`data.rank_stream`), gradients are averaged over the ranks every step (`training.distributed`: torch
DDP), every rank runs exactly `steps` steps (the stream is endless, so uneven shares cannot hang), the logged losses are
means over the ranks, and only rank 0 writes the config, metrics, TensorBoard and checkpoints. A checkpoint
records the world size and every rank's RNG state; resuming needs the same world size.

Input pipeline: `train.num_workers` DataLoader worker processes read the shards, decode and resample the audio
and compute the log-mel (`data.TrainBatches`; 0: in the training process); the frozen encoder, the student and
the losses run in the main process. The batches and their order do not depend on the worker count (see
`training.data`), so the losses are the same with or without workers and a run may resume with another count
(the checkpoint records the count, for the record only). The workers stop when the run ends or fails.

`train.gradient_checkpointing` recomputes each Q-Former and LLM layer's activations in the backward instead of
keeping them (`DiVAStudent.enable_gradient_checkpointing`; the same losses and gradients).

Several training caches mix by weight (`data.mixed_stream`): they must agree on what the student depends on
(LLM checksum, prompt ids, dtype, hidden size); the checkpoint's data position is then every cache's own
position plus the draw count (a checkpoint of one cache from before mixing still loads).

`train.teacher: online` recomputes h_T inside each step with the transformers teacher on the student's LLM
(`batches.OnlineTeacher`, from the same `teacher_input_ids` the cache build uses): the no-cache baseline. The
cache still supplies the audio, transcripts and alignment targets (a cacheless manifest reader is not done),
and held-out evaluation still reads h_T from the eval cache.

`train.fsdp` (under torchrun) shards the trainable parts, their gradients and AdamW state over the ranks with
FSDP2 `fully_shard` (`distributed.shard_trainable`; the frozen encoder and LLM stay whole on every rank): FSDP
averages the gradients itself (no DDP wrapper then), and the clip is DTensor-aware. Without it a multi-process
run wraps the student in torch's DistributedDataParallel over the trainable parameters (`distributed.replicate`).
Checkpoints hold the gathered weights and optimizer state (every rank joins the gathers, rank 0 writes), laid out
as without FSDP, so a run with FSDP resumes a checkpoint of a run without it (tested) and the other way round (the same
files; the world size must still match), and a student without FSDP loads its weights (tested). Under FSDP every
rank runs the held-out evaluation (the forward's gathers need them all); rank 0 logs it. Tested on the CPU with
gloo (two processes); not yet run on CUDA/nccl here.

Whole-answer targets (`student.answer_weight` > 0, on a cache built with `cache.answer_tokens` > 0): the batch
carries the teacher's answers and their targets (`losses.AnswerBatch`), the student's one forward reads
embed(answer[:-1]) after the suffix, and `losses.answer_loss` scores every answer position (l2 / kl / ce); the
cache must hold the targets the loss reads (`caches.check_answers`), several caches must agree on the answer settings,
and the online teacher recomputes the same targets from the cache's answer settings.

Seams left for later: a manifest reader for online mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diva.config import ConfigError, RuntimeConfig, TrainConfig, save_config
from diva.runtime import resolve_device, resolve_dtype
from diva.student.inference.checkpoint import init_from_trained
from diva.student.inference.generate import eos_token_ids
from diva.student.model.losses import combined_loss
from diva.student.model.network import DiVAStudent, StudentConfig
from diva.student.run_folder import (
    INFO_FILE,
    METRICS_FILE,
    TrainRun,
    list_checkpoints,
    prune_checkpoints,
)
from diva.student.training import distributed
from diva.student.training.batches import AnswerSpec, Batch, EncoderOutputs, encoder_rows_within, make_batch
from diva.student.training.caches import check_answers, check_mixable, open_cache, open_online_teacher
from diva.student.training.data import DataPosition, MixPosition, TrainBatches, TrainLoader, mixed_mean_h_t
from diva.student.training.distributed import SINGLE, Dist
from diva.student.training.heldout import HeldOut, load_lm_head
from diva.student.training.state import (
    full_state,
    full_weights,
    load_checkpoint,
    rng_states,
    save_checkpoint,
)
from diva.student.training.xopd import XOPDTerm
from diva.teacher_cache.index import CacheError
from diva.teacher_cache.prompt import PromptSpec
from diva.zoo.checksum import weights_checksum

DEBUG_RANK_DIR = "DIVA_DEBUG_RANK_DIR"  # test hook: each rank writes the ids it trained on and its final weights


# --- schedule and optimizer ---------------------------------------------------------------------------


def lr_factor(step: int, steps: int, warmup_frac: float, min_ratio: float) -> float:
    """The LR multiplier of (0-based) `step`: linear warm-up to 1, then cosine decay to `min_ratio` at the end."""
    warmup = max(1, round(warmup_frac * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup - 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(
    student: nn.Module, cfg: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters and its warm-up + cosine schedule."""
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.steps, cfg.warmup_frac, cfg.min_lr_ratio)
    )
    return optimizer, schedule


class MetricsLog:
    """metrics.jsonl (one json object per line) and TensorBoard scalars, side by side."""

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / METRICS_FILE
        if resume_step is not None and self.path.is_file():  # drop what an interrupted run logged past its checkpoint
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        split = record.get("split", "train")
        for key, value in record.items():
            if isinstance(value, int | float) and key not in ("step", "epoch"):
                self.writer.add_scalar(f"{split}/{key}", value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# --- one step, one evaluation -------------------------------------------------------------------------


def train_step(
    student: DiVAStudent,
    batches: Iterator[tuple[Batch, MixPosition]],
    student_cfg: StudentConfig,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    layout: Dist = SINGLE,
    xopd: XOPDTerm | None = None,
    step: int = 0,
    forward: nn.Module | None = None,
) -> tuple[dict[str, Any], MixPosition]:
    """grad_accum micro-batches, gradients averaged over the ranks, clipping, one AdamW step; returns the step's
    metrics (losses: means over the ranks; align counts: sums) and the data position (the same on every rank).
    `xopd` adds student.xopd_weight x the X-OPD term (rollouts and the live teacher: `training.xopd`). `step` (0-based)
    below student.align_warmup_steps trains the alignment alone. `forward`: the module the forward goes through (the
    DDP wrapper of a multi-process run, which averages the gradients during the last micro-batch's backward; None:
    the student itself)."""
    if step < student_cfg.align_warmup_steps:
        student_cfg = dataclasses.replace(student_cfg, distill_weight=0.0, kl_weight=0.0, answer_weight=0.0,
                                          xopd_weight=0.0)  # fmt: skip
        xopd = None
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {"loss": 0.0}
    counts = {"align_skipped": 0, "align_truncated": 0, "align_empty": 0, "audio_truncated": 0}
    lr = schedule.get_last_lr()[0]
    model = student if forward is None else forward
    for micro in range(cfg.grad_accum):
        last = micro == cfg.grad_accum - 1
        sync = model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext()
        with sync:  # DDP: gradients all-reduced once, in the step's last backward
            position = _micro_step(student, model, batches, student_cfg, cfg, xopd, sums, counts)
    params = [p for p in student.parameters() if p.requires_grad]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = distributed.clip_grad_norm(params, max_norm)  # of the averaged grads: equal on all ranks
    optimizer.step()
    schedule.step()
    device = student.prefix_ids.device
    reduced = distributed.reduce_metrics({**sums, **counts}, layout, device, sums=tuple(counts))
    return {**reduced, "lr": lr, "grad_norm": grad_norm}, position


def _micro_step(
    student: DiVAStudent,
    model: nn.Module,
    batches: Iterator[tuple[Batch, MixPosition]],
    student_cfg: StudentConfig,
    cfg: TrainConfig,
    xopd: XOPDTerm | None,
    sums: dict[str, float],
    counts: dict[str, int],
) -> MixPosition:
    """One micro-batch: forward through `model`, the losses, backward (scaled by 1 / grad_accum); adds its metrics
    to `sums` and `counts` and returns the data position after it."""
    batch, position = next(batches)
    counts["audio_truncated"] += batch.audio_truncated
    answer_ids = batch.answers.ids if student_cfg.answer_weight > 0 and batch.answers is not None else None
    out = model(encoder_out=batch.encoder_out, encoder_lengths=batch.encoder_lengths, answer_ids=answer_ids)
    ids = table = None
    if student_cfg.align_weight > 0 and student_cfg.align_loss != "l2":  # the ce alignment's targets, classifier
        ids = [torch.tensor(t, dtype=torch.long) for t in batch.text_ids]
        table = student.llm.get_input_embeddings().weight  # (vocab, d_llm) frozen
    loss = combined_loss(out, batch.h_t, batch.targets, student_cfg, student.lm_head, batch.answers, ids, table)
    if xopd is not None:
        loss.parts["xopd"], stats = xopd(student, out.audio_tokens, batch.text_ids, student_cfg)
        loss.total = loss.total + student_cfg.xopd_weight * loss.parts["xopd"]
        for name, value in stats.items():
            sums[name] = sums.get(name, 0.0) + value / cfg.grad_accum
    (loss.total / cfg.grad_accum).backward()
    sums["loss"] += float(loss.total.detach()) / cfg.grad_accum
    for name, part in loss.parts.items():
        sums[name] = sums.get(name, 0.0) + float(part.detach()) / cfg.grad_accum
    if loss.align_stats is not None:
        counts["align_skipped"] += loss.align_stats.skipped
        counts["align_truncated"] += loss.align_stats.truncated
        counts["align_empty"] += loss.align_stats.empty
    return position


def is_due(step: int, every: int, last: int) -> bool:
    """Whether something done every `every` steps (0: only at the end) is due after `step`."""
    return (every > 0 and step % every == 0) or step == last


# --- the recipe ---------------------------------------------------------------------------------------


def train(
    cache_dir: Path | Sequence[Path],
    run_dir: Path,
    whisper_dir: Path,
    llm_dir: Path,
    student_cfg: StudentConfig,
    train_cfg: TrainConfig,
    runtime: RuntimeConfig,
    eval_cache_dir: Path | None = None,
    resume: bool = False,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
    cache_weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Train the student for train_cfg.steps steps; returns the last train and eval metrics and the checkpoint.

    `cache_dir`: one training cache or several, mixed by `cache_weights` (default: all 1.0). Under torchrun this
    runs on every rank (see the module doc); `progress` is called on rank 0 only."""
    from transformers import WhisperFeatureExtractor

    cache_dirs = [Path(cache_dir)] if isinstance(cache_dir, str | Path) else [Path(d) for d in cache_dir]
    weights = [1.0] * len(cache_dirs) if cache_weights is None else [float(w) for w in cache_weights]
    if not cache_dirs or len(weights) != len(cache_dirs) or any(not w > 0 for w in weights):
        raise ConfigError(f"need one weight > 0 per training cache: {len(cache_dirs)} cache(s), weights {weights}")
    cache_dir, run_dir = cache_dirs[0], Path(run_dir)
    checkpoints = list_checkpoints(run_dir)
    if checkpoints and not resume:
        raise FileExistsError(f"{run_dir} already holds checkpoints; pass resume=True or choose another run_dir")
    if checkpoints:
        info = json.loads((checkpoints[-1] / INFO_FILE).read_text())
        job = distributed.from_env()
        same_layout = info.get("world_size", 1) == job.world_size and len(
            MixPosition.from_dict(info["position"]).caches
        ) == len(cache_dirs)  # otherwise the full path refuses the resume, saying why
        if info["step"] >= train_cfg.steps and same_layout:  # a finished run: nothing to load, nothing to train
            return {"steps": info["step"], "resumed_from": info["step"], "train": {}, "eval": {},
                    "checkpoint": str(checkpoints[-1]), "position": info["position"], "rank": job.rank,
                    "world_size": info.get("world_size", 1), "finished_before": True}  # fmt: skip
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    layout, device = distributed.setup(resolve_device(runtime.device))
    loader: TrainLoader | None = None
    try:
        dtype = resolve_dtype(runtime.dtype, device)

        llm_checksum = weights_checksum(Path(llm_dir))
        indexes = {d: open_cache(d, llm_checksum, Path(llm_dir)) for d in cache_dirs}
        check_mixable(indexes)
        check_answers(indexes, student_cfg, train_cfg.teacher == "online")
        index = indexes[cache_dir]
        distributed.check_shards(sum(len(i["shards"]) for i in indexes.values()), layout)
        if eval_cache_dir is not None:
            eval_index = open_cache(Path(eval_cache_dir), llm_checksum, Path(llm_dir))
            if eval_index["prompt"]["prefix_ids"] != index["prompt"]["prefix_ids"] or (
                eval_index["prompt"]["suffix_ids"] != index["prompt"]["suffix_ids"]
            ):
                raise CacheError(f"{eval_cache_dir} was built with other prompt ids than {cache_dir}")
        if layout.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            eval_dir = str(eval_cache_dir) if eval_cache_dir else None
            run = TrainRun(str(cache_dir), [str(d) for d in cache_dirs], weights, eval_dir, str(whisper_dir),
                           str(llm_dir), student_cfg, train_cfg, runtime, weights_checksum(Path(whisper_dir)),
                           llm_checksum, index["prompt"])  # fmt: skip
            save_config(run, run_dir / "config.yaml", made_by="diva.student.training.train.train")

        torch.manual_seed(train_cfg.seed)  # the same initialisation on every rank (and rank 0's is broadcast)
        prompt = PromptSpec.from_json(index["prompt"])  # the cache's prompt ids, never a fresh render
        init_from = Path(train_cfg.init_from) if train_cfg.init_from else None
        # trained weights replace the projection's initialisation: skip projection_init's pass over the table
        build_cfg = replace(student_cfg, projection_init="default") if init_from else student_cfg
        student = DiVAStudent.from_pretrained_parts(whisper_dir, llm_dir, prompt, build_cfg, dtype=dtype)
        if init_from is not None:
            init_from_trained(student, init_from, Path(whisper_dir), Path(llm_dir), prompt, student_cfg)
        student = student.to(device).train()
        if train_cfg.autocast and dtype == torch.bfloat16:  # native bf16 only: runtime.dtype auto picks it there
            student.autocast_dtype = torch.bfloat16
        xopd = XOPDTerm(prompt, eos_token_ids(llm_dir)) if student_cfg.xopd_weight > 0 else None
        if train_cfg.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        if train_cfg.fsdp:  # FSDP cuts its shards from rank 0's weights; DDP (below) broadcasts them itself
            distributed.broadcast_trainable(student, layout)
            distributed.shard_trainable(student, layout, device)
        if layout.enabled:  # each rank its own dropout draws
            torch.manual_seed(train_cfg.seed + layout.rank)
        optimizer, schedule = build_optimizer(student, train_cfg)
        step, position, resumed_from = 0, MixPosition(tuple(DataPosition() for _ in cache_dirs)), None
        if resume and checkpoints:
            step, position = load_checkpoint(checkpoints[-1], student, optimizer, schedule, layout, len(cache_dirs))
            resumed_from = step
        log = MetricsLog(run_dir, resumed_from) if layout.is_main else None

        feature_extractor = WhisperFeatureExtractor.from_pretrained(whisper_dir)
        reuse = train_cfg.reuse_encoder_outputs
        capacity = encoder_rows_within(train_cfg.encoder_memory_gb, student, feature_extractor)
        encoder = EncoderOutputs(student, feature_extractor, student_cfg.trim_mel, reuse, capacity)
        teacher = None
        if train_cfg.teacher == "online":
            answers = AnswerSpec.from_fingerprint(index["fingerprint"]) if student_cfg.answer_weight > 0 else None
            teacher = open_online_teacher(Path(llm_dir), prompt, runtime, device, answers)
        source = TrainBatches(cache_dirs, weights, train_cfg.seed, position, train_cfg.batch_size, feature_extractor,
                              student_cfg.trim_mel, reuse, layout.rank, layout.world_size,
                              train_cfg.shuffle_shards, capacity)  # fmt: skip
        loader = TrainLoader(source, train_cfg.num_workers)  # decode + log-mel, in workers when num_workers > 0
        consumed_ids: list[str] = []  # kept for the DIVA_DEBUG_RANK_DIR test hook only
        batches = ((make_batch(prepared, encoder, teacher), pos) for prepared, pos in loader)
        if os.environ.get(DEBUG_RANK_DIR):
            batches = recording(batches, consumed_ids)

        held_out = None
        # rank 0 evaluates while the others wait at the all-reduce; under FSDP every rank joins the forward's gathers
        if eval_cache_dir is not None and (layout.is_main or train_cfg.fsdp):
            lm_head = student.lm_head if student.lm_head is not None else load_lm_head(Path(llm_dir), dtype, device)
            eval_encoder = EncoderOutputs(student, feature_extractor, student_cfg.trim_mel, True, capacity)
            held_out = HeldOut(Path(eval_cache_dir), eval_encoder, lm_head, mixed_mean_h_t(cache_dirs, weights),
                               train_cfg.batch_size, train_cfg.eval_batches)  # fmt: skip

        # torch DDP over the trainable parts (after a resume has loaded the same weights on every rank)
        forward = distributed.replicate(student, layout, device) if layout.enabled and not train_cfg.fsdp else None
        last_train: dict[str, Any] = {}
        last_eval: dict[str, Any] = {}
        checkpoint: Path | None = checkpoints[-1] if resumed_from is not None else None
        while step < train_cfg.steps:  # every rank runs the same steps: the stream never ends
            started = time.perf_counter()
            metrics, position = train_step(student, batches, student_cfg, train_cfg, optimizer, schedule, layout,
                                           xopd, step, forward)  # fmt: skip
            step += 1
            seconds = time.perf_counter() - started
            samples_per_s = train_cfg.batch_size * train_cfg.grad_accum * layout.world_size / seconds
            last_train = {
                "split": "train",
                "step": step,
                "epoch": position.epoch,
                **({"epochs": [p.epoch for p in position.caches]} if len(cache_dirs) > 1 else {}),
                **metrics,
                "samples_per_s": samples_per_s,
            }
            if log and (step % train_cfg.log_every == 0 or step == train_cfg.steps):
                log.write(last_train)
            if progress and layout.is_main:
                progress(step, last_train)
            if held_out is not None and is_due(step, train_cfg.eval_every, train_cfg.steps):
                last_eval = {"split": "eval", "step": step, **held_out(student, student_cfg)}
                if log:
                    log.write(last_eval)
            if is_due(step, train_cfg.checkpoint_every, train_cfg.steps):
                rngs = distributed.gather_objects(rng_states(), layout) if layout.enabled else None
                if layout.is_main or train_cfg.fsdp:  # under FSDP every rank joins the gathers
                    weights, optimizer_state = full_state(student, optimizer)
                if layout.is_main:
                    checkpoint = save_checkpoint(run_dir, step, weights, optimizer_state, schedule, position, rngs,
                                                 num_workers=train_cfg.num_workers)  # fmt: skip
                    prune_checkpoints(run_dir, train_cfg.keep_checkpoints)
        if log:
            log.close()
        if os.environ.get(DEBUG_RANK_DIR):
            write_rank_debug(Path(os.environ[DEBUG_RANK_DIR]), layout.rank, consumed_ids, student)
    finally:
        if loader is not None:  # a finished or failed run stops its data workers
            loader.close()
        distributed.teardown(layout)
    return {
        "steps": step,
        "resumed_from": resumed_from,
        "train": last_train,
        "eval": last_eval,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "position": position.to_dict(),
        "rank": layout.rank,
        "world_size": layout.world_size,
    }


def recording(batches: Iterator[tuple[Batch, MixPosition]], ids: list[str]) -> Iterator[tuple[Batch, MixPosition]]:
    """Test hook: the batches unchanged, each batch's utterance ids appended to `ids` as it is taken."""
    for batch, position in batches:
        ids.extend(batch.ids)
        yield batch, position


def write_rank_debug(folder: Path, rank: int, ids: list[str], student: DiVAStudent) -> None:
    """Test hook: rank<r>_ids.json (the utterances this rank trained on, in order), rank<r>.safetensors (the
    whole weights, gathered under FSDP: every rank calls it) and rank<r>_params.json (the trainable values this
    rank holds)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}_ids.json").write_text(json.dumps(ids) + "\n")
    save_file(full_weights(student), str(folder / f"rank{rank}.safetensors"))
    local = sum(
        p.to_local().numel() if distributed.is_sharded(p) else p.numel() for p in distributed.trainable(student)
    )
    (folder / f"rank{rank}_params.json").write_text(json.dumps({"local": local}) + "\n")  # < the whole under FSDP
