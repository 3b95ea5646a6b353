"""A trained run's quality report: RUN_DIR/report.md, report.json and PNG training curves.

    metrics.jsonl --> curves_train.png (loss, L_distill, L_align by step)
                  --> curves_eval.png (held-out L_distill and top-1 agreement: student, audio-blind, mean-h_T)
    for each evaluation set (held-out synthetic speech; real recordings where given):
        student.evaluate.evaluate_answers(systems: student, floor, blind, cascade) --> one table per set
    --> report.md (tables, notes, verdicts, example answers, the plots), report.json (all numbers, what made them)

"Better" means higher cosine, top-1 agreement, identical answers and shared prefix, and lower KL. The report
states, per set, whether the student beats the floor (the untrained student) and the audio-blind control on
every metric, and how much of the way from the floor to the cascade (Whisper's transcript fed to the teacher) it
goes. A report whose inputs (run step, sets, sizes) did not change is not recomputed.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from diva import __version__
from diva.student.evaluate import COLUMNS, SYSTEMS, evaluate_answers, render_markdown

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
HIGHER_IS_BETTER = {"cosine": True, "top1_agree": True, "kl": False, "identical": True, "prefix_tokens": True,
                    "prefix_frac": True}  # fmt: skip


def run_step(run_dir: Path) -> int | None:
    """The step of a run's latest complete checkpoint (None: a save_pretrained folder, not a run)."""
    from diva.student.train import list_checkpoints

    checkpoints = list_checkpoints(Path(run_dir))
    return int(json.loads((checkpoints[-1] / "checkpoint.json").read_text())["step"]) if checkpoints else None


def compare(systems: dict[str, dict[str, float]], a: str, b: str) -> dict[str, str]:
    """Per metric: "better", "tie" or "worse" for system `a` against system `b` (a tie is not better)."""
    result = {}
    for key, higher in HIGHER_IS_BETTER.items():
        x, y = systems[a][key], systems[b][key]
        result[key] = "tie" if x == y else "better" if (x > y) == higher else "worse"
    return result


def gap_closed(systems: dict[str, dict[str, float]], key: str) -> float | None:
    """How far the student goes from the floor to the cascade on `key`: 0 = floor, 1 = cascade."""
    if not {"student", "floor", "cascade"} <= set(systems):
        return None
    span = systems["cascade"][key] - systems["floor"][key]
    return None if abs(span) < 1e-12 else (systems["student"][key] - systems["floor"][key]) / span


def verdicts(report: dict[str, Any]) -> dict[str, Any]:
    """Student vs floor, vs blind (every metric) and the share of the floor-to-cascade gap it closes."""
    systems = report["systems"]
    out: dict[str, Any] = {}
    for ref in ("floor", "blind"):
        if "student" in systems and ref in systems:
            per_metric = compare(systems, "student", ref)
            out[f"beats_{ref}"] = {"all": all(v == "better" for v in per_metric.values()), "per_metric": per_metric}
    out["gap_closed"] = {k: gap_closed(systems, k) for k in ("cosine", "top1_agree", "kl", "identical")}
    return out


def verdict_text(per_metric: dict[str, str]) -> str:
    """`yes, on every metric`, or `NO: ` and the metrics where the student is worse or tied (a tie is not better)."""
    worse = [k for k, r in per_metric.items() if r == "worse"]
    ties = [k for k, r in per_metric.items() if r == "tie"]
    if not worse + ties:
        return "yes, on every metric"
    parts = [f"{how} on {', '.join(keys)}" for how, keys in (("worse", worse), ("tied", ties)) if keys]
    return "NO: " + "; ".join(parts)


def read_curves(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The train and eval records of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return [], []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["split"] == "train"], [r for r in records if r["split"] == "eval"]


def plot_curves(run_dir: Path) -> list[str]:
    """curves_train.png and curves_eval.png (when the run logged evaluations) in run_dir; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_curves(run_dir)
    written = []
    if train:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        steps = [r["step"] for r in train]
        for key in ("loss", "distill", "align"):
            if all(key in r for r in train):
                ax.plot(steps, [r[key] for r in train], label=key)
        ax.set(xlabel="step", ylabel="training loss", title="training losses")
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "curves_train.png", dpi=100)
        plt.close(fig)
        written.append("curves_train.png")
    if evals:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
        steps = [r["step"] for r in evals]
        for prefix, label in (("", "student"), ("blind_", "audio-blind"), ("mean_ht_", "mean h_T")):
            left.plot(steps, [r[f"{prefix}distill"] for r in evals], marker="o", label=label)
            right.plot(steps, [r[f"{prefix}top1_agree"] for r in evals], marker="o", label=label)
        left.set(xlabel="step", ylabel="L_distill (lower is better)", title="held-out L_distill")
        right.set(xlabel="step", ylabel="top-1 agreement (higher is better)", title="held-out next-token agreement")
        left.legend()
        right.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "curves_eval.png", dpi=100)
        plt.close(fig)
        written.append("curves_eval.png")
    return written


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def render_report(report: dict[str, Any]) -> str:
    """report.md from a report.json's contents."""
    made = report["made_by"]
    lines = [
        f"# DiVA student report: {report['model']}",
        "",
        f"Step {report['step']} · {made['date']} · {made['machine']} · diva {made['diva']}",
        "",
        "Systems, all scored against the teacher (the frozen LLM given the transcript as text): **student** (the "
        "trained student on the speech), **floor** (the untrained student), **blind** (the trained student fed "
        "another utterance's audio), **cascade** (Whisper's own transcript fed to the teacher). Higher is better "
        "except KL.",
        "",
    ]
    for name, result in report["sets"].items():
        lines += [f"## {name}: `{result['manifest']}`", "", render_markdown(result).rstrip(), ""]
        v = result["verdicts"]
        for ref in ("floor", "blind"):
            if f"beats_{ref}" in v:
                lines.append(f"- student better than {ref}: {verdict_text(v[f'beats_{ref}']['per_metric'])}")
        gaps = v["gap_closed"]
        if any(g is not None for g in gaps.values()):
            lines.append("- share of the floor-to-cascade gap the student closes: "
                         + ", ".join(f"{k} {_fmt(g)}" for k, g in gaps.items()))  # fmt: skip
        lines += ["", "Examples (greedy answers):", ""]
        for ex in result.get("examples", []):
            lines.append(f"- *{ex['transcript']}*")
            for key in ("teacher", "student", "cascade", "blind", "floor"):
                if key in ex:
                    lines.append(f"  - {key}: {ex[key]!r}")
        lines.append("")
    for png in report.get("plots", []):
        lines += [f"![{png}]({png})", ""]
    return "\n".join(lines)


def build_report(
    run_dir: str | Path,
    sets: dict[str, str | Path],
    limit: int = 48,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    systems: Sequence[str] = SYSTEMS,
    device: str = "auto",
    force: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[Path, dict[str, Any], bool]:
    """Write run_dir/report.md, report.json and the curves; returns (report.md, the report, whether it was built
    now). `sets`: name -> manifest folder (e.g. {"held-out synthetic": ..., "real recordings": ...})."""
    from diva.runtime import describe_hardware

    run_dir = Path(run_dir)
    request = {"step": run_step(run_dir), "sets": {k: str(v) for k, v in sets.items()}, "limit": limit,
               "batch_size": batch_size, "max_new_tokens": max_new_tokens, "systems": list(systems)}  # fmt: skip
    json_path = run_dir / REPORT_JSON
    if json_path.is_file() and not force:
        old = json.loads(json_path.read_text())
        if old.get("request") == request:
            return run_dir / REPORT_MD, old, False
    results = {}
    for name, manifest in sets.items():
        each = (lambda done, total, name=name: progress(name, done, total)) if progress else None
        if each is not None:
            each(0, limit)  # the set starts: its clock starts here, not when the first set did
        result = evaluate_answers(run_dir, manifest, limit, batch_size, max_new_tokens, systems, device, each)
        result["verdicts"] = verdicts(result)
        results[name] = result
    hardware = describe_hardware()
    report = {
        "model": str(run_dir),
        "step": request["step"],
        "request": request,
        "sets": results,
        "plots": plot_curves(run_dir),
        "made_by": {
            "diva": __version__,
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()} CPU {hardware['cpu_capability']}, {hardware['threads']} threads, "
            f"device {hardware['device']}, torch {hardware['torch']}",
            "hardware": hardware,
            "columns": COLUMNS,
        },
    }
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    (run_dir / REPORT_MD).write_text(render_report(report))
    return run_dir / REPORT_MD, report, True
