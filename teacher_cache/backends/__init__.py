"""Teacher backends behind one interface: `final_hidden(batch of token-id lists) -> [d] float32 arrays`,
the final hidden state (after the final norm, the lm_head input) at each sequence's last position; for caches
with whole-answer targets also `generate` (greedy answers) and `answer_targets` (teacher-forced along them)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from diva.config import ConfigError


class TeacherBackend(Protocol):
    """What the cache build needs from a teacher."""

    hidden_size: int

    def final_hidden(self, batch: list[list[int]]) -> list[np.ndarray]:
        """h_T for each token-id sequence, float32 arrays of shape (hidden_size,), in input order."""
        ...

    def generate(self, batch: list[list[int]], max_new_tokens: int, stop_ids: list[int]) -> list[list[int]]:
        """Greedy answers: up to max_new_tokens ids each, ending at (and keeping) the first stop id."""
        ...

    def answer_targets(
        self, prompts: list[list[int]], answers: list[list[int]], kind: str, topk: int = 0
    ) -> list[dict[str, np.ndarray]]:
        """Per row, teacher-forced on prompt + answer[:-1], at the K positions predicting answer tokens 0..K-1:
        {"hidden": (K, d) float32} or {"topk_ids": (K, k) int32, "topk_logprobs": (K, k) float32}."""
        ...

    def close(self) -> None: ...


def open_backend(
    name: str,
    model_dir: Path,
    dtype: str = "float32",
    batch_size: int = 32,
    shared_prefix: int | None = None,
    **kwargs,
) -> TeacherBackend:
    """The teacher backend `name` (hf, vllm, or naive: hf one sequence at a time). `shared_prefix`: how many
    leading tokens every prompt shares (the prompt's constant prefix), given by the cache build: hf then runs
    them once per batch and batches so that a row's outputs do not depend on its neighbours (`batch_invariant`);
    vLLM finds shared prefixes by itself (automatic prefix caching)."""
    if name in ("hf", "naive"):
        from diva.teacher_cache.backends.hf import HFTeacher

        naive = name == "naive"  # the reference: one utterance at a time, every token of it
        kwargs.setdefault("reuse_prefix", not naive)
        kwargs.setdefault("prefix_len", shared_prefix)
        kwargs.setdefault("batch_invariant", shared_prefix is not None and not naive)  # naive: one row a batch
        return HFTeacher(model_dir, dtype=dtype, batch_size=1 if naive else batch_size, **kwargs)
    if name == "vllm":
        from diva.teacher_cache.backends.vllm import VLLMTeacher

        return VLLMTeacher(model_dir, dtype=dtype, **kwargs)
    raise ConfigError(f"unknown teacher backend '{name}'; choose hf, vllm or naive")
