"""The transformers teacher: the light default and the reference in parity tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diva.runtime import resolve_device, resolve_dtype


class HFTeacher:
    """Final hidden states from a transformers causal LM, in length-sorted, right-padded batches.

    With right padding and causal attention, pad positions come after every real token, so they never
    touch a real position's hidden state; h_T is read at each sequence's own last real position.
    """

    def __init__(self, model_dir: Path, dtype: str = "float32", batch_size: int = 32, device: str = "auto") -> None:
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype)
        self.model = model.get_decoder().to(self.device).eval()  # the base model: no lm_head needed
        self.hidden_size = int(model.config.get_text_config().hidden_size)
        self.pad_id = 0
        self.batch_size = batch_size

    @torch.inference_mode()
    def _forward(self, batch: list[list[int]]) -> np.ndarray:
        lengths = torch.tensor([len(ids) for ids in batch])
        input_ids = torch.full((len(batch), int(lengths.max())), self.pad_id, dtype=torch.long)  # (B, T)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
        mask = torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]  # (B, T), True on real tokens
        hidden = self.model(
            input_ids=input_ids.to(self.device), attention_mask=mask.long().to(self.device)
        ).last_hidden_state  # (B, T, d), after the final norm
        last = hidden[torch.arange(len(batch)), (lengths - 1).to(self.device)]  # (B, d)
        return last.float().cpu().numpy()

    def final_hidden(self, batch: list[list[int]]) -> list[np.ndarray]:
        if any(len(ids) == 0 for ids in batch):
            raise ValueError("empty token sequence")
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]))  # similar lengths pad little
        out: list[np.ndarray | None] = [None] * len(batch)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, vector in zip(chunk, self._forward([batch[i] for i in chunk]), strict=True):
                out[i] = vector
        return out  # type: ignore[return-value]

    def close(self) -> None:
        del self.model
