"""The paper's ablations at small scale: shorter runs of one preset that differ in one choice, one table.

    for each variant (both losses | distill only | align only | Q-Former without Whisper init | MLP adapter):
        train(preset + overrides + the variant's overrides, steps)  -> OUT/<variant>/   (resumable, skipped when done)
        report.build_report(held-out manifest, systems student + blind) -> OUT/<variant>/report.json (cached)
    -> OUT/ablations.md and ablations.json: the student's metrics per variant, beside its audio-blind control

Every variant starts from the same seed and sees the same batches in the same order (the data order is a function
of the seed), so the table isolates the one choice. The paper (Held et al. 2024, table 4) found both losses
needed: distillation alone or alignment alone, a randomly initialised Q-Former, or a pooled MLP adapter all
answer worse.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diva.student.evaluate import COLUMNS


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: tuple[str, ...]


VARIANTS = {
    "both_losses": Variant("both losses (DiVA)", ()),
    "distill_only": Variant("distillation only", ("student.align_weight=0",)),
    "align_only": Variant("alignment only", ("student.distill_weight=0",)),
    "qformer_random": Variant("Q-Former, random init", ("student.adapter=qformer_random",)),
    "mlp": Variant("MLP adapter (pooled frames)", ("student.adapter=mlp",)),
}
SYSTEMS = ("student", "blind")


def render_table(rows: dict[str, dict[str, Any]]) -> str:
    """One markdown table: the student's metrics per variant and its blind control's top-1 agreement."""
    header = ["variant", *COLUMNS.values(), "blind top-1", "held-out L_distill", "beats blind on all"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, row in rows.items():
        student, blind = row["systems"]["student"], row["systems"]["blind"]
        cells = [VARIANTS[key].label, *(f"{student[k]:.3f}" for k in COLUMNS), f"{blind['top1_agree']:.3f}",
                 f"{row['distill']:.3f}" if row.get("distill") is not None else "n/a",
                 "yes" if row["beats_blind"] else "no"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def last_eval_distill(run_dir: Path) -> float | None:
    """The held-out L_distill of the run's last evaluation on its eval cache (metrics.jsonl), if any."""
    from diva.student.report import read_curves

    _, evals = read_curves(run_dir)
    return evals[-1]["distill"] if evals else None


def run_ablations(
    config: str,
    train_cache: Path,
    eval_cache: Path | None,
    manifest: Path,
    out_dir: Path,
    steps: int,
    overrides: Sequence[str] = (),
    variants: Sequence[str] = tuple(VARIANTS),
    limit: int = 32,
    max_new_tokens: int = 32,
    device: str = "auto",
    on_variant: Callable[[str, str], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Train and score every variant (see the module docstring); returns OUT/ablations.md and the table's data."""
    from diva.config import load_config
    from diva.student.report import build_report
    from diva.student.train import train
    from diva.zoo.resolve import resolve_model

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"unknown ablations {unknown}; choose from {', '.join(VARIANTS)}")
    out_dir = Path(out_dir)
    rows: dict[str, dict[str, Any]] = {}
    for key in variants:
        cfg = load_config(config, [*overrides, f"train.steps={steps}", *VARIANTS[key].overrides])
        run_dir = out_dir / key
        if on_variant:
            on_variant(key, "train")
        whisper, llm = resolve_model(cfg.models.whisper), resolve_model(cfg.models.llm)
        train(train_cache, run_dir, whisper, llm, cfg.student, cfg.train, cfg.runtime, eval_cache, resume=True)
        if on_variant:
            on_variant(key, "score")
        _, report, _ = build_report(run_dir, {"held-out": manifest}, limit, max_new_tokens=max_new_tokens,
                                    systems=SYSTEMS, device=device)  # fmt: skip
        scored = report["sets"]["held-out"]
        rows[key] = {"systems": scored["systems"], "n": scored["n"], "distill": last_eval_distill(run_dir),
                     "beats_blind": scored["verdicts"]["beats_blind"]["all"], "run": str(run_dir)}  # fmt: skip
    n = next(iter(rows.values()))["n"]
    text = (f"# Ablations: {config} preset, {steps} steps each, held-out `{manifest}` (n = {n})\n\n"
            "Student metrics against the teacher (higher is better except KL); 'blind top-1' is the same student fed "
            "another utterance's audio.\n\n" + render_table(rows))  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablations.md").write_text(text)
    data = {"config": config, "steps": steps, "overrides": list(overrides), "manifest": str(manifest), "rows": rows}
    (out_dir / "ablations.json").write_text(json.dumps(data, indent=2) + "\n")
    return out_dir / "ablations.md", data
