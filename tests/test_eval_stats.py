"""The graded answer metrics (first 4 / 8 tokens, token F1) on hand-made id lists, the per-row hidden-state scores
against the trainer's batch sums, and the paired bootstrap behind the report's verdicts: a clearly better system
is better, identical systems and a small noisy lead at small n are ties, the seed makes it repeatable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diva.student.eval.evaluate import answer_f1, answer_scores, row_means, starts_like
from diva.student.eval.report import HIGHER_IS_BETTER, render_report, verdict_text, verdicts
from diva.student.eval.stats import interval_verdict, paired_bootstrap
from diva.student.model.metrics import hidden_scores, prediction_scores


def test_first_k_compares_the_teachers_first_k_tokens_or_all_of_a_shorter_answer() -> None:
    teacher = [1, 2, 3, 4, 5, 6]
    assert starts_like([1, 2, 3, 4, 9, 9], teacher, 4) == 1.0 and starts_like([1, 2, 3, 4, 9], teacher, 8) == 0.0
    assert starts_like([1, 2, 3, 9], teacher, 4) == 0.0 and starts_like([1, 2, 3], teacher, 4) == 0.0  # too short
    short = [7, 2]  # shorter than k: the answer must start with all of it
    assert starts_like([7, 2], short, 4) == 1.0 and starts_like([7, 2, 5, 5, 5], short, 8) == 1.0
    assert starts_like([7], short, 4) == 0.0 and starts_like([2, 7], short, 4) == 0.0


def test_answer_f1_is_the_bag_of_tokens_overlap() -> None:
    assert answer_f1([1, 2, 3], [1, 2, 4, 5]) == pytest.approx(4 / 7)  # common 2: P 2/3, R 1/2
    assert answer_f1([1, 1, 2], [1, 2, 2]) == pytest.approx(2 / 3)  # a multiset: each 1 and 2 counted once
    assert answer_f1([3, 2, 1], [1, 2, 3]) == 1.0  # order does not matter
    assert answer_f1([1, 2], [3, 4]) == 0.0 and answer_f1([], [1]) == 0.0 and answer_f1([1], []) == 0.0
    assert answer_f1([], []) == 1.0


def test_answer_scores_are_per_row() -> None:
    teacher = [[1, 2, 3, 9], [4, 9], [7, 8]]
    scores = answer_scores([[1, 2, 3, 9], [4, 5, 9], [6]], teacher)
    assert scores["identical"] == [1.0, 0.0, 0.0] and scores["prefix_tokens"] == [4.0, 1.0, 0.0]
    assert scores["first4"] == [1.0, 0.0, 0.0] and scores["first8"] == [1.0, 0.0, 0.0]
    assert scores["prefix_frac"] == [1.0, 0.5, 0.0]
    assert scores["answer_f1"] == pytest.approx([1.0, 0.8, 0.0])  # row 2: common 2, P 2/3, R 1


def test_hidden_scores_per_row_sum_to_the_trainers_batch_scores() -> None:
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(8, 11, bias=False)
    h, h_t = torch.randn(5, 8), torch.randn(5, 8)
    h_t[1] = h[1]  # one row the teacher's own: cosine 1, KL 0, distill 0, same top-1
    with torch.no_grad():
        rows, sums = hidden_scores(h, h_t, lm_head), prediction_scores(h, h_t, lm_head, "")
        alone = hidden_scores(h[3:4], h_t[3:4], lm_head)  # a row's score does not depend on its batch
    assert set(rows) == set(sums) and all(len(v) == 5 for v in rows.values())
    for key, total in sums.items():
        assert sum(rows[key]) == pytest.approx(total, rel=1e-5, abs=1e-6), key
    assert rows["cosine"][1] == pytest.approx(1.0) and rows["kl"][1] == pytest.approx(0.0, abs=1e-6)
    assert rows["distill"][1] == 0.0 and rows["top1_agree"][1] == 1.0
    assert all(alone[k][0] == pytest.approx(rows[k][3], rel=1e-5) for k in rows)


def test_row_means_are_the_means_of_the_rows() -> None:
    assert row_means({"a": {"cosine": [0.5, 1.0, 0.0], "kl": [2.0]}}) == {"a": {"cosine": 0.5, "kl": 2.0}}


def test_bootstrap_finds_a_clearly_better_system_better() -> None:
    rng = np.random.default_rng(1)
    diffs = 0.5 + 0.1 * rng.standard_normal(40)
    mean, low, high = paired_bootstrap(diffs, 2000, seed=0)
    assert mean == pytest.approx(float(diffs.mean())) and 0 < low < mean < high
    assert interval_verdict(low, high) == "better" and interval_verdict(-high, -low) == "worse"


def test_bootstrap_ties_identical_systems_and_a_small_noisy_lead() -> None:
    assert paired_bootstrap(np.zeros(30)) == (0.0, 0.0, 0.0) and interval_verdict(0.0, 0.0) == "tie"
    noisy = [0.3, -0.25, 0.1, -0.05, 0.02]  # mean +0.024: ahead on the means, not on the rows
    mean, low, high = paired_bootstrap(noisy)
    assert mean > 0 and low < 0 < high and interval_verdict(low, high) == "tie"


def test_bootstrap_is_repeatable_with_its_seed() -> None:
    diffs = np.random.default_rng(2).standard_normal(25)
    assert paired_bootstrap(diffs, 500, seed=3) == paired_bootstrap(diffs, 500, seed=3)
    assert paired_bootstrap(diffs, 500, seed=3) != paired_bootstrap(diffs, 500, seed=4)
    with pytest.raises(ValueError):
        paired_bootstrap([])


def _evaluation(n: int = 12) -> dict:
    """An evaluation of n rows: the student far ahead of the floor on every metric (KL lower), ahead of the blind
    control on the cosine's mean by a small noisy margin only, and level with it everywhere else."""
    rng = np.random.default_rng(0)
    base = {key: rng.uniform(0.2, 0.4, n) for key in HIGHER_IS_BETTER}
    noise = np.array([0.3, -0.29, 0.2, -0.2, 0.1, -0.1, 0.25, -0.24, 0.05, -0.05, 0.01, 0.0])[:n]
    student = {k: (v + (0.5 if HIGHER_IS_BETTER[k] else -0.1)).tolist() for k, v in base.items()}
    floor = {k: v.tolist() for k, v in base.items()}
    blind = {k: list(student[k]) for k in base}
    blind["cosine"] = (np.array(student["cosine"]) - noise).tolist()  # student - blind = noise: mean +0.003
    per_row = {"student": student, "floor": floor, "blind": blind, "cascade": student}
    return {"n": n, "skipped": 0, "max_new_tokens": 32, "manifest": "m", "per_row": per_row,
            "systems": row_means(per_row)}  # fmt: skip


def test_verdicts_come_from_the_intervals_not_the_means() -> None:
    evaluation = _evaluation()
    systems = evaluation["systems"]
    assert systems["student"]["cosine"] > systems["blind"]["cosine"]  # the means alone would say "better"
    v = verdicts(evaluation, resamples=2000, seed=0)
    floor, blind = v["beats_floor"], v["beats_blind"]
    assert floor["all"] and set(floor["per_metric"].values()) == {"better"} and not blind["all"]
    assert floor["per_metric_ci"]["kl"]["diff"] == pytest.approx(0.1) and floor["per_metric_ci"]["kl"]["low"] > 0
    assert blind["per_metric"]["cosine"] == "tie" and set(blind["per_metric"].values()) == {"tie"}
    ci = blind["per_metric_ci"]["cosine"]
    assert ci["low"] < 0 < ci["high"] and ci["diff"] == pytest.approx(0.0025)
    assert v["bootstrap"] == {"n": 12, "resamples": 2000, "seed": 0, "level": 0.95}
    assert verdicts(evaluation, resamples=2000, seed=0) == v  # seeded: the same verdicts and intervals
    assert verdict_text(floor["per_metric"]) == "yes, on every metric"
    tied = "NO: tied (not distinguishable) on cosine, top1_agree, answer_top1, kl"
    assert verdict_text(blind["per_metric"]).startswith(tied)
    assert verdict_text({"cosine": "worse", "kl": "tie", "first4": "better"}) == (
        "NO: worse on cosine; tied (not distinguishable) on kl"
    )
    assert set(v["gap_closed"]) >= {"first4", "first8", "answer_f1"} and v["gap_closed"]["first4"] == 1.0
    with pytest.raises(ValueError, match="per-row"):
        verdicts({k: x for k, x in evaluation.items() if k != "per_row"})


def _report(evaluation: dict) -> dict:
    made_by = {"date": "today", "machine": "here", "diva": "0"}
    return {"model": "run", "step": 2, "made_by": made_by, "sets": {"held-out": {**evaluation, "manifest": "m"}}}


def test_report_md_shows_the_intervals_and_how_they_were_made() -> None:
    evaluation = _evaluation()
    evaluation["verdicts"] = verdicts(evaluation, resamples=2000, seed=0)
    lines = render_report(_report(evaluation)).splitlines()
    assert "| metric | student - floor [95% interval] | student - blind [95% interval] |" in lines
    cosine = next(line for line in lines if line.startswith("| cos(h, h_T) | +0.500 ["))
    assert cosine.split(" | ")[1].endswith("better") and cosine.split(" | ")[2].startswith("+0.003 [-")
    assert cosine.endswith("tie |") and any(line.startswith("| first 4 | ") for line in lines)
    assert any("paired bootstrap over the n = 12 rows (2000 resamples, seed 0)" in line for line in lines)
    assert "- student better than blind: NO: tied (not distinguishable) on cosine" in "\n".join(lines)


def test_report_md_renders_an_older_report_without_intervals() -> None:
    evaluation = _evaluation()
    old = {"beats_floor": {"all": True, "per_metric": {"cosine": "better"}}, "gap_closed": {"cosine": None}}
    evaluation["verdicts"] = old
    text = render_report(_report(evaluation))
    assert "- student better than floor: yes, on every metric" in text and "interval" not in text
