"""What every benchmark script writes: `results/<name>.json` (with a `summary` list of headline ratios that
`summary.py` gathers into SUMMARY.md) and `results/<name>.md`, and the machine it ran on."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from diva.runtime import describe_hardware

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    """The hardware and the load at the start (the build machines are shared: a high load means contention)."""
    return {
        **describe_hardware(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }


def headline(benchmark: str, measured: str, reference: str, ratio: float | None) -> dict[str, Any]:
    """One SUMMARY.md row: what was measured, against what, and measured / reference (higher is better unless
    the benchmark's name says otherwise)."""
    return {
        "benchmark": benchmark,
        "measured": measured,
        "reference": reference,
        "ratio": None if ratio is None else round(ratio, 3),
    }


def md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def write_results(name: str, report: dict[str, Any], markdown: list[str], out: Path = RESULTS) -> None:
    """results/<name>.json and results/<name>.md, each written under a temporary name and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    for path, text in (
        (out / f"{name}.json", json.dumps(report, indent=2) + "\n"),
        (out / f"{name}.md", "\n".join(markdown) + "\n"),
    ):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print("\n".join(markdown), flush=True)
