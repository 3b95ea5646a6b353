"""The student's losses (METHOD.md section 1), computed in float32.

    L_distill = mean_b ||h_S - h_T||_2                             Euclidean norm, not squared
    L_align   = mean over (b, n) of ||v_{Q-N+n} - E(t_n)||_2      the LAST N of the Q audio tokens, n = 1..N
                (student.align_slots first: v_n instead; student.align_loss ce: -log softmax(v E^T)[t_n], the
                input-embedding table as a classifier over the vocabulary; l2+ce: both)
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

from diva.student.model.network import StudentConfig, StudentOutput


@dataclass
class AnswerBatch:
    """The teacher's answers of one batch, right-padded to the longest (K), and what the cache stores along them:
    target k of a row is where its answer token k is predicted (k = 0: the suffix's last position)."""

    ids: torch.Tensor  # (B, K) long, answer ids, 0 past each row's length
    mask: torch.Tensor  # (B, K) bool, True on each row's own answer tokens
    hidden: torch.Tensor | None = None  # (B, K, d_llm) float32 teacher final hidden states (answer_targets=hidden)
    topk_ids: torch.Tensor | None = None  # (B, K, k) long: the teacher's k likeliest next tokens (topk)
    topk_logprobs: torch.Tensor | None = None  # (B, K, k) float32: their log-probs

    def to(self, device: torch.device) -> AnswerBatch:
        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device)

        return AnswerBatch(self.ids.to(device), self.mask.to(device), move(self.hidden), move(self.topk_ids),
                           move(self.topk_logprobs))  # fmt: skip


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


def align_pairs(
    num_queries: int, lengths: list[int], rule: Literal["skip", "truncate"] = "skip", layout: str = "last"
) -> tuple[list[tuple[int, int, int]], torch.Tensor, AlignStats]:
    """Which audio token meets which transcript token: [(row b, first kept token, past the last kept token)] and the
    0-based slots (P,) in the same order. `layout` "last": the last N_b of Q slots (the paper); "first": the first N_b.
    Rows with N_b >= Q are skipped or truncated to Q - 1 tokens (the end under "last", so v_Q still meets t_N; the
    start under "first"), and counted."""
    if rule not in ("skip", "truncate"):
        raise ValueError(f"unknown long-text rule {rule!r}; choose skip or truncate")
    if layout not in ("last", "first"):
        raise ValueError(f"unknown alignment slots {layout!r}; choose last or first")
    stats = AlignStats(rows=len(lengths))
    kept, slots = [], []
    for b, n in enumerate(lengths):
        if n == 0:
            stats.empty += 1
            continue
        start, stop = 0, n
        if n >= num_queries:
            if rule == "skip":
                stats.skipped += 1
                continue
            stats.truncated += 1
            start, stop = (n - (num_queries - 1), n) if layout == "last" else (0, num_queries - 1)
        width = stop - start
        kept.append((b, start, stop))
        slots.append(torch.arange(num_queries - width, num_queries) if layout == "last" else torch.arange(width))
        stats.aligned += 1
    stats.pairs = sum(stop - start for _, start, stop in kept)
    return kept, torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long), stats


def align_loss(
    audio_tokens: torch.Tensor,
    target_embeddings: list[torch.Tensor],
    rule: Literal["skip", "truncate"] = "skip",
    layout: str = "last",
    kind: str = "l2",
    target_ids: list[torch.Tensor] | None = None,
    table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, AlignStats]:
    """The alignment of the audio tokens v (B, Q, d) to each row's transcript (`align_pairs`: which slots), averaged
    over the (b, n) pairs. kind "l2": ||v - E(t_n)||_2 against the transcript embeddings (N_b, d) (the paper); "ce":
    cross-entropy of v E^T over the vocabulary against t_n (the frozen input-embedding table (V, d) as the
    classifier: which token, not only near which tokens; needs `target_ids` and `table`); "l2+ce": their sum."""
    batch, num_queries = audio_tokens.shape[:2]
    if len(target_embeddings) != batch:
        raise ValueError(f"{len(target_embeddings)} target rows for a batch of {batch}")
    if kind not in ("l2", "ce", "l2+ce"):
        raise ValueError(f"unknown alignment loss {kind!r}; choose l2, ce or l2+ce")
    kept, slots, stats = align_pairs(num_queries, [t.shape[0] for t in target_embeddings], rule, layout)
    if not kept:  # nothing to align: a zero that still connects to the graph
        return audio_tokens.float().sum() * 0.0, stats
    device = audio_tokens.device
    rows = torch.cat([torch.full((stop - start,), b, dtype=torch.long) for b, start, stop in kept])
    v = audio_tokens[rows.to(device), slots.to(device)]  # (P, d) P = sum of the aligned N_b
    loss = v.float().sum() * 0.0
    if kind in ("l2", "l2+ce"):
        e = torch.cat([target_embeddings[b][start:stop] for b, start, stop in kept]).to(device)  # (P, d)
        loss = loss + torch.linalg.vector_norm(v.float() - e.float(), dim=-1).mean()
    if kind in ("ce", "l2+ce"):
        if target_ids is None or table is None:
            raise ValueError("the cross-entropy alignment needs the transcripts' ids and the input-embedding table")
        ids = torch.cat([torch.as_tensor(target_ids[b])[start:stop] for b, start, stop in kept]).to(device)  # (P,)
        logits = F.linear(v.to(table.dtype), table).float()  # (P, vocab): v E^T
        loss = loss + F.cross_entropy(logits, ids.long())
    return loss, stats


@torch.no_grad()
def align_accuracy(
    audio_tokens: torch.Tensor, target_ids: list[torch.Tensor], table: torch.Tensor, rule: str = "skip",
    layout: str = "last",
) -> tuple[int, int]:
    """(correct, pairs): how many aligned slots' best-scoring vocabulary token (argmax v E^T) is the transcript's
    token t_n, over the slots `align_pairs` aligns: whether the audio tokens carry the words."""
    kept, slots, _ = align_pairs(audio_tokens.shape[1], [len(t) for t in target_ids], rule, layout)  # type: ignore[arg-type]
    if not kept:
        return 0, 0
    device = audio_tokens.device
    rows = torch.cat([torch.full((stop - start,), b, dtype=torch.long) for b, start, stop in kept]).to(device)
    ids = torch.cat([torch.as_tensor(target_ids[b])[start:stop] for b, start, stop in kept]).to(device)
    best = F.linear(audio_tokens[rows, slots.to(device)].to(table.dtype), table).argmax(-1)  # (P,)
    return int((best == ids).sum()), int(ids.numel())


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
    target_ids: list[torch.Tensor] | None = None,
    table: torch.Tensor | None = None,
) -> LossOutput:
    """distill_weight * L_distill + align_weight * L_align + kl_weight * L_kl + answer_weight * L_answer; parts with
    weight 0 are not computed. `target_ids` and `table` (the transcripts' ids, the LLM's input-embedding table) feed
    the cross-entropy alignment (student.align_loss ce or l2+ce)."""
    h_t = h_t.to(out.h_s.device)
    total = out.h_s.new_zeros((), dtype=torch.float32)
    result = LossOutput(total=total)
    if cfg.distill_weight > 0:
        result.parts["distill"] = distill_loss(out.h_s, h_t)
        total = total + cfg.distill_weight * result.parts["distill"]
    if cfg.align_weight > 0:
        if target_embeddings is None:
            raise ValueError("align_weight > 0 needs the transcripts' input embeddings E(t)")
        result.parts["align"], result.align_stats = align_loss(out.audio_tokens, target_embeddings, cfg.long_text,
                                                               cfg.align_slots, cfg.align_loss, target_ids, table)
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
