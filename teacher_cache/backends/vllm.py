"""The vLLM teacher: h_T from vLLM's pooling runner; greedy answers and the targets along them (top-k
next-token log-probs, or final hidden states at every answer position) for caches with cache.answer_tokens.

vLLM serves one pooling task per engine, so the teacher opens up to two engines, each lazily on first use:
- a pooling engine (`runner="pooling"`, `convert="embed"`, no activation: the default L2-normalises) for
  final hidden states (after the final norm, the lm_head input; the same h_T as the transformers backend).
  LAST pooling returns the last position only (h_T alone: all a DiVA cache needs); ALL pooling returns every
  position, which the hidden answer targets need, and then serves h_T too (the row at the last position).
  The first hidden-target request swaps a LAST engine for an ALL one (one extra start per backend; a caller
  that knows it will ask for them passes `all_positions=True` to start with ALL);
- a generate engine (`runner="generate"`) for the greedy answers and, teacher-forced through its prompt
  log-probs, the top-k targets.
So a build opens one engine for h_T alone, two with answers (three starts with hidden targets unless
all_positions). The inputs are token ids (`TokensPrompt`) built with the chat template, so nothing is
tokenised or BOS-prefixed twice; vLLM batches by itself.

Device memory: on CPU each engine's KV cache is VLLM_CPU_KVCACHE_SPACE GiB (set here to 1 unless set). On a
GPU, `gpu_memory_utilization` is the budget of this teacher's engines together (vLLM's own is per engine): a
pooling engine only prefills, so it gets a fixed KV cache (POOLING_KV_CACHE_GIB) and holds little beyond its
weights; the generate engine gets the rest of the budget, measured as it opens (so open it after the pooling
engine, as the cache build does: h_T comes before the answers).

vLLM starts its engines in separate processes that re-import the main module: a script that builds a
`VLLMTeacher` must guard its entry point with `if __name__ == "__main__":` (the `diva` command does).
"""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diva.config import ConfigError
from diva.runtime import resolve_dtype

log = logging.getLogger(__name__)

INSTALL_HINT = "install it with `make install-vllm` (CPU) or `pip install diva-distill[vllm]` (GPU)"
CPU_KV_CACHE_GIB = "1"  # vLLM's CPU default reserves several GiB; h_T needs no long-lived KV cache
GPU_MEMORY_BUDGET = 0.9  # of the device, for all of this teacher's engines together
POOLING_KV_CACHE_GIB = 4  # on GPUs: a pooling engine never decodes; its KV cache holds one scheduler step
MAX_TOPK = 1024  # the generate engine's max_logprobs (vLLM's default, 20, is below cache.answer_topk's 32)


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
        raise ConfigError(
            f"runtime.device '{device}' was asked for, but the installed vLLM build runs on {platform.type}; "
            f"use runtime.device=auto or {platform.type}, or the hf backend"
        )
    if wanted.index not in (None, 0):
        raise ConfigError(
            f"the vllm backend runs on the first visible {platform.type} device; to use '{device}', "
            f"set CUDA_VISIBLE_DEVICES={wanted.index} and runtime.device={platform.type}"
        )
    return platform


def _shutdown(llm: Any) -> None:
    """Stop one engine: join its engine-core process (idempotent); the caller drops the last reference."""
    llm.llm_engine.engine_core.shutdown()


def memory_share(pooling: bool, budget: float, used: float) -> dict[str, Any]:
    """The vllm.LLM memory arguments of one engine on a GPU: `budget` is the fraction of the device this teacher's
    engines may hold together, `used` the fraction in use as the engine opens (ours and anything else)."""
    if pooling:  # a fixed KV cache; the utilisation only has to pass vLLM's free-memory check at start
        return {"kv_cache_memory_bytes": POOLING_KV_CACHE_GIB << 30,
                "gpu_memory_utilization": max(min(budget, 0.95 * (1 - used)), 0.01)}  # fmt: skip
    if budget - used <= 0.05:
        raise RuntimeError(
            f"no device memory left for the vllm generate engine: {used:.0%} of the device is in use and the "
            f"teacher's budget is gpu_memory_utilization={budget}; raise it or free the device"
        )
    return {"gpu_memory_utilization": budget - used}


class VLLMTeacher:
    """The teacher backend on vLLM, for GPUs or the vllm-cpu build; engines open on first use.

    `batch_size` is accepted for the common backend interface and ignored (vLLM schedules its own
    batches); `all_positions=True` starts the pooling engine with ALL pooling (for hidden answer targets);
    other keyword arguments go to every `vllm.LLM` unchanged, except `gpu_memory_utilization`: the budget
    of all engines together, split between them (see the module docstring).
    """

    def __init__(
        self,
        model_dir: Path,
        dtype: str = "float32",
        device: str = "auto",
        max_model_len: int = 2048,
        batch_size: int | None = None,
        all_positions: bool = False,
        **kwargs: Any,
    ) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)  # read by vLLM and its engine processes
        self._vllm = _import_vllm()
        from transformers import AutoConfig

        self.model_dir = Path(model_dir)
        self.device = _platform_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        config = AutoConfig.from_pretrained(model_dir).get_text_config()
        model_limit = getattr(config, "max_position_embeddings", None)  # the teacher's own position limit
        self.max_model_len = min(max_model_len, model_limit) if model_limit else max_model_len
        self.hidden_size = int(config.hidden_size)
        self.all_positions = all_positions
        self.memory_budget = float(kwargs.pop("gpu_memory_utilization", GPU_MEMORY_BUDGET))
        self._llm_kwargs = kwargs
        self._pooler: Any = None  # the pooling engine, LAST or (self._pooler_all) ALL pooling
        self._pooler_all = False
        self._generator: Any = None
        self.engine_starts: list[tuple[str, float]] = []  # (engine, seconds to start), in opening order

    # -- engines -------------------------------------------------------------------------------------------

    def _open(self, role: str, **engine_kwargs: Any) -> Any:
        """Start one vllm.LLM for `role` (pooling-last, pooling-all or generate) on the model, timed."""
        start = time.perf_counter()
        llm = self._vllm.LLM(
            model=str(self.model_dir),
            dtype=str(self.dtype).removeprefix("torch."),
            enforce_eager=True,
            max_model_len=self.max_model_len,
            **{**self._memory_kwargs(pooling=role != "generate"), **self._llm_kwargs, **engine_kwargs},
        )
        self.engine_starts.append((role, round(time.perf_counter() - start, 2)))
        log.info("vllm %s engine started in %.1f s", role, self.engine_starts[-1][1])
        return llm

    def _memory_kwargs(self, pooling: bool) -> dict[str, Any]:
        """This engine's share of the device memory budget (nothing on CPU: VLLM_CPU_KVCACHE_SPACE sizes it)."""
        if self.device.type == "cpu" or "kv_cache_memory_bytes" in self._llm_kwargs:
            return {}
        used = 0.0
        if self._pooler is not None or self._generator is not None:  # (measuring initialises the device here)
            free, total = torch.accelerator.get_memory_info(0)
            used = 1 - free / total
        return memory_share(pooling, self.memory_budget, used)

    def _pooling_engine(self, all_positions: bool) -> Any:
        """The pooling engine, ALL pooling when asked for (a LAST one is swapped for it, then kept)."""
        if self._pooler is not None and (self._pooler_all or not all_positions):
            return self._pooler
        from vllm.config import PoolerConfig

        if self._pooler is not None:  # LAST open, ALL wanted: replace it (ALL serves h_T as well)
            log.info("vllm: swapping the LAST-pooling engine for an ALL-pooling one (hidden answer targets)")
            llm, self._pooler = self._pooler, None
            _shutdown(llm)
            del llm
            gc.collect()
        all_positions = all_positions or self.all_positions
        pooler = (PoolerConfig(task="token_embed", tok_pooling_type="ALL", use_activation=False) if all_positions
                  else PoolerConfig(task="embed", seq_pooling_type="LAST", use_activation=False))  # fmt: skip
        self._pooler = self._open(
            "pooling-all" if all_positions else "pooling-last", runner="pooling", convert="embed",
            pooler_config=pooler,  # no activation: the raw final hidden states (the default L2-normalises)
        )  # fmt: skip
        self._pooler_all = all_positions
        return self._pooler

    def _generate_engine(self) -> Any:
        if self._generator is None:
            self._generator = self._open("generate", runner="generate", max_logprobs=MAX_TOPK)
        return self._generator

    @property
    def prefix_caching(self) -> dict[str, bool]:
        """Whether each open engine runs with automatic prefix caching (vLLM's default for LAST pooling and
        generation; requests that need every prompt position, ALL pooling and prompt log-probs, skip reading it)."""
        engines = {"pooling-all" if self._pooler_all else "pooling-last": self._pooler, "generate": self._generator}
        return {role: bool(llm.llm_engine.vllm_config.cache_config.enable_prefix_caching)
                for role, llm in engines.items() if llm is not None}  # fmt: skip

    # -- the backend interface -----------------------------------------------------------------------------

    def _check_lengths(self, batch: list[list[int]], extra: int = 0, what: str = "sequence") -> None:
        for i, ids in enumerate(batch):
            if not ids:
                raise ValueError(f"empty token sequence at batch position {i}")
            if len(ids) + extra > self.max_model_len:
                raise ConfigError(
                    f"{what} {i} needs {len(ids) + extra} positions, more than the vllm backend's max_model_len "
                    f"{self.max_model_len}"
                )

    def _encode(self, batch: list[list[int]], all_positions: bool) -> list[torch.Tensor]:
        """The pooling engine's outputs, in input order: (d,) per sequence, or (T, d) with all_positions."""
        llm = self._pooling_engine(all_positions)
        outputs = llm.encode(
            [self._vllm.TokensPrompt(prompt_token_ids=list(ids)) for ids in batch],
            pooling_task="token_embed" if self._pooler_all else "embed",
            pooling_params=self._vllm.PoolingParams(use_activation=False),
            use_tqdm=False,
        )  # in input order
        data = [out.outputs.data.float().cpu() for out in outputs]
        return [x[-1] for x in data] if self._pooler_all and not all_positions else data

    def final_hidden(self, batch: list[list[int]]) -> list[np.ndarray]:
        """h_T for each token-id sequence: float32 arrays of shape (hidden_size,), in input order."""
        self._check_lengths(batch)
        hidden = [x.numpy() for x in self._encode(batch, all_positions=False)]
        for vector in hidden:
            assert vector.shape == (self.hidden_size,), (vector.shape, self.hidden_size)
        return hidden

    def generate(self, batch: list[list[int]], max_new_tokens: int, stop_ids: list[int]) -> list[list[int]]:
        """Each prompt's greedy answer: up to max_new_tokens ids, ending at (and keeping) the first stop id."""
        from diva.teacher_cache.backends.hf import until_stop

        self._check_lengths(batch, extra=max_new_tokens, what="prompt + answer")
        params = self._vllm.SamplingParams(
            temperature=0.0,  # greedy: the argmax of the raw logits (no penalties, no min_tokens)
            max_tokens=max_new_tokens,
            stop_token_ids=list(stop_ids),  # the stop id ends the output and stays in its token ids
            # Stop at stop_ids only, as the hf backend does: otherwise vLLM also stops at the tokenizer's eos
            # and the model's generation_config eos ids. It changes no logit (min_tokens stays 0).
            ignore_eos=True,
            detokenize=False,
        )
        outputs = self._generate_engine().generate(
            [self._vllm.TokensPrompt(prompt_token_ids=list(ids)) for ids in batch], params, use_tqdm=False
        )  # in input order
        return [until_stop(list(out.outputs[0].token_ids), stop_ids) for out in outputs]

    def answer_targets(
        self, prompts: list[list[int]], answers: list[list[int]], kind: str, topk: int = 0
    ) -> list[dict[str, np.ndarray]]:
        """Teacher-forced on prompt + answer[:-1]: at the K positions that predict answer tokens 0..K-1 (the
        prompt's last position first), the final hidden states {"hidden": (K, d)} or the top-k next-token
        log-probs {"topk_ids": (K, k) int32, "topk_logprobs": (K, k) float32}, per row, in input order."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        if kind == "hidden":
            return self._hidden_targets(prompts, answers)
        if kind == "topk":
            if not 1 <= topk <= MAX_TOPK:
                raise ValueError(f"topk must be in 1..{MAX_TOPK} with the vllm backend, got {topk}")
            return self._topk_targets(prompts, answers, topk)
        raise ValueError(f"unknown answer target kind {kind!r}; choose hidden or topk")

    def _hidden_targets(self, prompts: list[list[int]], answers: list[list[int]]) -> list[dict[str, np.ndarray]]:
        """ALL pooling over prompt + answer[:-1]: its last K rows are positions len(prompt)-1 .. +K-1."""
        inputs = [[*p, *a[:-1]] for p, a in zip(prompts, answers, strict=True)]
        self._check_lengths(inputs, what="prompt + answer[:-1]")
        out = []
        for prompt, answer, h in zip(prompts, answers, self._encode(inputs, all_positions=True), strict=True):
            assert h.shape == (len(prompt) + max(len(answer), 1) - 1, self.hidden_size), h.shape  # (T, d)
            start = len(prompt) - 1  # the prompt's last position predicts answer token 0
            out.append({"hidden": h[start : start + len(answer)].numpy()})  # (K, d)
        return out

    def _topk_targets(self, prompts: list[list[int]], answers: list[list[int]], k: int) -> list[dict[str, np.ndarray]]:
        """Prompt log-probs over prompt + answer: entry len(prompt) + j scores answer token j (from the logits
        at the position before it), with its k best tokens (and the answer token itself when outside them)."""
        inputs = [[*p, *a] for p, a in zip(prompts, answers, strict=True)]
        self._check_lengths(inputs, extra=1, what="prompt + answer")  # max_tokens=1: one token is generated
        params = self._vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=k, detokenize=False)
        outputs = self._generate_engine().generate(
            [self._vllm.TokensPrompt(prompt_token_ids=ids) for ids in inputs], params, use_tqdm=False
        )  # in input order; logprobs_mode raw_logprobs: log-softmax of the raw logits over the whole vocabulary
        out = []
        for prompt, answer, result in zip(prompts, answers, outputs, strict=True):
            ids = np.zeros((len(answer), k), dtype=np.int32)  # (K, k)
            logprobs = np.zeros((len(answer), k), dtype=np.float32)  # (K, k)
            for j in range(len(answer)):
                entry = result.prompt_logprobs[len(prompt) + j]  # {token id: Logprob}, k or k+1 of them
                best = sorted(entry.items(), key=lambda item: (-item[1].logprob, item[1].rank))[:k]
                assert len(best) == k, (len(best), k)
                ids[j] = [token for token, _ in best]
                logprobs[j] = [lp.logprob for _, lp in best]
            out.append({"topk_ids": ids, "topk_logprobs": logprobs})
        return out

    def close(self) -> None:
        """Stop every engine opened (their processes and memory) and tear down vLLM's distributed state; safe
        to repeat."""
        engines = [llm for llm in (self._pooler, self._generator) if llm is not None]
        self._pooler = self._generator = None
        if not engines:
            return
        while engines:
            _shutdown(engines.pop())
        gc.collect()
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()  # frees cached device memory on GPUs
