"""The transformers teacher: the light default and the reference in parity tests.

Besides h_T (`final_hidden`), it gives the whole-answer targets of `cache.answer_tokens`: the teacher's greedy
answers (`generate`, transformers' own `generate` on left-padded batches) and, teacher-forced along them
(`answer_targets`), the final hidden states or the top-k next-token log-probs at every answer position."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from diva.runtime import resolve_device, resolve_dtype


class HFTeacher:
    """Final hidden states from a transformers causal LM, in length-sorted, right-padded batches.

    With right padding and causal attention, pad positions come after every real token, so they never
    touch a real position's hidden state; h_T is read at each sequence's own last real position. With
    `reuse_prefix` (default) the tokens every row of a batch starts with (the prompt's constant prefix,
    `prefix_len` tokens when given) are run once: their keys/values serve every row (the student's
    `reuse_prefix_kv` does the same on the audio side).

    `batch_invariant` (the cache build's setting): a row's outputs must not depend on the rows it is batched with,
    so an incremental build's new rows equal a from-scratch build's. Padding and the batch's shared prefix do
    change the low bits (matmul and softmax shapes follow the batch's longest row), so batches then hold rows of
    one exact length only (no padding), the prefix split is `prefix_len` whatever the batch holds, and a lone row
    runs as two copies (a one-row matmul can take another kernel). That batch size alone changes nothing is
    checked, not guaranteed: tests/test_cache_reuse.py on the tiny model, float32 and bfloat16 on SmolLM2.
    """

    def __init__(
        self,
        model_dir: Path,
        dtype: str = "float32",
        batch_size: int = 32,
        device: str = "auto",
        reuse_prefix: bool = True,
        prefix_len: int | None = None,
        batch_invariant: bool = False,
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.causal_lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype).to(self.device).eval()
        self.model = self.causal_lm.get_decoder()  # the base model: h_T needs no lm_head
        self.hidden_size = int(self.causal_lm.config.get_text_config().hidden_size)
        self.pad_id = 0
        self.batch_size = batch_size
        self.reuse_prefix = reuse_prefix
        self.prefix_len = prefix_len
        self.batch_invariant = batch_invariant

    @torch.inference_mode()
    def _forward(self, batch: list[list[int]]) -> np.ndarray:
        shared = self._shared(batch) if self.reuse_prefix else 0
        if shared >= MIN_SHARED_PREFIX:
            return self._forward_after_prefix(batch, shared)
        input_ids, mask, lengths = self._right_padded(batch)
        hidden = self.model(
            input_ids=input_ids.to(self.device), attention_mask=mask.long().to(self.device)
        ).last_hidden_state  # (B, T, d), after the final norm
        last = hidden[torch.arange(len(batch)), (lengths - 1).to(self.device)]  # (B, d)
        return last.float().cpu().numpy()

    def _shared(self, batch: list[list[int]]) -> int:
        """Where the rows are split into the prefix run once and each row's rest. With `prefix_len` (the prompt's
        constant prefix) the split is the same whatever else is in the batch, so a row's h_T does not depend on
        its neighbours (an incremental build's new rows equal a from-scratch build's); without it, the tokens
        this batch's rows happen to share."""
        shared = common_prefix(batch)
        if self.prefix_len is None and not self.batch_invariant:
            return shared
        if self.prefix_len is None:
            return 0
        return self.prefix_len if shared >= self.prefix_len else 0

    def _forward_after_prefix(self, batch: list[list[int]], shared: int) -> np.ndarray:
        """h_T of rows that all start with the same `shared` tokens (the chat template's system turn and the user
        turn's opening): those tokens' keys/values are computed once, for one row, repeated over the batch, and
        only each row's rest (transcript and suffix, right-padded) runs on top of them."""
        prefix = torch.tensor([batch[0][:shared]], device=self.device)  # (1, P)
        cache = self.model(input_ids=prefix, use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(batch))
        rest = [ids[shared:] for ids in batch]
        input_ids, mask, lengths = self._right_padded(rest)
        full_mask = torch.cat([torch.ones(len(rest), shared, dtype=torch.bool), mask], dim=1)  # (B, P + T)
        positions = shared + torch.arange(input_ids.shape[1])[None, :].expand(len(rest), -1)  # (B, T)
        hidden = self.model(
            input_ids=input_ids.to(self.device), attention_mask=full_mask.long().to(self.device),
            position_ids=positions.to(self.device), past_key_values=cache, use_cache=True,
        ).last_hidden_state  # (B, T, d), after the final norm  # fmt: skip
        last = hidden[torch.arange(len(rest)), (lengths - 1).to(self.device)]  # (B, d)
        return last.float().cpu().numpy()

    def _right_padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token rows -> (ids (B, T) right-padded with pad_id, mask (B, T) True on real tokens, lengths (B,))."""
        lengths = torch.tensor([len(ids) for ids in rows])
        input_ids = torch.full((len(rows), int(lengths.max())), self.pad_id, dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
        return input_ids, torch.arange(input_ids.shape[1])[None, :] < lengths[:, None], lengths

    def final_hidden(self, batch: list[list[int]]) -> list[np.ndarray]:
        if any(len(ids) == 0 for ids in batch):
            raise ValueError("empty token sequence")
        out: list[np.ndarray | None] = [None] * len(batch)
        for chunk in self._batches(batch):
            for i, vector in zip(chunk, self._forward([batch[i] for i in chunk]), strict=True):
                out[i] = vector
        return out  # type: ignore[return-value]

    def _batches(self, batch: list[list[int]]) -> list[list[int]]:
        """Positions of `batch` in chunks of batch_size, shortest first (similar lengths pad little); with
        `batch_invariant`, chunks of one exact length, a lone row listed twice (see the class docstring)."""
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]))
        if not self.batch_invariant:
            return [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        chunks: list[list[int]] = []
        for _, group in itertools.groupby(order, key=lambda i: len(batch[i])):
            same = list(group)
            chunks += [same[start : start + self.batch_size] for start in range(0, len(same), self.batch_size)]
        return [chunk * 2 if len(chunk) == 1 else chunk for chunk in chunks]

    @torch.inference_mode()
    def generate(self, batch: list[list[int]], max_new_tokens: int, stop_ids: list[int]) -> list[list[int]]:
        """Each prompt's greedy answer: up to max_new_tokens ids, ending at (and keeping) the first stop id."""
        out: list[list[int]] = [[] for _ in batch]
        for chunk in self._batches(batch):
            width = max(len(batch[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)  # (B, T) left-padded
            mask = torch.zeros_like(input_ids)
            for row, i in enumerate(chunk):
                input_ids[row, width - len(batch[i]) :] = torch.tensor(batch[i])
                mask[row, width - len(batch[i]) :] = 1
            generated = self.causal_lm.generate(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), do_sample=False,
                max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids), pad_token_id=self.pad_id,
                num_beams=1, temperature=None, top_p=None, top_k=None,
            )[:, width:].tolist()  # fmt: skip
            for row, i in enumerate(chunk):
                out[i] = until_stop(generated[row], stop_ids)
        return out

    @torch.inference_mode()
    def answer_targets(
        self, prompts: list[list[int]], answers: list[list[int]], kind: str, topk: int = 0
    ) -> list[dict[str, np.ndarray]]:
        """Teacher-forced on prompt + answer[:-1]: at the K positions that predict answer tokens 0..K-1 (the
        prompt's last position first), the final hidden states {"hidden": (K, d)} or the top-k next-token
        log-probs {"topk_ids": (K, k) int32, "topk_logprobs": (K, k) float32}, per row, in input order."""
        if kind not in ("hidden", "topk"):
            raise ValueError(f"unknown answer target kind {kind!r}; choose hidden or topk")
        inputs = [[*p, *a[:-1]] for p, a in zip(prompts, answers, strict=True)]
        out: list[dict[str, np.ndarray]] = [{} for _ in inputs]
        for chunk in self._batches(inputs):
            input_ids, mask, _ = self._right_padded([inputs[i] for i in chunk])
            hidden = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.long().to(self.device)
                                ).last_hidden_state  # (B, T, d) after the final norm  # fmt: skip
            for row, i in enumerate(chunk):
                start, k = len(prompts[i]) - 1, len(answers[i])
                h = hidden[row, start : start + k]  # (K, d): position start + j predicts answer token j
                out[i] = {"hidden": h.float().cpu().numpy()} if kind == "hidden" else self._topk(h, topk)
        return out

    def _topk(self, h: torch.Tensor, k: int) -> dict[str, np.ndarray]:
        """The k largest next-token log-probs (float32 log-softmax over the whole vocabulary) at each row of h."""
        logprobs = torch.log_softmax(self.causal_lm.get_output_embeddings()(h).float(), dim=-1)  # (K, vocab)
        values, ids = logprobs.topk(k, dim=-1)  # (K, k), sorted largest first
        return {"topk_ids": ids.to(torch.int32).cpu().numpy(), "topk_logprobs": values.cpu().numpy()}

    def close(self) -> None:
        del self.model, self.causal_lm


MIN_SHARED_PREFIX = 4  # fewer shared tokens: the extra pass costs more than it saves


def common_prefix(batch: list[list[int]]) -> int:
    """How many leading tokens every row shares, leaving each row at least one token of its own (the one whose
    hidden state is read)."""
    limit = min(len(ids) for ids in batch) - 1
    first = batch[0]
    for k in range(max(0, limit)):
        if any(ids[k] != first[k] for ids in batch):
            return k
    return max(0, limit)


def until_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """The ids up to and including the first stop id (all of them when none stops)."""
    stops = set(stop_ids)
    for j, token in enumerate(ids):
        if token in stops:
            return ids[: j + 1]
    return ids
