"""The student model, its losses and features, on tiny random models: freeze flags and the trainable count,
Q-Former initialisation, loss parity with direct computations, the N >= Q rule, prefix-KV reuse, trimmed mel,
cached encoder outputs, and h_S against a direct transformers forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diva.config import ConfigError
from diva.student.model.features import encoder_frames_for, log_mel
from diva.student.model.losses import align_accuracy, align_loss, combined_loss, distill_loss, kl_loss
from diva.student.model.network import (
    DiVAStudent,
    MLPAdapter,
    QFormer,
    StudentConfig,
    pad_encoder_outputs,
    pooling_weights,
    trainable_parameter_count,
    whisper_encode,
)

Q = 8


@pytest.fixture(scope="module")
def prompt(tiny_llama: Path):
    from transformers import AutoTokenizer

    from diva.teacher_cache.prompt import build_prompt

    return build_prompt(AutoTokenizer.from_pretrained(tiny_llama))


@pytest.fixture(scope="module")
def whisper(tiny_whisper: Path):
    from transformers import WhisperModel

    return WhisperModel.from_pretrained(tiny_whisper).eval()


@pytest.fixture(scope="module")
def feature_extractor(tiny_whisper: Path):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor.from_pretrained(tiny_whisper)


def make_student(tiny_whisper: Path, tiny_llama: Path, prompt, **cfg_fields) -> DiVAStudent:
    torch.manual_seed(0)
    cfg = StudentConfig(num_queries=Q, **cfg_fields)
    return DiVAStudent.from_pretrained_parts(tiny_whisper, tiny_llama, prompt, cfg)


@pytest.fixture(scope="module")
def student(tiny_whisper: Path, tiny_llama: Path, prompt) -> DiVAStudent:
    return make_student(tiny_whisper, tiny_llama, prompt, kl_weight=1.0)


def waveforms(*seconds: float) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    t = [np.arange(int(s * 16000)) / 16000 for s in seconds]
    return [(0.3 * np.sin(2 * np.pi * 220 * x) + 0.05 * rng.standard_normal(len(x))).astype(np.float32) for x in t]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- freeze flags and trainable counts ---------------------------------------------------------------


def test_trainable_parameters_are_queries_qformer_and_projection(student: DiVAStudent, whisper) -> None:
    d_w, d_llm = whisper.config.d_model, student.projection.out_features
    decoder = whisper.decoder
    expected = (
        Q * d_w  # query vectors
        + Q * d_w  # decoder position rows used by the Q queries
        + n_params(decoder.layers)
        + n_params(decoder.layer_norm)
        + d_w * d_llm
        + d_llm  # projection with bias
    )
    assert trainable_parameter_count(student) == expected
    assert not any(p.requires_grad for p in student.encoder.parameters())
    assert not any(p.requires_grad for p in student.llm.parameters())
    assert not any(p.requires_grad for p in student.lm_head.parameters())
    trainable = {name.split(".")[0] for name, p in student.named_parameters() if p.requires_grad}
    assert trainable == {"adapter", "projection"}
    assert set(student.trainable_state_dict()) == {n for n, p in student.named_parameters() if p.requires_grad}


def test_mlp_adapter_trains_only_its_linear_and_the_projection(
    tiny_whisper, tiny_llama, prompt, whisper, feature_extractor
) -> None:
    student = make_student(tiny_whisper, tiny_llama, prompt, adapter="mlp")
    d_w, d_llm = whisper.config.d_model, student.projection.out_features
    assert isinstance(student.adapter, MLPAdapter)
    assert trainable_parameter_count(student) == (d_w * d_w + d_w) + (d_w * d_llm + d_llm)
    assert student.lm_head is None  # kl_weight 0: no lm_head kept
    out = student(*log_mel(waveforms(1.0, 2.0), feature_extractor, trim=True))
    assert out.audio_tokens.shape == (2, Q, d_llm)


@pytest.mark.parametrize("adapter", ["qformer", "mlp"])
def test_projection_init_embeddings_gives_tokens_like_the_llms_embeddings(
    tiny_whisper, tiny_llama, prompt, feature_extractor, adapter: str
) -> None:
    table = None
    spreads = {}
    for init in ("default", "embeddings"):
        student = make_student(tiny_whisper, tiny_llama, prompt, adapter=adapter, projection_init=init)
        table = student.llm.get_input_embeddings().weight.detach()
        with torch.no_grad():
            tokens = student(*log_mel(waveforms(1.0, 2.0), feature_extractor, trim=True)).audio_tokens
        # each coordinate's RMS deviation from the table's mean row, relative to the table's own spread
        deviation = (tokens - table.mean(dim=0)).pow(2).mean().sqrt()
        spreads[init] = float(deviation / table.var(dim=0).mean().sqrt())
    if adapter == "qformer":
        assert torch.allclose(student.projection.bias, table.mean(dim=0))
    assert 0.5 < spreads["embeddings"] < 2.0, spreads
    assert abs(spreads["default"] - 1) > abs(spreads["embeddings"] - 1), spreads


def test_gelu_rms_matches_sampling() -> None:
    from diva.student.model.projection_init import gelu_rms

    z = torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for std in (0.3, 1.0, 5.0):
        assert gelu_rms(std) == pytest.approx(float(torch.nn.functional.gelu(z * std).pow(2).mean().sqrt()), rel=0.01)


def test_frozen_parts_stay_in_eval_mode(student: DiVAStudent) -> None:
    student.train()
    assert student.adapter.training and student.projection.training
    assert not student.encoder.training and not student.llm.training
    student.eval()


def test_reuse_prefix_kv_refuses_a_trainable_llm(student: DiVAStudent, tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with pytest.raises(ValueError, match="frozen LLM"):
        DiVAStudent(student.encoder, student.adapter, student.projection, llm, (1,), (2,), llm_trainable=True)


# --- Q-Former initialisation --------------------------------------------------------------------------


def test_qformer_starts_from_the_whisper_decoder(student: DiVAStudent, whisper) -> None:
    qformer = student.adapter
    assert isinstance(qformer, QFormer)
    decoder_state = whisper.decoder.layers.state_dict()
    for name, value in qformer.layers.state_dict().items():
        assert torch.equal(value, decoder_state[name]), name
    assert torch.equal(qformer.layer_norm.weight, whisper.decoder.layer_norm.weight)
    assert torch.equal(qformer.positions, whisper.decoder.embed_positions.weight[:Q])
    assert qformer.queries.shape == (Q, whisper.config.d_model)
    assert 0.01 < qformer.queries.std().item() < 0.03  # N(0, 0.02^2)


def test_qformer_random_is_not_the_whisper_decoder(tiny_whisper, tiny_llama, prompt, whisper) -> None:
    student = make_student(tiny_whisper, tiny_llama, prompt, adapter="qformer_random")
    layers, decoder_layers = student.adapter.layers.state_dict(), whisper.decoder.layers.state_dict()
    assert layers.keys() == decoder_layers.keys()
    assert not torch.equal(layers["0.fc1.weight"], decoder_layers["0.fc1.weight"])
    assert not torch.equal(student.adapter.positions, whisper.decoder.embed_positions.weight[:Q])
    assert trainable_parameter_count(student) == trainable_parameter_count(
        make_student(tiny_whisper, tiny_llama, prompt)
    )


def test_qformer_refuses_more_queries_than_decoder_positions(whisper) -> None:
    with pytest.raises(ValueError, match="positions"):
        QFormer.from_whisper_decoder(whisper.decoder, whisper.config.max_target_positions + 1)


def test_qformer_self_attention_is_causal(student: DiVAStudent, whisper) -> None:
    encoder_out = torch.randn(1, 10, whisper.config.d_model)
    qformer = student.adapter
    with torch.no_grad():
        base = qformer(encoder_out)
        saved = qformer.queries[-1].clone()
        qformer.queries[-1] += 1.0  # the last query changes: earlier outputs must not
        changed = qformer(encoder_out)
        qformer.queries[-1] = saved
    torch.testing.assert_close(changed[:, :-1], base[:, :-1])
    assert not torch.allclose(changed[:, -1], base[:, -1])


# --- losses against direct computations ---------------------------------------------------------------


def test_distill_loss_is_the_mean_euclidean_norm() -> None:
    h_s, h_t = torch.randn(3, 5), torch.randn(3, 5)
    direct = sum(torch.sqrt(((h_s[b] - h_t[b]) ** 2).sum()) for b in range(3)) / 3
    torch.testing.assert_close(distill_loss(h_s, h_t), direct)


def test_align_loss_uses_the_last_n_audio_tokens() -> None:
    v = torch.randn(2, 6, 4)
    targets = [torch.randn(2, 4), torch.randn(5, 4)]
    terms = [torch.linalg.norm(v[0, 4 + n] - targets[0][n]) for n in range(2)]  # v_{Q-N+n}, 1-based n
    terms += [torch.linalg.norm(v[1, 1 + n] - targets[1][n]) for n in range(5)]
    loss, stats = align_loss(v, targets)
    torch.testing.assert_close(loss, torch.stack(terms).mean())  # mean over all (b, n), not of row means
    assert (stats.rows, stats.aligned, stats.pairs, stats.skipped, stats.truncated) == (2, 2, 7, 0, 0)


def test_long_transcripts_are_skipped_or_truncated_and_counted() -> None:
    v = torch.randn(3, 4, 2)
    targets = [torch.randn(2, 2), torch.randn(4, 2), torch.randn(9, 2)]  # N = 2 < Q; N = Q; N > Q
    loss, stats = align_loss(v, targets, "skip")
    direct = torch.stack([torch.linalg.norm(v[0, 2 + n] - targets[0][n]) for n in range(2)]).mean()
    torch.testing.assert_close(loss, direct)
    assert (stats.aligned, stats.skipped, stats.truncated, stats.pairs) == (1, 2, 0, 2)

    loss, stats = align_loss(v, targets, "truncate")
    terms = [torch.linalg.norm(v[0, 2 + n] - targets[0][n]) for n in range(2)]
    for row in (1, 2):  # the last Q - 1 = 3 tokens against v_2..v_4: v_Q still meets t_N
        kept = targets[row][-3:]
        terms += [torch.linalg.norm(v[row, 1 + n] - kept[n]) for n in range(3)]
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    assert (stats.aligned, stats.skipped, stats.truncated, stats.pairs) == (3, 0, 2, 8)


def test_first_slots_and_the_cross_entropy_alignment() -> None:
    torch.manual_seed(0)
    table = torch.randn(50, 64)  # (vocab, d): the frozen input-embedding table as the classifier
    ids = [torch.tensor([3, 7]), torch.tensor([1, 2, 3, 4, 5, 6])]  # N = 2 < Q; N = 6 > Q = 4 (truncated)
    targets = [table[i] for i in ids]
    v = torch.randn(2, 4, 64)
    loss, stats = align_loss(v, targets, "truncate", "first")  # the FIRST N slots; truncation keeps the start
    pairs = [(0, 0, 0), (0, 1, 1), (1, 0, 0), (1, 1, 1), (1, 2, 2)]  # (row, slot, transcript position)
    direct = torch.stack([torch.linalg.norm(v[b, q] - targets[b][n]) for b, q, n in pairs]).mean()
    torch.testing.assert_close(loss, direct)
    assert (stats.pairs, stats.truncated) == (5, 1)
    ce, _ = align_loss(v, targets, "truncate", "first", "ce", ids, table)
    logits = torch.stack([v[b, q] @ table.T for b, q, _ in pairs])  # (5, vocab): v E^T
    torch.testing.assert_close(ce, F.cross_entropy(logits, torch.stack([ids[b][n] for b, _, n in pairs])))
    both, _ = align_loss(v, targets, "truncate", "first", "l2+ce", ids, table)
    torch.testing.assert_close(both, direct + ce)
    last, _ = align_loss(v, targets, "truncate", "last", "ce", ids, table)  # the end kept, at the last slots
    pairs = [(0, 2, 0), (0, 3, 1), (1, 1, 3), (1, 2, 4), (1, 3, 5)]
    logits = torch.stack([v[b, q] @ table.T for b, q, _ in pairs])
    torch.testing.assert_close(last, F.cross_entropy(logits, torch.stack([ids[b][n] for b, _, n in pairs])))
    with pytest.raises(ValueError, match="needs the transcripts' ids"):
        align_loss(v, targets, "truncate", "first", "ce")


def test_align_accuracy_counts_slots_whose_best_token_is_the_transcripts() -> None:
    torch.manual_seed(0)
    table = torch.randn(50, 64)
    ids = [torch.tensor([3, 7, 9])]
    v = torch.randn(1, 5, 64) * 0.01
    v[0, 2:] = table[ids[0]]  # the last 3 slots hold the transcript's own embeddings
    assert align_accuracy(v, ids, table, layout="last") == (3, 3)
    assert align_accuracy(v, ids, table, layout="first")[0] < 3  # the first slots hold noise
    v[0, 3] = table[11]  # one slot says another word
    assert align_accuracy(v, ids, table, layout="last") == (2, 3)


def test_align_loss_with_every_row_skipped_is_a_connected_zero() -> None:
    v = torch.randn(1, 2, 3, requires_grad=True)
    loss, stats = align_loss(v, [torch.randn(5, 3)], "skip")
    loss.backward()
    assert loss.item() == 0.0 and stats.skipped == 1 and v.grad is not None


def test_kl_loss_is_teacher_to_student_kl() -> None:
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(4, 7, bias=False)
    h_s, h_t = torch.randn(2, 4), torch.randn(2, 4)
    p_t, p_s = lm_head(h_t).softmax(-1), lm_head(h_s).softmax(-1)
    direct = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    torch.testing.assert_close(kl_loss(h_s, h_t, lm_head), direct)


def test_combined_loss_weights_and_ablations(student: DiVAStudent) -> None:
    from diva.student.model.network import StudentOutput

    out = StudentOutput(h_s=torch.randn(2, 6), audio_tokens=torch.randn(2, 4, 6))
    h_t, targets = torch.randn(2, 6), [torch.randn(2, 6), torch.randn(3, 6)]
    distill, align = distill_loss(out.h_s, h_t), align_loss(out.audio_tokens, targets)[0]
    both = combined_loss(out, h_t, targets, StudentConfig(distill_weight=0.5, align_weight=2.0))
    torch.testing.assert_close(both.total, 0.5 * distill + 2.0 * align)
    assert both.align_stats is not None and both.align_stats.pairs == 5
    distill_only = combined_loss(out, h_t, None, StudentConfig(align_weight=0.0))
    assert set(distill_only.parts) == {"distill"} and distill_only.align_stats is None
    align_only = combined_loss(out, h_t, targets, StudentConfig(distill_weight=0.0))
    assert set(align_only.parts) == {"align"}
    with pytest.raises(ValueError, match="lm_head"):
        combined_loss(out, h_t, targets, StudentConfig(kl_weight=1.0))


def test_student_config_checks() -> None:
    with pytest.raises(ConfigError, match="num_queries"):
        StudentConfig(num_queries=0)
    with pytest.raises(ConfigError, match="nothing would train"):
        StudentConfig(distill_weight=0.0, align_weight=0.0)
    with pytest.raises(ConfigError, match="long_text"):
        StudentConfig(long_text="drop")  # type: ignore[arg-type]


# --- the LLM side -------------------------------------------------------------------------------------


def test_h_s_equals_a_direct_transformers_forward(student: DiVAStudent, tiny_llama: Path, prompt) -> None:
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    v = torch.randn(2, Q, llm.config.hidden_size)
    with torch.no_grad():
        h_s = student.last_hidden(v)
        embed = llm.get_input_embeddings()
        prefix = embed(torch.tensor(prompt.prefix_ids))[None].expand(2, -1, -1)
        suffix = embed(torch.tensor(prompt.suffix_ids))[None].expand(2, -1, -1)
        inputs = torch.cat([prefix, v, suffix], dim=1)
        direct = llm.model(inputs_embeds=inputs).last_hidden_state[:, -1]
        logits = llm(inputs_embeds=inputs).logits[:, -1]
    torch.testing.assert_close(h_s, direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(llm.lm_head(h_s), logits, atol=1e-4, rtol=1e-4)  # h_S is the lm_head input


def test_prefix_kv_reuse_matches_the_plain_forward(student: DiVAStudent, whisper) -> None:
    encoder_out = torch.randn(3, 12, whisper.config.d_model)
    results = []
    for reuse in (True, False):
        student.reuse_prefix_kv = reuse
        student.zero_grad()
        h_s = student(encoder_out=encoder_out).h_s
        (h_s * torch.linspace(-1, 1, h_s.shape[-1])).sum().backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
        results.append((h_s.detach(), grads))
    student.reuse_prefix_kv = True
    (h_reuse, g_reuse), (h_plain, g_plain) = results
    torch.testing.assert_close(h_reuse, h_plain, atol=1e-5, rtol=1e-5)
    assert g_reuse.keys() == g_plain.keys() and "projection.weight" in g_reuse and "adapter.queries" in g_reuse
    for name in g_reuse:
        torch.testing.assert_close(g_reuse[name], g_plain[name], atol=1e-5, rtol=1e-4, msg=name)
    student.zero_grad()


# --- encoder, trimming and features -------------------------------------------------------------------


def test_padded_encoder_call_equals_whisper_encoder(student: DiVAStudent, whisper, feature_extractor) -> None:
    features, frames = log_mel(waveforms(1.5), feature_extractor, trim=False)
    assert features.shape[-1] == 3000 and frames.tolist() == [3000]
    with torch.no_grad():
        reference = whisper.encoder(features).last_hidden_state
    ours = student.encode_audio(features, frames)
    assert not ours.requires_grad
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_trimmed_encoder_runs_and_ignores_the_batch(student: DiVAStudent, feature_extractor) -> None:
    audio = waveforms(1.0, 2.5)
    features, frames = log_mel(audio, feature_extractor, trim=True)
    assert frames.tolist() == [100, 250] and features.shape[-1] == 250
    batched = student.encode_audio(features, frames)
    assert batched.shape == (2, 125, student.encoder.config.d_model)
    # The same mel frames encoded alone, trimmed to their own length: masking makes the batch irrelevant.
    # (log_mel of the clip alone differs in its last frame: the STFT reflects the signal past its end.)
    alone = student.encode_audio(features[:1, :, :100], frames[:1])  # (1, 50, d_w)
    torch.testing.assert_close(batched[:1, :50], alone, atol=1e-5, rtol=1e-5)
    out = student(features, frames)
    assert out.h_s.shape == (2, student.projection.out_features) and torch.isfinite(out.h_s).all()


def test_cached_encoder_outputs_give_the_same_student_pass(student: DiVAStudent, feature_extractor) -> None:
    features, frames = log_mel(waveforms(0.8, 2.0), feature_extractor, trim=True)
    with torch.no_grad():
        direct = student(features, frames).h_s
        encoded = student.encode_audio(features, frames)
        per_utterance = [encoded[b, :n] for b, n in enumerate(encoder_frames_for(frames).tolist())]
        padded, lengths = pad_encoder_outputs(per_utterance[::-1])  # another batch order and padding
        cached = student(encoder_out=padded, encoder_lengths=lengths).h_s.flip(0)
    torch.testing.assert_close(cached, direct, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("trim", [False, True])
def test_log_mel_matches_the_numpy_feature_path(feature_extractor, trim: bool) -> None:
    audio = waveforms(0.7, 1.3)
    features, frames = log_mel(audio, feature_extractor, trim=trim)
    width = features.shape[-1]
    padded = np.zeros((2, width * feature_extractor.hop_length), dtype=np.float32)
    for row, wave in enumerate(audio):
        padded[row, : len(wave)] = wave
    reference = feature_extractor._np_extract_fbank_features(padded, "cpu")
    np.testing.assert_allclose(features.numpy(), reference, atol=1e-3)
    assert frames.tolist() == ([3000, 3000] if trim is False else [70, 130])


def test_log_mel_refuses_audio_past_30_s(feature_extractor) -> None:
    with pytest.raises(ValueError, match="30 s"):
        log_mel([np.zeros(16000 * 31, dtype=np.float32)], feature_extractor, trim=True)


def test_whisper_encode_refuses_odd_widths(student: DiVAStudent) -> None:
    with pytest.raises(ValueError, match="even"):
        whisper_encode(student.encoder, torch.zeros(1, 80, 101))


def test_pooling_weights_average_each_items_own_frames() -> None:
    weights = pooling_weights(torch.tensor([10, 3]), width=10, num_windows=4)  # (2, 4, 10)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4))
    assert (weights[1, :, 3:] == 0).all()  # item 1 has 3 frames: nothing past them
    assert weights[0, 0].nonzero().flatten().tolist() == [0, 1, 2]  # frames [0, 2.5) rounded outward


def test_projection_init_whisper_vocab_ranks_the_shared_tokens_as_whispers_output_layer() -> None:
    """With an LLM table that is an exact linear image of Whisper's (plus an offset), the fitted projection makes
    the LLM score the shared tokens exactly as Whisper's output layer does: its best token is Whisper's."""
    from torch import nn

    from diva.student.model.projection_init import (
        init_projection_from_whisper_vocab,
        init_projection_to_embeddings,
        shared_vocabulary,
    )

    g = torch.Generator().manual_seed(0)
    d_w, d_llm, n = 16, 24, 300
    whisper_vocab = {f"w{i}": i for i in range(n)} | {"<|sot|>": n}
    llm_vocab = {f"w{i}": n - 1 - i for i in range(n)} | {"<|im_start|>": n, "only_llm": n + 1}
    w_ids, l_ids = shared_vocabulary(whisper_vocab, llm_vocab, {"<|sot|>", "<|im_start|>"})
    assert len(w_ids) == n and all(llm_vocab[f"w{i}"] == j for i, j in zip(w_ids, l_ids, strict=True))
    u = torch.randn(n + 1, d_w, generator=g)
    mix = torch.randn(d_w, d_llm, generator=g)
    table = torch.randn(n + 2, d_llm, generator=g)
    table[torch.tensor(l_ids)] = u[torch.tensor(w_ids)] @ mix + 3.0  # the LLM's table: Whisper's, mixed and offset
    fitted, reference = nn.Linear(d_w, d_llm), nn.Linear(d_w, d_llm)
    init_projection_from_whisper_vocab(fitted, u, table, w_ids, l_ids, input_rms=1.0)
    init_projection_to_embeddings(reference, table, input_rms=1.0)
    assert torch.count_nonzero(fitted.bias) == 0  # the same norm as the embeddings initialisation, in expectation
    assert float(fitted.weight.detach().norm()) == pytest.approx(float(reference.weight.detach().norm()), rel=0.05)
    states = torch.randn(200, d_w, generator=g)  # decoder states: Whisper's best shared token vs the LLM's
    whisper_best = (states @ u[torch.tensor(w_ids)].T).argmax(-1)
    llm_best = (fitted(states) @ table[torch.tensor(l_ids)].T).argmax(-1)
    assert torch.equal(whisper_best, llm_best)
    with pytest.raises(ValueError, match="share 3 token strings"):
        init_projection_from_whisper_vocab(fitted, u, table, w_ids[:3], l_ids[:3], input_rms=1.0)


def test_projection_init_whisper_vocab_on_the_real_models_reads_whispers_words(
    whisper_tiny_en: Path, smollm2: Path, speech_dir: Path
) -> None:
    """On Whisper tiny.en and SmolLM2 (vocabularies that spell 37k tokens alike), Whisper's teacher-forced decoder
    states on a real recording, through the student's fitted projection, score Whisper's own best text token
    highest in the LLM's table at many positions; the embeddings initialisation at none."""
    from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from diva.audio import load_audio
    from diva.student.model.projection_init import shared_vocabulary
    from diva.teacher_cache.prompt import build_prompt

    prompt = build_prompt(AutoTokenizer.from_pretrained(smollm2))
    whisper = WhisperForConditionalGeneration.from_pretrained(whisper_tiny_en).eval()
    w_tok, l_tok = AutoTokenizer.from_pretrained(whisper_tiny_en), AutoTokenizer.from_pretrained(smollm2)
    samples, _ = load_audio(speech_dir / "pocketsphinx/forever_input_2_16k.wav")
    features = WhisperFeatureExtractor.from_pretrained(whisper_tiny_en)(samples, sampling_rate=16000,
                                                                          return_tensors="pt").input_features
    with torch.no_grad():
        ids = whisper.generate(features, max_new_tokens=24)  # the decoder's own transcript
        prefix = torch.tensor([w_tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])])
        out = whisper(input_features=features, decoder_input_ids=torch.cat([prefix, ids], dim=1),
                      output_hidden_states=True)  # fmt: skip
    assert "forever" in w_tok.decode(ids[0], skip_special_tokens=True).lower()  # Whisper hears the words
    shared = dict(zip(*shared_vocabulary(w_tok.get_vocab(), l_tok.get_vocab()), strict=True))
    whisper_best = out.logits[0].argmax(-1).tolist()
    text = [i for i, t in enumerate(whisper_best) if t in shared and t < w_tok.eos_token_id]  # text positions
    states = out.decoder_hidden_states[-1][0, text]  # the final-norm states that predict each text token
    expected = torch.tensor([shared[whisper_best[i]] for i in text])
    assert len(text) >= 6
    agree = {}
    for init in ("embeddings", "whisper_vocab"):
        torch.manual_seed(0)
        student = DiVAStudent.from_pretrained_parts(
            whisper_tiny_en, smollm2, prompt, StudentConfig(num_queries=4, projection_init=init)
        )
        table = student.llm.get_input_embeddings().weight
        with torch.no_grad():
            best = (student.projection(states) @ table.T).argmax(-1)
        agree[init] = float((best == expected).float().mean())
    assert agree["whisper_vocab"] >= 0.5 and agree["embeddings"] == 0.0, agree


def test_answer_agreement_is_teacher_forced_top1_along_the_whole_answer(student: DiVAStudent) -> None:
    """The evaluation's answer_top1: a system's own greedy answers score 1.0; another row's answer scores what
    feeding it one token at a time, each row alone (no padding), and comparing the argmax gives."""
    from diva.student.eval.evaluate import answer_agreement, run_rows, token_rows

    student.eval()
    rows = token_rows(student, [[5, 6, 7, 8, 9], [10, 11, 12]])  # rows of different lengths: left padding
    _, answers = run_rows(student, rows, stop_ids=[0], max_new_tokens=6)
    assert answer_agreement(student, rows, answers) == [1.0, 1.0]
    swapped = [answers[1], answers[0][:4]]
    embed = student.llm.get_input_embeddings()
    expected = []
    for row, answer in zip(rows, swapped, strict=True):
        hits = 0
        for j, token in enumerate(answer):
            x = torch.cat([row, embed(torch.tensor(answer[:j], dtype=torch.long))])
            with torch.no_grad():
                h = student.llm(inputs_embeds=x[None]).last_hidden_state[0, -1]
            hits += int(student.lm_head(h).argmax()) == token
        expected.append(hits / len(answer))
    assert answer_agreement(student, rows, swapped) == pytest.approx(expected, abs=1e-6)
    assert answer_agreement(student, rows[:1], [[]]) == [1.0]


def test_autocast_runs_the_trainable_matmuls_in_bf16_with_float32_weights(student: DiVAStudent, whisper) -> None:
    """train.autocast: under bf16 autocast the Q-Former's projections compute in bf16, the audio tokens come back
    float32, and the gradients land on the float32 master weights."""
    seen = []
    layer = student.adapter.layers[0].self_attn.q_proj
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    encoder_out = torch.randn(2, 10, whisper.config.d_model)
    try:
        student.autocast_dtype = None
        plain = student.audio_tokens(encoder_out)
        student.autocast_dtype = torch.bfloat16
        mixed = student.audio_tokens(encoder_out)
        mixed.sum().backward()
    finally:
        student.autocast_dtype = None
        handle.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert plain.dtype == mixed.dtype == torch.float32
    assert float((mixed - plain).norm() / plain.norm()) < 0.05  # bf16's 8-bit mantissa, through a few layers
    assert layer.weight.dtype == torch.float32 and layer.weight.grad is not None
    assert layer.weight.grad.dtype == torch.float32
    student.zero_grad(set_to_none=True)
