"""Pick the device and compute dtype at run time: the build machines' CPUs differ.

On CPUs without native bf16 (AVX2-only, or AVX-512 without the BF16 extension) a bf16 matmul is
~80x slower than float32, so `auto` computes in float32 there and in bf16 only where the hardware
has it (CUDA GPUs with bf16, CPUs with AVX512-BF16 or AMX). Storing tensors as 16-bit on disk is fine
everywhere.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from diva.config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def isa_capped_below_bf16() -> bool:
    """True when the environment holds torch's or oneDNN's kernels below native bf16 (ATEN_CPU_CAPABILITY=avx2 or
    default; ONEDNN_MAX_CPU_ISA=AVX2, SSE41, AVX512_CORE, ... any ISA without BF16 or AMX): bf16 then runs on
    emulated paths, ~80x slower than float32."""
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    onednn_capped = onednn not in ("", "ALL", "DEFAULT") and not any(tag in onednn for tag in ("BF16", "AMX"))
    return aten in ("avx2", "default") or onednn_capped


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 matmuls natively (AVX512-BF16 or AMX-BF16) and the environment does not hold
    the math libraries to an older instruction set (`isa_capped_below_bf16`)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags()) and not isa_capped_below_bf16()


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu; otherwise torch's own parsing ("cpu", "cuda:1")."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{spec}' was asked for but torch sees no CUDA device")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """The compute dtype for `spec` (auto, float32, bfloat16, float16) on `device`."""
    if spec != "auto":
        if spec not in DTYPES:
            raise ConfigError(f"unknown dtype '{spec}'; choose auto, {', '.join(DTYPES)}")
        return DTYPES[spec]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


def describe_hardware() -> dict[str, str]:
    """A few facts recorded beside outputs (which hardware made them)."""
    device = resolve_device("auto")
    return {
        "device": str(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": str(cpu_has_native_bf16()),
        "auto_dtype": str(resolve_dtype("auto", device)).replace("torch.", ""),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
    }
