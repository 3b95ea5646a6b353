"""The trainer's periodic held-out evaluation: the student, its audio-blind control (the report's pairing) and the
mean-h_T predictor on a held-out cache, scored with `model.metrics` like `diva eval`, plus the alignment's own
scores (aligned-token accuracy beside a constant's)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diva.student.model.losses import align_accuracy, align_loss
from diva.student.model.metrics import blind_partners, prediction_scores
from diva.student.model.network import DiVAStudent, StudentConfig
from diva.student.training.batches import Batch, EncoderOutputs, make_batch
from diva.student.training.data import epoch_samples


def load_lm_head(llm_dir: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The LLM's frozen output layer (eval only: next-token agreement and KL)."""
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype)
    return llm.get_output_embeddings().to(device).requires_grad_(False)


@torch.no_grad()
def evaluate(
    student: DiVAStudent, batches: list[Batch], student_cfg: StudentConfig, lm_head: nn.Module, h_t_mean: torch.Tensor
) -> dict[str, float]:
    """Held-out scores of the student, of the audio-blind control (each row fed another row's audio, scored against
    its own h_T: the report's seeded pairing `model.metrics.blind_partners` over all the held-out rows, never a row with
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
