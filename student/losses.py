"""The student's losses (METHOD.md section 1), computed in float32.

    L_distill = mean_b ||h_S - h_T||_2                             Euclidean norm, not squared
    L_align   = mean over (b, n) of ||v_{Q-N+n} - E(t_n)||_2      the LAST N of the Q audio tokens, n = 1..N
    L_kl      = KL(p_T || p_S) of the next-token distributions lm_head(h_T), lm_head(h_S)

and, with whole-answer targets (student.answer_weight > 0; K_b answer tokens of row b, target k where answer
token k is predicted, k = 0 the suffix's last position), averaged over the batch's (b, k) answer positions:
    l2        ||h_S,bk - h_T,bk||_2                                    Lemma 1 at every answer position
    kl        T^2 sum_j q_j (log q_j - log p_S,j) over the teacher's top-k tokens j, q = softmax(log p_T / T)
              renormalised over them, p_S = softmax(lm_head(h_S) / T) over the whole vocabulary
    ce        -log softmax(lm_head(h_S,bk))[a_bk]                      the teacher's answer as hard targets

The alignment needs N < Q (at least one free audio token). Rows with N >= Q follow StudentConfig.long_text
("skip" or "truncate", see there) and are counted in AlignStats, never silently misaligned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from diva.student.data import AnswerBatch
from diva.student.model import StudentConfig, StudentOutput


@dataclass
class AlignStats:
    """How the rows of one batch entered L_align."""

    rows: int = 0  # rows in the batch
    aligned: int = 0  # rows that contributed at least one (b, n) term
    skipped: int = 0  # N >= Q rows left out under the "skip" rule
    truncated: int = 0  # N >= Q rows cut to their last Q - 1 tokens under the "truncate" rule
    empty: int = 0  # rows with no transcript tokens (nothing to align)
    pairs: int = 0  # (b, n) terms averaged


@dataclass
class LossOutput:
    """The weighted total, each computed part (unweighted) and the alignment counts."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # "distill", "align", "kl" where computed
    align_stats: AlignStats | None = None


def distill_loss(h_s: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
    """mean_b ||h_S - h_T||_2 over (B, d) final hidden states."""
    return torch.linalg.vector_norm(h_s.float() - h_t.float(), dim=-1).mean()


def align_loss(
    audio_tokens: torch.Tensor, target_embeddings: list[torch.Tensor], rule: Literal["skip", "truncate"] = "skip"
) -> tuple[torch.Tensor, AlignStats]:
    """mean over (b, n) of ||v_{Q-N_b+n} - E(t_n)||_2: the last N_b of Q audio tokens (B, Q, d) against each row's
    transcript embeddings (N_b, d). Rows with N_b >= Q are skipped or truncated to their last Q - 1 tokens."""
    batch, num_queries = audio_tokens.shape[:2]
    if len(target_embeddings) != batch:
        raise ValueError(f"{len(target_embeddings)} target rows for a batch of {batch}")
    if rule not in ("skip", "truncate"):
        raise ValueError(f"unknown long-text rule {rule!r}; choose skip or truncate")
    stats = AlignStats(rows=batch)
    rows, slots, targets = [], [], []
    for b, target in enumerate(target_embeddings):
        n = target.shape[0]
        if n == 0:
            stats.empty += 1
            continue
        if n >= num_queries:
            if rule == "skip":
                stats.skipped += 1
                continue
            stats.truncated += 1
            target, n = target[n - (num_queries - 1) :], num_queries - 1  # keep the end: v_Q still meets t_N
        rows.append(torch.full((n,), b, dtype=torch.long))
        slots.append(torch.arange(num_queries - n, num_queries))  # 0-based v_{Q-N+1} .. v_Q
        targets.append(target)
        stats.aligned += 1
    if not targets:  # nothing to align: a zero that still connects to the graph
        return audio_tokens.float().sum() * 0.0, stats
    device = audio_tokens.device
    v = audio_tokens[torch.cat(rows).to(device), torch.cat(slots).to(device)]  # (P, d) P = sum of N_b
    e = torch.cat(targets).to(device)  # (P, d)
    stats.pairs = e.shape[0]
    return torch.linalg.vector_norm(v.float() - e.float(), dim=-1).mean(), stats


def kl_loss(h_s: torch.Tensor, h_t: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """KL(p_T || p_S) of the next-token distributions from the shared frozen lm_head, averaged over the batch."""
    weight_dtype = next(lm_head.parameters()).dtype
    log_p_s = F.log_softmax(lm_head(h_s.to(weight_dtype)).float(), dim=-1)  # (B, vocab)
    with torch.no_grad():
        log_p_t = F.log_softmax(lm_head(h_t.to(weight_dtype)).float(), dim=-1)  # (B, vocab)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")


def answer_l2(h_s: torch.Tensor, answers: AnswerBatch) -> torch.Tensor:
    """Mean over answer positions of ||h_S - h_T||_2: (B, K, d) against the cached (B, K, d), masked."""
    if answers.hidden is None:
        raise ValueError("answer_loss=l2 needs the teacher's hidden states along the answers (cache.answer_targets="
                         "hidden)")  # fmt: skip
    distance = torch.linalg.vector_norm(h_s.float() - answers.hidden.float(), dim=-1)  # (B, K)
    return distance[answers.mask].mean()


def answer_kl(h_s: torch.Tensor, answers: AnswerBatch, lm_head: nn.Module, temperature: float) -> torch.Tensor:
    """Sparse KL(teacher || student) over the teacher's top-k tokens at each answer position, at `temperature`,
    times temperature^2 (so gradients keep their scale as T changes), averaged over answer positions."""
    if answers.topk_ids is None or answers.topk_logprobs is None:
        raise ValueError("answer_loss=kl needs the teacher's top-k log-probs (cache.answer_targets=topk)")
    weight_dtype = next(lm_head.parameters()).dtype
    h = h_s[answers.mask]  # (P, d) P = the batch's answer positions
    log_p_s = F.log_softmax(lm_head(h.to(weight_dtype)).float() / temperature, dim=-1)  # (P, vocab)
    log_p_s = log_p_s.gather(-1, answers.topk_ids[answers.mask])  # (P, k)
    log_q = F.log_softmax(answers.topk_logprobs[answers.mask].float() / temperature, dim=-1)  # (P, k) renormalised
    return temperature**2 * (log_q.exp() * (log_q - log_p_s)).sum(-1).mean()


def answer_ce(h_s: torch.Tensor, answers: AnswerBatch, lm_head: nn.Module) -> torch.Tensor:
    """Cross-entropy of the student's next-token predictions on the teacher's answer ids, over answer positions."""
    weight_dtype = next(lm_head.parameters()).dtype
    logits = lm_head(h_s[answers.mask].to(weight_dtype)).float()  # (P, vocab)
    return F.cross_entropy(logits, answers.ids[answers.mask])


def answer_loss(out: StudentOutput, answers: AnswerBatch | None, cfg: StudentConfig, lm_head: nn.Module | None):
    """The whole-answer term named by cfg.answer_loss, over the answer positions of the batch."""
    if answers is None or out.answer_hidden is None:
        raise ValueError("answer_weight > 0 needs the teacher's answers (a cache built with cache.answer_tokens > 0)")
    if cfg.answer_loss == "l2":
        return answer_l2(out.answer_hidden, answers)
    if lm_head is None:
        raise ValueError(f"answer_loss={cfg.answer_loss} needs the LLM's lm_head (keep_lm_head=True)")
    if cfg.answer_loss == "kl":
        return answer_kl(out.answer_hidden, answers, lm_head, cfg.answer_temperature)
    return answer_ce(out.answer_hidden, answers, lm_head)


def combined_loss(
    out: StudentOutput,
    h_t: torch.Tensor,
    target_embeddings: list[torch.Tensor] | None,
    cfg: StudentConfig,
    lm_head: nn.Module | None = None,
    answers: AnswerBatch | None = None,
) -> LossOutput:
    """distill_weight * L_distill + align_weight * L_align + kl_weight * L_kl + answer_weight * L_answer; parts with
    weight 0 are not computed."""
    h_t = h_t.to(out.h_s.device)
    total = out.h_s.new_zeros((), dtype=torch.float32)
    result = LossOutput(total=total)
    if cfg.distill_weight > 0:
        result.parts["distill"] = distill_loss(out.h_s, h_t)
        total = total + cfg.distill_weight * result.parts["distill"]
    if cfg.align_weight > 0:
        if target_embeddings is None:
            raise ValueError("align_weight > 0 needs the transcripts' input embeddings E(t)")
        result.parts["align"], result.align_stats = align_loss(out.audio_tokens, target_embeddings, cfg.long_text)
        total = total + cfg.align_weight * result.parts["align"]
    if cfg.kl_weight > 0:
        if lm_head is None:
            raise ValueError("kl_weight > 0 needs the LLM's lm_head (build the student with keep_lm_head=True)")
        result.parts["kl"] = kl_loss(out.h_s, h_t, lm_head)
        total = total + cfg.kl_weight * result.parts["kl"]
    if cfg.answer_weight > 0:
        result.parts["answer"] = answer_loss(out, answers, cfg, lm_head)
        total = total + cfg.answer_weight * result.parts["answer"]
    result.total = total
    return result
