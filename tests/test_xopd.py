"""X-OPD (student.training.xopd): the teacher's and the student's answer log-probs against a plain transformers forward
(left padding, the prefix K/V reuse), the greedy rollout is the argmax of the student's own log-probs at every position,
speech tokens equal to the transcript's embeddings score zero, masking after the stop id, and the loss trains the
audio side; the trainer runs it as a second stage from a trained run and resumes it exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diva.student.model.network import DiVAStudent, StudentConfig
from diva.student.training.xopd import (
    reverse_kl,
    rollouts,
    stop_mask,
    student_log_probs,
    teacher_log_probs,
    xopd_loss,
)
from diva.teacher_cache.prompt import teacher_input_ids

Q = 6


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def prompt(tokenizer):
    from diva.teacher_cache.prompt import build_prompt

    return build_prompt(tokenizer)


@pytest.fixture(scope="module")
def llm(tiny_llama: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval()


def make_student(tiny_whisper: Path, tiny_llama: Path, prompt, num_queries: int = Q, **fields) -> DiVAStudent:
    torch.manual_seed(0)
    cfg = StudentConfig(num_queries=num_queries, xopd_weight=1.0, **fields)
    return DiVAStudent.from_pretrained_parts(tiny_whisper, tiny_llama, prompt, cfg).eval()


def direct_log_probs(llm, rows: list[torch.Tensor], k: int) -> torch.Tensor:
    """Each row (L, d) of input embeddings alone through the plain causal LM: log-probs at its last k positions."""
    with torch.no_grad():
        outs = [llm(inputs_embeds=row[None]).logits[0, -k:] for row in rows]
    return torch.log_softmax(torch.stack(outs).float(), dim=-1)


def test_stop_mask_keeps_each_answer_up_to_its_first_stop() -> None:
    ids = torch.tensor([[5, 6, 2, 2], [5, 2, 7, 2], [5, 6, 7, 8]])
    expected = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert stop_mask(ids, [2]).long().tolist() == expected
    assert stop_mask(ids, [9, 7]).long().tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]]


def test_reverse_kl_is_zero_on_equal_distributions_and_ignores_masked_positions() -> None:
    torch.manual_seed(0)
    log_p = torch.log_softmax(torch.randn(2, 3, 11), dim=-1)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert float(reverse_kl(log_p, log_p, mask)) == pytest.approx(0.0, abs=1e-6)
    other = log_p.clone()
    other[0, 2] = torch.log_softmax(torch.randn(11), dim=-1)  # masked: must not count
    other[1, 1:] = torch.log_softmax(torch.randn(2, 11), dim=-1)
    assert float(reverse_kl(log_p, other, mask)) == pytest.approx(0.0, abs=1e-6)
    other[1, 0] = torch.log_softmax(torch.randn(11), dim=-1)  # counted: the row's only position
    p, q = log_p[1, 0], other[1, 0]
    expected = float((p.exp() * (p - q)).sum()) / 2  # mean over the 2 rows, row 0 contributes 0
    assert float(reverse_kl(log_p, other, mask)) == pytest.approx(expected, rel=1e-5)


def test_teacher_log_probs_equal_each_row_alone(tiny_whisper, tiny_llama, prompt, llm, tokenizer) -> None:
    student = make_student(tiny_whisper, tiny_llama, prompt)
    texts = [tokenizer("one two three four five")["input_ids"], tokenizer("seven")["input_ids"]]
    teacher_ids = [teacher_input_ids(prompt, t) for t in texts]  # different lengths: the batch is left-padded
    answers = torch.tensor([[11, 12, 13, 14], [21, 22, 23, 24]])
    got = teacher_log_probs(student, teacher_ids, answers)
    embed = llm.get_input_embeddings()
    rows = [embed(torch.tensor([*t, *a.tolist()[:-1]])) for t, a in zip(teacher_ids, answers, strict=True)]
    torch.testing.assert_close(got, direct_log_probs(llm, rows, 4), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("reuse_prefix_kv", [True, False])
def test_student_log_probs_equal_the_plain_forward(tiny_whisper, tiny_llama, prompt, llm, reuse_prefix_kv) -> None:
    student = make_student(tiny_whisper, tiny_llama, prompt, reuse_prefix_kv=reuse_prefix_kv)
    torch.manual_seed(1)
    v = torch.randn(2, Q, llm.config.hidden_size) * 0.05
    answers = torch.tensor([[11, 12, 13], [21, 22, 23]])
    with torch.no_grad():
        got = student_log_probs(student, v, answers)
    embed = llm.get_input_embeddings()
    prefix, suffix = embed(torch.tensor(prompt.prefix_ids)), embed(torch.tensor(prompt.suffix_ids))
    rows = [torch.cat([prefix, v[b], suffix, embed(answers[b, :-1])]) for b in range(2)]
    torch.testing.assert_close(got, direct_log_probs(llm, rows, 3), atol=1e-4, rtol=1e-4)


def test_greedy_rollout_is_the_argmax_of_the_students_log_probs(tiny_whisper, tiny_llama, prompt, llm) -> None:
    student = make_student(tiny_whisper, tiny_llama, prompt)
    torch.manual_seed(2)
    v = torch.randn(3, Q, llm.config.hidden_size) * 0.05
    answers = rollouts(student, v, stop_ids=[-1], max_tokens=7, sample=False)  # no stop: 7 tokens each
    assert answers.ids.shape == (3, 7) and bool(answers.mask.all())
    with torch.no_grad():
        log_p_s = student_log_probs(student, v, answers.ids)
    assert torch.equal(log_p_s.argmax(-1), answers.ids)  # position t predicts answer token t


def test_speech_equal_to_the_transcript_scores_zero(tiny_whisper, tiny_llama, prompt, tokenizer) -> None:
    text = tokenizer("go forward ten meters")["input_ids"]
    student = make_student(tiny_whisper, tiny_llama, prompt, num_queries=len(text))
    v = student.token_embeddings(torch.tensor(text))[None].repeat(2, 1, 1)  # "audio" tokens = the transcript
    teacher_ids = [teacher_input_ids(prompt, text)] * 2
    for sample in (False, True):
        cfg = StudentConfig(num_queries=len(text), xopd_weight=1.0, xopd_tokens=8, xopd_sample=sample)
        loss, stats = xopd_loss(student, v, teacher_ids, [-1], cfg)
        assert float(loss) == pytest.approx(0.0, abs=1e-5)
        assert stats == {"xopd_tokens": 8.0, "xopd_stopped": 0.0}
    other = student.token_embeddings(torch.tensor(tokenizer("stop")["input_ids"] * len(text)))[None].repeat(2, 1, 1)
    loss, _ = xopd_loss(student, other, teacher_ids, [-1], cfg)
    assert float(loss) > 1e-3  # other speech, other answers


def test_rollouts_stop_at_a_stop_id_and_rows_repeat_it(tiny_whisper, tiny_llama, prompt, llm) -> None:
    student = make_student(tiny_whisper, tiny_llama, prompt)
    torch.manual_seed(3)
    v = torch.randn(2, Q, llm.config.hidden_size) * 0.05
    free = rollouts(student, v, stop_ids=[-1], max_tokens=6, sample=False)
    stop = int(free.ids[0, 2])  # row 0's third greedy token, used as the stop id
    first = int((free.ids[0] == stop).nonzero()[0])  # <= 2
    answers = rollouts(student, v, stop_ids=[stop], max_tokens=6, sample=False)
    assert answers.ids[0, : first + 1].tolist() == free.ids[0, : first + 1].tolist()  # the same answer up to the stop
    assert int(answers.lengths[0]) == first + 1 and bool((answers.ids[0, first:] == stop).all())


def test_xopd_trains_the_audio_side_only(tiny_whisper, tiny_llama, prompt, tokenizer) -> None:
    student = make_student(tiny_whisper, tiny_llama, prompt, projection_init="embeddings").train()
    torch.manual_seed(4)
    encoder_out = torch.randn(2, 10, student.projection.in_features)
    teacher_ids = [teacher_input_ids(prompt, tokenizer(t)["input_ids"]) for t in ("one two", "three four")]
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    with torch.no_grad():  # fixed greedy answers, so the loss is a function of the weights alone
        answers = rollouts(student, student.audio_tokens(encoder_out), [-1], 6, sample=False)
        log_p_t = teacher_log_probs(student, teacher_ids, answers.ids)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = reverse_kl(student_log_probs(student, student.audio_tokens(encoder_out), answers.ids), log_p_t,
                          answers.mask)  # fmt: skip
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if not p.requires_grad)


def test_xopd_settings_are_checked() -> None:
    from diva.config import ConfigError

    for bad in ({"xopd_tokens": 0}, {"xopd_rollouts": 0}, {"xopd_temperature": 0.0}, {"xopd_weight": -1.0}):
        with pytest.raises(ConfigError, match="xopd"):
            StudentConfig(**bad)
    StudentConfig(distill_weight=0, align_weight=0, xopd_weight=1.0)  # X-OPD alone trains
