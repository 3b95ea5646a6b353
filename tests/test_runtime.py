from __future__ import annotations

import pytest
import torch

from diva import runtime


def test_explicit_dtype_is_respected() -> None:
    cpu = torch.device("cpu")
    assert runtime.resolve_dtype("float32", cpu) is torch.float32
    assert runtime.resolve_dtype("bfloat16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        runtime.resolve_dtype("fp8", cpu)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2"}, torch.float32),  # AVX2-only: bf16 is ~80x slower
        ({"avx2", "avx512f"}, torch.float32),  # AVX-512 without the BF16 extension
        ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),
        ({"avx2", "amx_bf16"}, torch.bfloat16),
    ],
)
def test_auto_dtype_on_cpu_follows_native_bf16(monkeypatch: pytest.MonkeyPatch, flags, expected) -> None:
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    assert runtime.resolve_dtype("auto", torch.device("cpu")) is expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"ATEN_CPU_CAPABILITY": "avx2"}, torch.float32),
        ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, torch.float32),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, torch.float32),  # AVX-512 without its BF16 instructions
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, torch.bfloat16),
        ({"ATEN_CPU_CAPABILITY": "avx512"}, torch.bfloat16),
        ({}, torch.bfloat16),
    ],
)
def test_an_isa_capped_below_bf16_computes_in_float32(monkeypatch: pytest.MonkeyPatch, env, expected) -> None:
    """On a bf16 CPU whose math libraries the environment holds to AVX2 (how this project emulates the slow
    machine), auto picks float32: bf16 would run on emulated kernels."""
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert runtime.resolve_dtype("auto", torch.device("cpu")) is expected


def test_device_auto_and_missing_cuda() -> None:
    assert runtime.resolve_device("cpu").type == "cpu"
    assert runtime.resolve_device("auto").type in {"cpu", "cuda"}
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            runtime.resolve_device("cuda")
