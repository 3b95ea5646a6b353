"""How close a student's final hidden states are to the teacher's: the one set of scores that the trainer's
held-out evaluation (sums over a batch, `prediction_scores`) and `diva eval` / `diva report` (per row,
`hidden_scores`) both report, so the two never disagree on what a metric means.

    cosine       cosine(h, h_T)
    top1_agree   1 when the lm_head's argmax of h equals that of h_T (the next token)
    kl           KL(p_T || p_h) of the next-token distributions through the frozen lm_head
    distill      ||h - h_T||_2 (L_distill)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def hidden_scores(h: torch.Tensor, h_t: torch.Tensor, lm_head: nn.Module) -> dict[str, list[float]]:
    """Per row: cosine(h, h_T), next-token top-1 agreement, KL(p_T || p_h) and ||h - h_T|| ((B, d) each)."""
    dtype = next(lm_head.parameters()).dtype
    logits, logits_t = lm_head(h.to(dtype)), lm_head(h_t.to(dtype))  # (B, vocab) each
    log_p, log_p_t = F.log_softmax(logits.float(), dim=-1), F.log_softmax(logits_t.float(), dim=-1)
    kl = F.kl_div(log_p, log_p_t, log_target=True, reduction="none").sum(-1)  # (B,)
    return {
        "cosine": F.cosine_similarity(h.float(), h_t.float(), dim=-1).tolist(),
        "top1_agree": (logits.argmax(-1) == logits_t.argmax(-1)).float().tolist(),
        "kl": kl.tolist(),
        "distill": torch.linalg.vector_norm(h.float() - h_t.float(), dim=-1).tolist(),
    }


def prediction_scores(h: torch.Tensor, h_t: torch.Tensor, lm_head: nn.Module, prefix: str = "") -> dict[str, float]:
    """The sums over rows of `hidden_scores`, keys prefixed by `prefix` (the trainer adds batches, then divides)."""
    return {f"{prefix}{key}": float(sum(values)) for key, values in hidden_scores(h, h_t, lm_head).items()}


def blind_partners(n: int, seed: int = 0) -> list[int]:
    """A seeded random pairing of n rows with no row paired with itself (Sattolo's algorithm: one random cycle
    through all the rows): row i is fed row partner[i]'s audio in the audio-blind control, in the report and in
    the trainer's held-out evaluation alike. Needs n >= 2 (one row has no other row to borrow from)."""
    if n < 2:
        raise ValueError(f"the audio-blind control pairs each row with another row; {n} row(s) cannot be paired")
    partner = list(range(n))
    rng = np.random.default_rng(seed)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i: i never keeps its own place
        partner[i], partner[j] = partner[j], partner[i]
    return partner
