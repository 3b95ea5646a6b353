"""A trained run's quality report: RUN_DIR/report.md, report.json and PNG training curves.

    metrics.jsonl --> curves_train.png (loss, L_distill, L_align by step)
                  --> curves_eval.png (held-out L_distill and top-1 agreement: student, audio-blind, mean-h_T)
    for each evaluation set (held-out synthetic speech; real recordings where given):
        eval.evaluate.evaluate_answers(systems: student, floor, blind, cascade) --> one table per set
    --> report.md (tables, notes, verdicts and their intervals, example answers, the plots), report.json (all
        numbers, every row's scores, what made them)

"Better" means higher cosine, top-1 agreement, identical answers, first 4 / 8 tokens, answer F1 and shared
prefix, and lower KL. The report states, per set, whether the student beats the floor (the untrained student)
and the audio-blind control on every metric, and how much of the way from the floor to the cascade (Whisper's
transcript fed to the teacher) it goes. A verdict is not a comparison of means: per metric, the rows' paired
differences (student - floor, student - blind) are bootstrapped (eval.stats), and the student is better only
when the 95% interval of the mean difference is above 0, worse when below, else tied (not distinguishable).
A report whose inputs (run step, sets, sizes, bootstrap) did not change is not recomputed.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diva import __version__
from diva.student.eval.bench_task import run_task
from diva.student.eval.evaluate import SYSTEMS, EvalError, evaluate_answers
from diva.student.eval.render import COLUMNS, render_markdown
from diva.student.eval.stats import LEVEL, RESAMPLES, interval_verdict, paired_bootstrap

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
HIGHER_IS_BETTER = {"cosine": True, "top1_agree": True, "answer_top1": True, "kl": False, "identical": True,
                    "first4": True, "first8": True, "answer_f1": True, "prefix_tokens": True, "prefix_frac": True,
                    "align_acc": True}  # fmt: skip
GAP_METRICS = ("cosine", "top1_agree", "answer_top1", "kl", "identical", "first4", "first8", "answer_f1")


def run_step(run_dir: Path) -> int | None:
    """The step of a run's latest complete checkpoint (None: a save_pretrained folder, not a run)."""
    from diva.student.run_folder import list_checkpoints

    checkpoints = list_checkpoints(Path(run_dir))
    return int(json.loads((checkpoints[-1] / "checkpoint.json").read_text())["step"]) if checkpoints else None


def row_differences(per_row: dict[str, dict[str, list[float]]], a: str, b: str, key: str) -> np.ndarray:
    """Per row, system `a`'s score on `key` minus system `b`'s, signed so that positive means `a` is better."""
    diff = np.asarray(per_row[a][key], dtype=np.float64) - np.asarray(per_row[b][key], dtype=np.float64)
    return diff if HIGHER_IS_BETTER[key] else -diff


def compare(
    per_row: dict[str, dict[str, list[float]]], a: str, b: str, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """Per metric, system `a` against system `b` on the same rows: "better", "tie" or "worse" from the paired
    bootstrap interval (a tie is not better), and {diff, low, high}: the mean difference and its interval."""
    verdict, intervals = {}, {}
    for key in HIGHER_IS_BETTER:
        if key not in per_row[a] or key not in per_row[b]:
            continue  # e.g. align_acc: only the systems fed audio have it
        diff, low, high = paired_bootstrap(row_differences(per_row, a, b, key), resamples, seed)
        verdict[key] = interval_verdict(low, high)
        intervals[key] = {"diff": diff, "low": low, "high": high}
    return verdict, intervals


def gap_closed(systems: dict[str, dict[str, float]], key: str) -> float | None:
    """How far the student goes from the floor to the cascade on `key`: 0 = floor, 1 = cascade."""
    ends = ("student", "floor", "cascade")
    if not set(ends) <= set(systems) or any(key not in systems[name] for name in ends):
        return None  # a system not scored, or a metric an older evaluation lacks
    span = systems["cascade"][key] - systems["floor"][key]
    return None if abs(span) < 1e-12 else (systems["student"][key] - systems["floor"][key]) / span


def verdicts(report: dict[str, Any], resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Student vs floor, vs blind (every metric, from paired bootstrap intervals over the rows) and the share of
    the floor-to-cascade gap it closes (from the means)."""
    if "per_row" not in report:
        raise EvalError(f"{report.get('manifest', 'this evaluation')}: no per-row scores (an evaluation from an "
                         "older diva), so no paired verdicts; score it again (diva report --force)")  # fmt: skip
    per_row, systems = report["per_row"], report["systems"]
    out: dict[str, Any] = {}
    for ref in ("floor", "blind"):
        if "student" in per_row and ref in per_row:
            per_metric, intervals = compare(per_row, "student", ref, resamples, seed)
            out[f"beats_{ref}"] = {"all": all(v == "better" for v in per_metric.values()), "per_metric": per_metric,
                                   "per_metric_ci": intervals}  # fmt: skip
    if "student" in per_row and "align_acc" in per_row["student"] and "align_constant_per_row" in report:
        pair = {"student": per_row["student"], "constant": {"align_acc": report["align_constant_per_row"]}}
        per_metric, intervals = compare(pair, "student", "constant", resamples, seed)
        out["align_vs_constant"] = {"verdict": per_metric["align_acc"], "ci": intervals["align_acc"]}
    out["gap_closed"] = {k: gap_closed(systems, k) for k in GAP_METRICS}
    out["bootstrap"] = {"n": report["n"], "resamples": resamples, "seed": seed, "level": LEVEL}
    return out


def verdict_text(per_metric: dict[str, str]) -> str:
    """`yes, on every metric`, or `NO: ` and the metrics where the student is worse or tied (not distinguishable:
    the interval holds 0; a tie is not better)."""
    worse = [k for k, r in per_metric.items() if r == "worse"]
    ties = [k for k, r in per_metric.items() if r == "tie"]
    if not worse + ties:
        return "yes, on every metric"
    parts = [f"{how} on {', '.join(keys)}" for how, keys in (("worse", worse), ("tied (not distinguishable)", ties))
             if keys]  # fmt: skip
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
            # a held-out set of one row has no blind control: its points are missing (nan), not zero
            left.plot(steps, [r.get(f"{prefix}distill", math.nan) for r in evals], marker="o", label=label)
            right.plot(steps, [r.get(f"{prefix}top1_agree", math.nan) for r in evals], marker="o", label=label)
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


def _interval(ci: dict[str, float], verdict: str) -> str:
    return f"{ci['diff']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}] {verdict}"


def interval_table(v: dict[str, Any]) -> list[str]:
    """Markdown lines: per metric, student - floor and student - blind with their bootstrap intervals, and how the
    intervals were made; none for verdicts without intervals (an older report.json)."""
    refs = [ref for ref in ("floor", "blind") if "per_metric_ci" in v.get(f"beats_{ref}", {})]
    if not refs:
        return []
    header = ["metric", *(f"student - {ref} [{v['bootstrap']['level']:.0%} interval]" for ref in refs)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = dict.fromkeys(k for ref in refs for k in v[f"beats_{ref}"]["per_metric_ci"])
    for key in keys:
        cells = [_interval(v[f"beats_{ref}"]["per_metric_ci"][key], v[f"beats_{ref}"]["per_metric"][key])
                 if key in v[f"beats_{ref}"]["per_metric_ci"] else "n/a" for ref in refs]  # fmt: skip
        lines.append(f"| {COLUMNS.get(key, key)} | " + " | ".join(cells) + " |")
    b = v["bootstrap"]
    lines += ["", f"- intervals: the mean per-row difference (positive = student better; KL's sign flipped) and its "
              f"{b['level']:.0%} percentile interval from a paired bootstrap over the n = {b['n']} rows "
              f"({b['resamples']} resamples, seed {b['seed']}); better or worse only when the interval excludes 0, "
              "else tied (not distinguishable)"]  # fmt: skip
    return lines


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
        if "align_vs_constant" in v:
            versus_constant = _interval(v["align_vs_constant"]["ci"], v["align_vs_constant"]["verdict"])
            lines.append(f"- align acc, student - constant (one token guessed in every slot): {versus_constant}")
        gaps = v["gap_closed"]
        if any(g is not None for g in gaps.values()):
            lines.append("- share of the floor-to-cascade gap the student closes: "
                         + ", ".join(f"{k} {_fmt(g)}" for k, g in gaps.items()))  # fmt: skip
        table = interval_table(v)
        lines += ["", *table] if table else []
        lines += ["", "Examples (greedy answers):", ""]
        for ex in result.get("examples", []):
            lines.append(f"- *{ex['transcript']}*")
            for key in ("teacher", "student", "cascade", "blind", "floor"):
                if key in ex:
                    lines.append(f"  - {key}: {ex[key]!r}")
        lines.append("")
    for title, task in report.get("tasks", {}).items():
        lines += render_task(title, task)
    for png in report.get("plots", []):
        lines += [f"![{png}]({png})", ""]
    return "\n".join(lines)


def render_task(title: str, task: dict[str, Any]) -> list[str]:
    """A downstream task's section: each system's scores (%) and the paired intervals of their differences."""
    metrics = list(next(iter(task["systems"].values())))
    lines = [f"## {title} (`diva bench-task {task['task']}`): `{task['data']}`, n = {task['n']}", "",
             task["summary"] + ".", "", "| system | " + " | ".join(metrics) + " |",
             "|---|" + "---|" * len(metrics)]  # fmt: skip
    lines += [f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in scores.values()) + " |"
              for name, scores in task["systems"].items()]  # fmt: skip
    lines.append("")
    for pair, c in task["comparisons"].items():
        lines.append(f"- {pair}, {c['metric']}: {_interval({'diff': c['mean'], **c}, c['verdict'])}")
    lines.append("")
    return lines


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
    seed: int = 0,
    tasks: dict[str, tuple[str, str | Path]] | None = None,
) -> tuple[Path, dict[str, Any], bool]:
    """Write run_dir/report.md, report.json and the curves; returns (report.md, the report, whether it was built
    now). `sets`: name -> manifest folder (e.g. {"held-out synthetic": ..., "real recordings": ...}); `seed`: the
    verdicts' bootstrap; `tasks`: title -> (a `diva bench-task` task, its data folder), scored for the student,
    the cascade and the teacher (e.g. {"Spoken QA": ("spoken-qa", "runs/demo/spoken-qa")})."""
    from diva.runtime import describe_hardware

    run_dir = Path(run_dir)
    request = {"step": run_step(run_dir), "sets": {k: str(v) for k, v in sets.items()}, "limit": limit,
               "batch_size": batch_size, "max_new_tokens": max_new_tokens, "systems": list(systems),
               "bootstrap": {"resamples": RESAMPLES, "seed": seed}, "metrics": list(COLUMNS),
               "tasks": {k: [t, str(d)] for k, (t, d) in (tasks or {}).items()}}  # fmt: skip
    # a report.json from before the bootstrap verdicts (or one lacking a metric) differs here: rebuilt, never reused
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
        result["verdicts"] = verdicts(result, RESAMPLES, seed)
        results[name] = result
    task_results = {}
    for title, (task, data) in (tasks or {}).items():
        each = (lambda done, total, title=title: progress(title, done, total)) if progress else None
        task_results[title] = run_task(task, data, run_dir, batch_size=batch_size, device=device, progress=each)
    hardware = describe_hardware()
    report = {
        "model": str(run_dir),
        "step": request["step"],
        "request": request,
        "sets": results,
        "tasks": task_results,
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
