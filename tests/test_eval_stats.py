"""The graded answer metrics (first 4 / 8 tokens, token F1) on hand-made id lists and the per-row hidden-state
scores against the trainer's batch sums."""

from __future__ import annotations

import pytest
import torch

from diva.student.evaluate import answer_f1, answer_scores, hidden_scores, row_means, starts_like
from diva.student.train import prediction_scores


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
