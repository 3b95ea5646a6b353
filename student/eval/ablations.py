"""The paper's ablations and the project's whole-answer variants at small scale: shorter runs of one preset that
differ in one choice, one table per held-out set.

    for each variant (both losses | distill only | align only | Q-Former without Whisper init | MLP adapter |
                      + whole-answer L2 | + whole-answer KL | + whole-answer CE):
        train(preset + overrides + the variant's overrides, steps, on the plain cache or the answer cache the
              variant needs)                                   -> OUT/<variant>/   (resumable, skipped when done)
        report.build_report(every held-out set, systems student + blind) -> OUT/<variant>/report.json (cached)
    -> OUT/ablations.md and ablations.json: per set, the student's metrics per variant beside its audio-blind
       control, each variant's paired-bootstrap difference from the reference variant (the first one), and what
       each variant cost (training s/utterance, cache bytes/utterance)

Every variant starts from the same seed and sees the same batches in the same order (the data order is a function
of the seed, and an answer cache of the same manifest holds the same rows in the same shards), so the table
isolates the one choice. The paper (Held et al. 2024, table 4) found both losses needed: distillation alone or
alignment alone, a randomly initialised Q-Former, or a pooled MLP adapter all answer worse.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diva.config import ConfigError
from diva.student.eval.render import COLUMNS

ANSWER_ON = ("student.answer_weight=1",)


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: tuple[str, ...]
    answers: tuple[str, ...] = ()  # answer caches it can train on, by answer_targets, first preferred; (): plain


VARIANTS = {
    "both_losses": Variant("both losses (DiVA)", ()),
    "distill_only": Variant("distillation only", ("student.align_weight=0",)),
    "align_only": Variant("alignment only", ("student.distill_weight=0",)),
    "qformer_random": Variant("Q-Former, random init", ("student.adapter=qformer_random",)),
    "mlp": Variant("MLP adapter (pooled frames)", ("student.adapter=mlp",)),
    "answer_l2": Variant("+ whole-answer L2 (hidden states)", (*ANSWER_ON, "student.answer_loss=l2"), ("hidden",)),
    "answer_kl": Variant("+ whole-answer KL (top-k)", (*ANSWER_ON, "student.answer_loss=kl"), ("topk",)),
    "answer_ce": Variant("+ whole-answer CE (answer ids)", (*ANSWER_ON, "student.answer_loss=ce"),
                         ("ids", "topk", "hidden")),
}
PAPER_VARIANTS = ("both_losses", "distill_only", "align_only", "qformer_random", "mlp")
SYSTEMS = ("student", "blind")
DIFF_METRICS = ("top1_agree", "kl", "first4", "answer_f1", "prefix_tokens")


def render_table(rows: dict[str, dict[str, Any]], set_name: str) -> str:
    """One markdown table for one held-out set: the student's metrics per variant and its blind control's top-1."""
    header = ["variant", *COLUMNS.values(), "blind top-1", "held-out L_distill", "beats blind on all"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, row in rows.items():
        scored = row["sets"][set_name]
        student, blind = scored["systems"]["student"], scored["systems"]["blind"]
        cells = [VARIANTS[key].label, *(f"{student[k]:.3f}" for k in COLUMNS), f"{blind['top1_agree']:.3f}",
                 f"{row['distill']:.3f}" if row.get("distill") is not None else "n/a",
                 "yes" if scored["beats_blind"] else "no"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_differences(rows: dict[str, dict[str, Any]], set_name: str, reference: str) -> str:
    """Each variant's student minus the reference variant's, per row, as mean [95% interval] (positive: better;
    for KL, lower KL counts as positive); `better`/`worse` only where the interval excludes 0."""
    header = ["variant", *(f"Δ {COLUMNS[k]}" for k in DIFF_METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, row in rows.items():
        if key == reference:
            continue
        diffs = row["sets"][set_name]["vs_reference"]
        cells = [VARIANTS[key].label]
        for metric in DIFF_METRICS:
            d = diffs[metric]
            mark = {"better": " **better**", "worse": " worse", "tie": ""}[d["verdict"]]
            cells.append(f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_costs(rows: dict[str, dict[str, Any]]) -> str:
    """Per variant: training seconds per utterance (median over the logged steps) and the training cache's bytes
    per utterance (every shard file, audio included)."""
    lines = ["| variant | training s/utterance | cache bytes/utterance |", "|---|---|---|"]
    for key, row in rows.items():
        lines.append(f"| {VARIANTS[key].label} | {row['s_per_utterance']:.3f} | {row['cache_bytes_per_utterance']} |")
    return "\n".join(lines) + "\n"


def last_eval_distill(run_dir: Path) -> float | None:
    """The held-out L_distill of the run's last evaluation on its eval cache (metrics.jsonl), if any."""
    from diva.student.eval.report import read_curves

    _, evals = read_curves(run_dir)
    return evals[-1]["distill"] if evals else None


def seconds_per_utterance(run_dir: Path) -> float:
    """Training seconds per utterance: the median logged step's, from its samples_per_s (steps after the first
    10%, so the first epoch's encoder passes and warm-up do not dominate)."""
    from diva.student.eval.report import read_curves

    train, _ = read_curves(run_dir)
    rates = [r["samples_per_s"] for r in train[len(train) // 10 :] if r.get("samples_per_s")]
    return 1.0 / statistics.median(rates) if rates else float("nan")


def cache_bytes_per_utterance(cache_dir: Path) -> int:
    """Every shard file's bytes over the rows, from the cache's index."""
    from diva.teacher_cache.index import read_index

    index = read_index(cache_dir)
    total = sum(f["bytes"] for s in index["shards"] for f in s["files"].values())
    return round(total / max(1, index["rows"]))


def versus(student: dict[str, list[float]], reference: dict[str, list[float]], seed: int) -> dict[str, Any]:
    """Per metric, {diff, low, high, verdict}: one student's per-row scores against another's on the same rows."""
    from diva.student.eval.report import compare

    verdict, intervals = compare({"a": student, "b": reference}, "a", "b", seed=seed)
    return {k: {**intervals[k], "verdict": verdict[k]} for k in intervals}


def run_ablations(
    config: str,
    train_cache: Path,
    eval_cache: Path | None,
    manifest: Path,
    out_dir: Path,
    steps: int,
    overrides: Sequence[str] = (),
    variants: Sequence[str] = PAPER_VARIANTS,
    limit: int = 32,
    max_new_tokens: int = 32,
    device: str = "auto",
    on_variant: Callable[[str, str], None] | None = None,
    answer_caches: dict[str, Path] | None = None,
    extra_sets: dict[str, Path] | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> tuple[Path, dict[str, Any]]:
    """Train and score every variant (see the module docstring); returns OUT/ablations.md and the table's data.

    `answer_caches`: "hidden" and/or "topk" -> an answer cache of the training manifest (cache.answer_targets), for
    the whole-answer variants. `extra_sets`: more held-out manifests by name (e.g. real recordings), scored beside
    `manifest` ("held-out"). The first variant is the reference of the differences; `seed` seeds their bootstrap."""
    from diva.config import load_config
    from diva.student.eval.report import build_report
    from diva.student.training.train import train
    from diva.zoo.resolve import resolve_model

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ConfigError(f"unknown ablations {unknown}; choose from {', '.join(VARIANTS)}")
    answer_caches = dict(answer_caches or {})
    needing = [v for v in variants if VARIANTS[v].answers and not set(VARIANTS[v].answers) & set(answer_caches)]
    if needing:
        kinds = VARIANTS[needing[0]].answers
        raise ConfigError(f"variant {needing[0]} trains on an answer cache with targets {' or '.join(kinds)}: build "
                         f"one (cache.answer_tokens > 0, cache.answer_targets={kinds[0]}) and pass it (--answer-cache "
                         f"{kinds[0]}=DIR)")  # fmt: skip
    sets = {"held-out": Path(manifest), **{k: Path(v) for k, v in (extra_sets or {}).items()}}
    out_dir = Path(out_dir)
    rows: dict[str, dict[str, Any]] = {}
    per_row: dict[str, dict[str, Any]] = {}
    for key in variants:
        variant = VARIANTS[key]
        cfg = load_config(config, [*overrides, f"train.steps={steps}", *variant.overrides])
        kind = next((k for k in variant.answers if k in answer_caches), None)
        cache = Path(answer_caches[kind]) if kind else Path(train_cache)
        run_dir = out_dir / key
        if on_variant:
            on_variant(key, "train")
        whisper, llm = resolve_model(cfg.models.whisper), resolve_model(cfg.models.llm)
        train(cache, run_dir, whisper, llm, cfg.student, cfg.train, cfg.runtime, eval_cache, resume=True)
        if on_variant:
            on_variant(key, "score")
        _, report, _ = build_report(run_dir, sets, limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                    systems=SYSTEMS, device=device, seed=seed)  # fmt: skip
        rows[key] = {
            "sets": {name: {"systems": scored["systems"], "n": scored["n"],
                            "beats_blind": scored["verdicts"]["beats_blind"]["all"]}
                     for name, scored in report["sets"].items()},
            "distill": last_eval_distill(run_dir), "run": str(run_dir), "cache": str(cache),
            "s_per_utterance": seconds_per_utterance(run_dir),
            "cache_bytes_per_utterance": cache_bytes_per_utterance(cache),
        }  # fmt: skip
        per_row[key] = {name: scored["per_row"]["student"] for name, scored in report["sets"].items()}
    reference = variants[0]
    for key in variants:
        for name in sets:
            rows[key]["sets"][name]["vs_reference"] = versus(per_row[key][name], per_row[reference][name], seed)
    text = (f"# Ablations: {config} preset, {steps} steps each\n\n"
            "Student metrics against the teacher (higher is better except KL); 'blind top-1' is the same student fed "
            "another utterance's audio.\n")  # fmt: skip
    for name in sets:
        n = rows[reference]["sets"][name]["n"]
        text += f"\n## {name} (`{sets[name]}`, n = {n})\n\n" + render_table(rows, name)
        if len(variants) > 1:
            text += (f"\nDifference from '{VARIANTS[reference].label}', per row, mean [95% paired-bootstrap interval, "
                     f"seed {seed}]; positive is better (for KL: lower):\n\n"
                     + render_differences(rows, name, reference))  # fmt: skip
    text += "\n## Cost\n\n" + render_costs(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablations.md").write_text(text)
    data = {"config": config, "steps": steps, "overrides": list(overrides), "reference": reference,
            "sets": {k: str(v) for k, v in sets.items()}, "rows": rows}  # fmt: skip
    (out_dir / "ablations.json").write_text(json.dumps(data, indent=2) + "\n")
    return out_dir / "ablations.md", data
