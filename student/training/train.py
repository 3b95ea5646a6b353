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
stream (`data.rank_stream`), gradients are averaged over the ranks every step (`student.distributed`), every
rank runs exactly `steps` steps (the stream is endless, so uneven shares cannot hang), the logged losses are
means over the ranks, and only rank 0 writes the config, metrics, TensorBoard and checkpoints. A checkpoint
records the world size and every rank's RNG state; resuming needs the same world size.

Input pipeline: `train.num_workers` DataLoader worker processes read the shards, decode and resample the audio
and compute the log-mel (`data.TrainBatches`; 0: in the training process); the frozen encoder, the student and
the losses run in the main process. The batches and their order do not depend on the worker count (see
`student.data`), so the losses are the same with or without workers and a run may resume with another count
(the checkpoint records the count, for the record only). The workers stop when the run ends or fails.

`train.gradient_checkpointing` recomputes each Q-Former and LLM layer's activations in the backward instead of
keeping them (`DiVAStudent.enable_gradient_checkpointing`; the same losses and gradients).

Several training caches mix by weight (`data.mixed_stream`): they must agree on what the student depends on
(LLM checksum, prompt ids, dtype, hidden size); the checkpoint's data position is then every cache's own
position plus the draw count (a checkpoint of one cache from before mixing still loads).

`train.teacher: online` recomputes h_T inside each step with the transformers teacher on the student's LLM
(`data.OnlineTeacher`, from the same `teacher_input_ids` the cache build uses): the no-cache baseline. The
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
carries the teacher's answers and their targets (`data.AnswerBatch`), the student's one forward reads
embed(answer[:-1]) after the suffix, and `losses.answer_loss` scores every answer position (l2 / kl / ce); the
cache must hold the targets the loss reads (`check_answers`), several caches must agree on the answer settings,
and the online teacher recomputes the same targets from the cache's answer settings.

Seams left for later: a manifest reader for online mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diva.config import ConfigError, RuntimeConfig, TrainConfig, save_config
from diva.runtime import resolve_device, resolve_dtype
from diva.student.eval.stats import blind_partners
from diva.student.inference.checkpoint import init_from_trained
from diva.student.inference.generate import eos_token_ids
from diva.student.model.losses import align_accuracy, align_loss, combined_loss, distill_loss, kl_loss
from diva.student.model.network import DiVAStudent, StudentConfig
from diva.student.run_folder import (  # noqa: F401  (re-exported: the run folder's names, as before)
    CHECKPOINTS,
    INFO_FILE,
    METRICS_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    TrainRun,
    list_checkpoints,
    prune_checkpoints,
)
from diva.student.training import distributed
from diva.student.training.data import (
    AnswerSpec,
    Batch,
    DataPosition,
    EncoderOutputs,
    MixPosition,
    OnlineTeacher,
    TrainBatches,
    TrainLoader,
    encoder_rows_within,
    epoch_samples,
    make_batch,
    mixed_mean_h_t,
)
from diva.student.training.distributed import SINGLE, Dist
from diva.student.training.xopd import XOPDTerm
from diva.teacher_cache.index import CacheError
from diva.teacher_cache.prompt import PromptSpec
from diva.teacher_cache.read import check_fingerprint
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


# --- checkpoints --------------------------------------------------------------------------------------


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
    `xopd` adds student.xopd_weight x the X-OPD term (rollouts and the live teacher: `student.xopd`). `step` (0-based)
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


def load_lm_head(llm_dir: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The LLM's frozen output layer (eval only: next-token agreement and KL)."""
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype)
    return llm.get_output_embeddings().to(device).requires_grad_(False)


def prediction_scores(h: torch.Tensor, h_t: torch.Tensor, lm_head: nn.Module, prefix: str) -> dict[str, float]:
    """Sums over rows of ||h - h_T||, cosine, top-1 agreement and KL(p_T || p_h), keys prefixed by `prefix`."""
    rows = h.shape[0]
    dtype = next(lm_head.parameters()).dtype
    top1_h = lm_head(h.to(dtype)).argmax(-1)  # (B,)
    top1_t = lm_head(h_t.to(dtype)).argmax(-1)  # (B,)
    return {
        f"{prefix}distill": float(distill_loss(h, h_t)) * rows,
        f"{prefix}cosine": float(F.cosine_similarity(h.float(), h_t.float(), dim=-1).sum()),
        f"{prefix}top1_agree": float((top1_h == top1_t).sum()),
        f"{prefix}kl": float(kl_loss(h, h_t, lm_head)) * rows,
    }


@torch.no_grad()
def evaluate(
    student: DiVAStudent, batches: list[Batch], student_cfg: StudentConfig, lm_head: nn.Module, h_t_mean: torch.Tensor
) -> dict[str, float]:
    """Held-out scores of the student, of the audio-blind control (each row fed another row's audio, scored against
    its own h_T: the report's seeded pairing `stats.blind_partners` over all the held-out rows, never a row with
    itself; the student's h_S for a clip does not depend on the row it is scored for, so the control re-scores the
    h_S already computed) and of the mean-h_T predictor (the train set's mean
    h_T as h_S for every row). `blind_same_text` is the fraction of rows whose borrowed audio says the same
    transcript: the control cannot tell those apart, so a high fraction makes it weak. `align` is the L2 alignment
    on student.align_slots whatever student.align_loss trains; `align_acc` the share of aligned slots whose best
    vocabulary token (argmax v E^T) is the transcript's, beside `align_acc_constant`: the same for one constant
    vector in every slot (each batch's mean transcript embedding), the score of audio tokens that carry no words."""
    was_training = student.training
    student.eval()
    sums: dict[str, float] = {}
    rows = pairs = skipped = truncated = 0
    heard, targets, texts = [], [], []  # every row's h_S, h_T and transcript ids, for the blind control

    def add(scores: dict[str, float]) -> None:
        for key, value in scores.items():
            sums[key] = sums.get(key, 0.0) + value

    for batch in batches:
        out = student(encoder_out=batch.encoder_out, encoder_lengths=batch.encoder_lengths)
        add(prediction_scores(out.h_s, batch.h_t, lm_head, ""))
        align, stats = align_loss(out.audio_tokens, batch.targets, student_cfg.long_text, student_cfg.align_slots)
        add({"align": float(align) * stats.pairs})
        table = student.llm.get_input_embeddings().weight  # (vocab, d_llm)
        ids = [torch.tensor(t, dtype=torch.long) for t in batch.text_ids]
        correct, _ = align_accuracy(out.audio_tokens, ids, table, student_cfg.long_text, student_cfg.align_slots)
        constant = torch.cat(batch.targets).mean(0).expand(out.audio_tokens.shape)  # (B, Q, d): one vector everywhere
        const_correct, _ = align_accuracy(constant, ids, table, student_cfg.long_text, student_cfg.align_slots)
        add({"align_acc": float(correct), "align_acc_constant": float(const_correct)})
        pairs, skipped, truncated = pairs + stats.pairs, skipped + stats.skipped, truncated + stats.truncated
        heard.append(out.h_s)
        targets.append(batch.h_t)
        texts += list(batch.text_ids)
        mean = h_t_mean.to(batch.h_t.device).expand_as(batch.h_t)  # (B, d_llm)
        add(prediction_scores(mean, batch.h_t, lm_head, "mean_ht_"))
        rows += batch.h_t.shape[0]
    same_text = float("nan")
    if rows >= 2:  # row i scored with partner[i]'s h_S, in chunks of the batch size
        partner = torch.tensor(blind_partners(rows))
        h_s, h_t, width = torch.cat(heard), torch.cat(targets), max(len(t) for t in targets)
        for start in range(0, rows, width):
            chunk = slice(start, min(rows, start + width))
            add(prediction_scores(h_s[partner[chunk]], h_t[chunk], lm_head, "blind_"))
        same_text = sum(texts[i] == texts[j] for i, j in enumerate(partner.tolist())) / rows
    student.train(was_training)
    per_pair = ("align", "align_acc", "align_acc_constant")
    metrics = {key: value / rows for key, value in sums.items() if key not in per_pair}
    for key in per_pair:  # means over the aligned (b, n) pairs
        metrics[key] = sums.get(key, 0.0) / pairs if pairs else float("nan")
    counts = {"rows": rows, "align_skipped": skipped, "align_truncated": truncated}
    return {**metrics, **counts, "blind_same_text": same_text}


def eval_batches(cache_dir: Path, encoder: EncoderOutputs, batch_size: int, limit: int) -> Iterator[Batch]:
    """The held-out cache in one fixed shuffled order (seed 0, epoch 0: the same at every evaluation; shuffled so
    that rolling a batch rarely pairs neighbours from one recording session), in batches, the last one smaller."""
    group: list[dict[str, Any]] = []
    made = 0
    for sample in epoch_samples(cache_dir, seed=0, epoch=0):
        group.append(sample)
        if len(group) == batch_size:
            yield make_batch(group, encoder)
            group, made = [], made + 1
            if limit and made >= limit:
                return
    if group:
        yield make_batch(group, encoder)


@dataclass
class HeldOut:
    """The periodic held-out evaluation: a cache, its encoder outputs (kept), the lm_head and the mean h_T."""

    cache_dir: Path
    encoder: EncoderOutputs
    lm_head: nn.Module
    h_t_mean: torch.Tensor  # (d_llm,) the TRAIN cache's mean h_T
    batch_size: int
    limit: int  # batches per evaluation, 0: all

    def __call__(self, student: DiVAStudent, student_cfg: StudentConfig) -> dict[str, float]:
        batches = list(eval_batches(self.cache_dir, self.encoder, self.batch_size, self.limit))
        return evaluate(student, batches, student_cfg, self.lm_head, self.h_t_mean)


def is_due(step: int, every: int, last: int) -> bool:
    """Whether something done every `every` steps (0: only at the end) is due after `step`."""
    return (every > 0 and step % every == 0) or step == last


# --- the recipe ---------------------------------------------------------------------------------------


def open_cache(cache_dir: Path, llm_checksum: str, llm_dir: Path | None = None) -> dict[str, Any]:
    """The cache index, after refusing a cache built with another LLM than the student's."""
    try:
        return check_fingerprint(cache_dir, llm_checksum, llm_dir)
    except CacheError as e:
        raise CacheError(f"refusing to train on {cache_dir}: {e}") from e


# the teacher's checksum is not compared between caches: open_cache checked each against the student's LLM (a cache
# from before checksum v2 records the v1 checksum of the same weights)
STUDENT_FINGERPRINT = ("prefix_ids", "suffix_ids", "dtype", "hidden_size")
ANSWER_FINGERPRINT = ("answer_tokens", "answer_targets", "answer_topk", "answer_stop_ids")
ANSWER_TARGETS_FOR = {"l2": ("hidden",), "kl": ("topk",), "ce": ("ids", "hidden", "topk")}


def check_answers(indexes: dict[Path, dict[str, Any]], student_cfg: StudentConfig, online: bool) -> None:
    """Refuse training caches that lack the answer targets student.answer_loss reads (answer_weight > 0)."""
    if student_cfg.answer_weight == 0:
        return
    wanted = ANSWER_TARGETS_FOR[student_cfg.answer_loss]
    for cache_dir, index in indexes.items():
        fingerprint = index["fingerprint"]
        if not fingerprint.get("answer_tokens"):
            raise CacheError(
                f"{cache_dir} holds no teacher answers, which student.answer_weight > 0 trains on; rebuild it with "
                f"--set cache.answer_tokens=32 --set cache.answer_targets={wanted[0]}"
                + (" (the online teacher recomputes what the cache's answer settings say)" if online else "")
            )
        if fingerprint["answer_targets"] not in wanted:
            raise CacheError(
                f"{cache_dir} stores answer targets '{fingerprint['answer_targets']}', but student.answer_loss="
                f"{student_cfg.answer_loss} needs {' or '.join(wanted)}; rebuild it with --set "
                f"cache.answer_targets={wanted[0]}, or choose another answer_loss"
            )


def check_mixable(indexes: dict[Path, dict[str, Any]]) -> None:
    """Refuse training caches that disagree on a fingerprint field the student depends on."""
    (first, reference), *rest = indexes.items()
    for cache_dir, index in rest:
        keys = STUDENT_FINGERPRINT + ANSWER_FINGERPRINT  # one batch holds rows of every cache: the same answers
        differ = [k for k in keys if index["fingerprint"].get(k) != reference["fingerprint"].get(k)]
        if differ:
            raise CacheError(
                f"cannot mix {first} and {cache_dir}: their {', '.join(differ)} differ; every training cache must "
                "be built with the same teacher, prompt, dtype and hidden size"
            )


def open_online_teacher(
    llm_dir: Path, prompt: PromptSpec, runtime: RuntimeConfig, device: torch.device, answers: AnswerSpec | None = None
) -> OnlineTeacher:
    """The online-teacher mode's h_T source (and with `answers`, of the answers and their targets): the
    transformers teacher on the student's LLM."""
    from diva.teacher_cache.backends.hf import HFTeacher

    return OnlineTeacher(HFTeacher(llm_dir, dtype=runtime.dtype, device=str(device)), prompt, answers)


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
