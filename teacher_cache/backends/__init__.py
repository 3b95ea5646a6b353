"""Teacher backends behind one interface: `final_hidden(batch of token-id lists) -> [d] float32 arrays`,
the final hidden state (after the final norm, the lm_head input) at each sequence's last position."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np


class TeacherBackend(Protocol):
    """What the cache build needs from a teacher."""

    hidden_size: int

    def final_hidden(self, batch: list[list[int]]) -> list[np.ndarray]:
        """h_T for each token-id sequence, float32 arrays of shape (hidden_size,), in input order."""
        ...

    def close(self) -> None: ...


def open_backend(name: str, model_dir: Path, dtype: str = "float32", batch_size: int = 32, **kwargs) -> TeacherBackend:
    """The teacher backend `name` (hf, vllm, or naive: hf one sequence at a time)."""
    if name in ("hf", "naive"):
        from diva.teacher_cache.backends.hf import HFTeacher

        return HFTeacher(model_dir, dtype=dtype, batch_size=1 if name == "naive" else batch_size, **kwargs)
    if name == "vllm":
        from diva.teacher_cache.backends.vllm import VLLMTeacher

        return VLLMTeacher(model_dir, dtype=dtype, **kwargs)
    raise ValueError(f"unknown teacher backend '{name}'; choose hf, vllm or naive")
