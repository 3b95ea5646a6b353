"""The DiVA student, readable top to bottom.

    mel (B, n_mels, T)  -> frozen Whisper encoder                  -> (B, T_enc, d_w)
                        -> adapter: Q-Former (a Whisper decoder fed Q learned queries) or MLP -> (B, Q, d_w)
                        -> projection Linear(d_w -> d_llm, bias)  => audio tokens v (B, Q, d_llm)
    [embed(prefix), v, embed(suffix)]  -> frozen LLM -> h_S = final hidden state at the last position (B, d_llm)

Like torchtune's DeepFusionModel, `DiVAStudent` is assembled from injected parts with explicit freeze flags;
`from_pretrained_parts` builds those parts from a Whisper folder, an LLM folder and the cache's prompt.
Only the queries, the Q-Former (or MLP) and the projection train. Works with any Whisper size and any
transformers decoder-only LLM whose backbone (`get_decoder()`) returns the final-norm output as
`last_hidden_state`, the same reading of h as the teacher cache's.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diva.config import StudentConfig
from diva.student.model.features import encoder_frames_for
from diva.student.model.projection_init import (
    gelu_rms,
    init_projection_from_whisper_vocab,
    init_projection_to_embeddings,
    layer_norm_rms,
    shared_vocabulary,
)


@dataclass
class StudentOutput:
    """What one student forward returns."""

    h_s: torch.Tensor  # (B, d_llm) final hidden state at the last suffix position
    audio_tokens: torch.Tensor  # (B, Q, d_llm) the projected adapter outputs v, before any cast to the LLM dtype
    logits_last: torch.Tensor | None = None  # (B, vocab) lm_head(h_s), only when asked for
    answer_hidden: torch.Tensor | None = None  # (B, K, d_llm) with answer_ids: where answer token k is predicted


# --- masks ------------------------------------------------------------------------------------------


def key_padding_mask(lengths: torch.Tensor | None, width: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive mask (B, 1, 1, width) hiding keys at or past each item's length; None when nothing is hidden."""
    if lengths is None or bool((lengths >= width).all()):
        return None
    keep = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]  # (B, width)
    mask = torch.zeros(keep.shape, dtype=dtype, device=lengths.device).masked_fill(~keep, torch.finfo(dtype).min)
    return mask[:, None, None, :]  # (B, 1, 1, width)


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive causal mask (1, 1, length, length): query i sees keys 0..i (explicit, so eager attention is causal)."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask[None, None]  # (1, 1, L, L)


# --- gradient checkpointing -------------------------------------------------------------------------


def checkpoint_layers(layers: nn.ModuleList) -> None:
    """Activation checkpointing per layer: each layer keeps only its inputs in the forward and runs again in the
    backward (torch.utils.checkpoint, non-reentrant: gradients reach frozen layers' inputs; the RNG state is
    restored, so dropout draws the same). Only while autograd records; calling it twice changes nothing.

    The layer's `forward` is replaced on the instance, so parameter names and state dicts stay the same."""
    for layer in layers:
        if getattr(layer, "_diva_checkpointed", False):
            continue
        forward = layer.forward

        def checkpointed(*args: Any, _forward: Any = forward, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = checkpointed
        layer._diva_checkpointed = True


def _read_only_update(layer: Any, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
    """A prefix cache layer's `update` that returns [prefix, new] keys/values without storing the new ones."""
    return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


def read_only_prefix(cache: Any) -> Any:
    """Make a transformers DynamicCache of the prompt prefix read-only: a checkpointed layer's recompute in the
    backward must see the prefix alone again, not the prefix plus the keys its forward appended."""
    import types

    from transformers.cache_utils import DynamicLayer

    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise ValueError(
                f"gradient checkpointing with reuse_prefix_kv needs a plain DynamicCache, this LLM's has "
                f"{type(layer).__name__} layers; set student.reuse_prefix_kv=false"
            )
        layer.update = types.MethodType(_read_only_update, layer)
    return cache


# --- the frozen encoder -----------------------------------------------------------------------------


def whisper_encode(encoder: nn.Module, features: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
    """Run a transformers WhisperEncoder on (B, n_mels, T) mel features of any even T <= 2 * max_source_positions.

    Same computation as WhisperEncoder.forward, which insists on exactly 30 s; here the position table is
    sliced to the T/2 encoder frames. With `frames` (B,), each item's mel past its own frames is zeroed and
    those encoder frames are masked out of self-attention, so an item's mel frames encode the same as alone,
    trimmed to their own length (zeroing makes the convolutions' right edge see what a trimmed input's zero
    padding gives).
    """
    width = features.shape[-1]
    max_width = 2 * encoder.embed_positions.num_embeddings
    if width % 2 or width > max_width:
        raise ValueError(f"mel width {width} must be even and at most {max_width} (Whisper's 30 s)")
    if frames is not None and bool((frames < width).any()):
        keep = torch.arange(width, device=features.device)[None, :] < frames[:, None].to(features.device)  # (B, T)
        features = features * keep[:, None, :].to(features.dtype)  # (B, n_mels, T)
    x = F.gelu(encoder.conv1(features))  # (B, d_w, T)
    x = F.gelu(encoder.conv2(x))  # (B, d_w, T/2): the stride-2 conv halves the frames
    x = x.permute(0, 2, 1)  # (B, T_enc, d_w)
    x = x + encoder.embed_positions.weight[: x.shape[1]]  # the position table, sliced to T_enc rows
    x = F.dropout(x, p=encoder.dropout, training=encoder.training)
    lengths = None if frames is None else encoder_frames_for(frames.to(x.device))
    mask = key_padding_mask(lengths, x.shape[1], x.dtype)  # (B, 1, 1, T_enc) or None
    for layer in encoder.layers:
        x = layer(x, mask)
    return encoder.layer_norm(x)  # (B, T_enc, d_w)


def pad_encoder_outputs(outputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-utterance encoder outputs (T_b, d_w) into (B, T_max, d_w) zero-padded, with lengths (B,).

    For encoder outputs cached per utterance: the adapters mask frames past each length, so the zeros are unseen.
    """
    lengths = torch.tensor([o.shape[0] for o in outputs], dtype=torch.long)
    padded = outputs[0].new_zeros(len(outputs), int(lengths.max()), outputs[0].shape[-1])  # (B, T_max, d_w)
    for row, out in enumerate(outputs):
        padded[row, : out.shape[0]] = out
    return padded, lengths


# --- adapters: encoder frames (B, T_enc, d_w) -> (B, Q, d_w) ------------------------------------------


class QFormer(nn.Module):
    """A Whisper decoder fed Q learned query vectors instead of token embeddings (DiVA's Q-Former).

    The decoder's position embeddings are added to the queries, self-attention is causal (later queries see
    earlier ones), cross-attention sees every encoder frame (past an item's length when lengths are given),
    and the decoder's final LayerNorm is applied. The decoder's token embedding table is not used.
    """

    def __init__(
        self, layers: nn.ModuleList, positions: torch.Tensor, layer_norm: nn.LayerNorm, num_queries: int, dropout: float
    ) -> None:
        super().__init__()
        if num_queries > positions.shape[0]:
            raise ValueError(f"num_queries {num_queries} exceeds the Whisper decoder's {positions.shape[0]} positions")
        d = positions.shape[-1]
        self.queries = nn.Parameter(torch.empty(num_queries, d, dtype=positions.dtype))
        nn.init.normal_(self.queries, mean=0.0, std=0.02)  # N(0, 0.02^2), as the paper
        self.positions = nn.Parameter(positions[:num_queries].detach().clone())  # (Q, d): only the rows used
        self.layers = layers
        self.layer_norm = layer_norm
        self.dropout = dropout

    @classmethod
    def from_whisper_decoder(cls, decoder: nn.Module, num_queries: int, random_init: bool = False) -> QFormer:
        """Take the layers, position table and final norm of a transformers WhisperDecoder (or fresh random ones)."""
        if random_init:  # same shapes, Whisper's own initialisation (normal, std = config.init_std)
            decoder = type(decoder)(decoder.config).to(decoder.embed_positions.weight.dtype)
        return cls(decoder.layers, decoder.embed_positions.weight, decoder.layer_norm, num_queries, decoder.dropout)

    def forward(self, encoder_out: torch.Tensor, encoder_lengths: torch.Tensor | None = None) -> torch.Tensor:
        batch, num_queries = encoder_out.shape[0], self.queries.shape[0]
        x = (self.queries + self.positions).expand(batch, num_queries, -1)  # (B, Q, d_w)
        x = F.dropout(x, p=self.dropout, training=self.training)
        self_mask = causal_mask(num_queries, x.dtype, x.device)  # (1, 1, Q, Q)
        cross_mask = key_padding_mask(encoder_lengths, encoder_out.shape[1], x.dtype)  # (B, 1, 1, T_enc) or None
        for layer in self.layers:
            x = layer(
                x,
                attention_mask=self_mask,
                encoder_hidden_states=encoder_out,
                encoder_attention_mask=cross_mask,
                past_key_values=None,
                use_cache=False,
            )
        return self.layer_norm(x)  # (B, Q, d_w)

    def output_rms(self, encoder_rms: float) -> float:
        """The RMS of the outputs, estimated from the final LayerNorm's parameters (projection_init)."""
        return layer_norm_rms(self.layer_norm)


def pooling_weights(lengths: torch.Tensor, width: int, num_windows: int) -> torch.Tensor:
    """(B, Q, width) averaging weights: window q of item b covers frames [q L_b / Q, (q + 1) L_b / Q) rounded
    outward, as adaptive_avg_pool1d does over the item's own L_b frames (each window has at least one frame)."""
    q = torch.arange(num_windows, device=lengths.device)[None, :]  # (1, Q)
    length = lengths[:, None]  # (B, 1)
    start = (q * length) // num_windows  # (B, Q)
    end = ((q + 1) * length + num_windows - 1) // num_windows  # (B, Q)
    t = torch.arange(width, device=lengths.device)[None, None, :]  # (1, 1, T)
    inside = (t >= start[..., None]) & (t < end[..., None])  # (B, Q, T)
    return inside.float() / (end - start)[..., None].float()


class MLPAdapter(nn.Module):
    """The MLP ablation: each item's encoder frames average-pooled into Q windows, then Linear + GELU.

    With the projection after it this is a two-layer MLP. Pooling into exactly Q windows (rather than a fixed
    number of frames per token) keeps Q audio tokens per utterance, so the LLM input, the alignment loss and
    the cost match the Q-Former's (paper preset: 1,500 frames into 448 windows, ~3.3 frames each).
    """

    def __init__(self, d_whisper: int, num_queries: int) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.fc = nn.Linear(d_whisper, d_whisper)

    def forward(self, encoder_out: torch.Tensor, encoder_lengths: torch.Tensor | None = None) -> torch.Tensor:
        batch, width = encoder_out.shape[:2]
        if encoder_lengths is None:
            encoder_lengths = torch.full((batch,), width, dtype=torch.long, device=encoder_out.device)
        weights = pooling_weights(encoder_lengths.to(encoder_out.device), width, self.num_queries)  # (B, Q, T_enc)
        pooled = weights.to(encoder_out.dtype) @ encoder_out  # (B, Q, d_w)
        return F.gelu(self.fc(pooled))  # (B, Q, d_w)

    def output_rms(self, encoder_rms: float) -> float:
        """The RMS of the outputs for encoder frames of RMS `encoder_rms` (pooling keeps it, roughly): the fc's
        pre-activations have std encoder_rms x sqrt(d) x std(fc.weight); GELU of that Gaussian."""
        weight = self.fc.weight.detach().double()
        return gelu_rms(encoder_rms * math.sqrt(weight.shape[1]) * float(weight.std()))


def build_adapter(kind: str, decoder: nn.Module, num_queries: int) -> nn.Module:
    """The adapter named by StudentConfig.adapter, shaped after a transformers WhisperDecoder."""
    if kind == "qformer":
        return QFormer.from_whisper_decoder(decoder, num_queries)
    if kind == "qformer_random":
        return QFormer.from_whisper_decoder(decoder, num_queries, random_init=True)
    if kind == "mlp":
        return MLPAdapter(decoder.config.d_model, num_queries)
    raise ValueError(f"unknown adapter {kind!r}; choose qformer, qformer_random or mlp")


# --- the student --------------------------------------------------------------------------------------


class DiVAStudent(nn.Module):
    """Frozen Whisper encoder -> adapter -> projection -> frozen LLM; h_S at the last suffix position.

    Args:
        encoder: a transformers WhisperEncoder.
        adapter: QFormer or MLPAdapter, (B, T_enc, d_w) -> (B, Q, d_w).
        projection: Linear(d_w -> d_llm, bias).
        llm: a transformers causal LM; its backbone (`get_decoder()`) is kept, its lm_head only if `keep_lm_head`.
        prefix_ids, suffix_ids: the prompt ids stored in the cache index (never a fresh template render).
        encoder_trainable, llm_trainable: freeze flags (both False in DiVA).
        reuse_prefix_kv: compute the prefix's keys/values once per batch (needs a frozen LLM).
        trim_mel: whether its mel features are trimmed to the audio (StudentConfig.trim_mel), for inference.
    """

    def __init__(
        self,
        encoder: nn.Module,
        adapter: nn.Module,
        projection: nn.Linear,
        llm: nn.Module,
        prefix_ids: tuple[int, ...] | list[int],
        suffix_ids: tuple[int, ...] | list[int],
        *,
        encoder_trainable: bool = False,
        llm_trainable: bool = False,
        reuse_prefix_kv: bool = True,
        keep_lm_head: bool = False,
        trim_mel: bool = True,
    ) -> None:
        super().__init__()
        if reuse_prefix_kv and llm_trainable:
            raise ValueError("reuse_prefix_kv computes the prefix without gradient; it needs a frozen LLM")
        if not suffix_ids:
            raise ValueError("the prompt has no suffix ids; h_S is read at the suffix's last position")
        self.encoder = encoder
        self.adapter = adapter
        self.projection = projection
        self.llm = llm.get_decoder()  # the backbone: last_hidden_state is after the final norm (the lm_head input)
        self.lm_head = llm.get_output_embeddings() if keep_lm_head else None
        vocab = self.llm.get_input_embeddings().num_embeddings
        if max(*prefix_ids, *suffix_ids, 0) >= vocab:
            raise ValueError(f"prompt ids reach {max(*prefix_ids, *suffix_ids)} but the LLM has {vocab} tokens")
        self.register_buffer("prefix_ids", torch.tensor(list(prefix_ids), dtype=torch.long), persistent=False)
        self.register_buffer("suffix_ids", torch.tensor(list(suffix_ids), dtype=torch.long), persistent=False)
        self.encoder_trainable = encoder_trainable
        self.llm_trainable = llm_trainable
        self.reuse_prefix_kv = reuse_prefix_kv
        self.trim_mel = trim_mel  # how it was trained (StudentConfig.trim_mel): inference featurises the same way
        # train.autocast: the trainable parts' matmuls in bf16 (float32 master weights); None: float32 throughout
        self.autocast_dtype: torch.dtype | None = None
        self.gradient_checkpointing = False
        self.encoder.requires_grad_(encoder_trainable)
        self.llm.requires_grad_(llm_trainable)
        if self.lm_head is not None:
            self.lm_head.requires_grad_(llm_trainable)
        self.train(self.training)

    @classmethod
    def from_pretrained_parts(
        cls,
        whisper_dir: str | Path,
        llm_dir: str | Path,
        prompt: Any,
        cfg: StudentConfig,
        dtype: torch.dtype = torch.float32,
        keep_lm_head: bool | None = None,
    ) -> DiVAStudent:
        """Build the student from a Whisper folder, an LLM folder and the cache's PromptSpec.

        The frozen encoder and LLM are held in `dtype`; the trainable parts stay float32 (master weights).
        The LLM's lm_head is kept when `keep_lm_head` (generation), by default only when the KL loss uses it.
        """
        from transformers import AutoModelForCausalLM, WhisperModel

        whisper = WhisperModel.from_pretrained(whisper_dir, dtype=torch.float32)
        adapter = build_adapter(cfg.adapter, whisper.get_decoder(), cfg.num_queries)
        encoder = whisper.get_encoder().to(dtype)
        llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype)
        d_llm = int(llm.config.get_text_config().hidden_size)
        projection = nn.Linear(whisper.config.d_model, d_llm, bias=True)
        encoder_rms = layer_norm_rms(whisper.get_encoder().layer_norm)
        if cfg.projection_init == "embeddings":
            init_projection_to_embeddings(
                projection, llm.get_input_embeddings().weight, adapter.output_rms(encoder_rms)
            )
        elif cfg.projection_init == "whisper_vocab":
            from transformers import AutoTokenizer

            whisper_tok, llm_tok = AutoTokenizer.from_pretrained(whisper_dir), AutoTokenizer.from_pretrained(llm_dir)
            whisper_ids, llm_ids = shared_vocabulary(
                whisper_tok.get_vocab(), llm_tok.get_vocab(),
                set(whisper_tok.all_special_tokens) | set(llm_tok.all_special_tokens),
            )  # fmt: skip
            init_projection_from_whisper_vocab(
                projection, whisper.get_decoder().embed_tokens.weight, llm.get_input_embeddings().weight,
                whisper_ids, llm_ids, adapter.output_rms(encoder_rms),
            )  # fmt: skip
        return cls(
            encoder,
            adapter,
            projection,
            llm,
            prompt.prefix_ids,
            prompt.suffix_ids,
            reuse_prefix_kv=cfg.reuse_prefix_kv,
            keep_lm_head=needs_lm_head(cfg) if keep_lm_head is None else keep_lm_head,
            trim_mel=cfg.trim_mel,
        )

    def train(self, mode: bool = True) -> DiVAStudent:
        """Set training mode; frozen parts always stay in eval mode (no dropout in what does not learn)."""
        super().train(mode)
        if not self.encoder_trainable:
            self.encoder.eval()
        if not self.llm_trainable:
            self.llm.eval()
            if self.lm_head is not None:
                self.lm_head.eval()
        return self

    def enable_gradient_checkpointing(self) -> DiVAStudent:
        """Activation checkpointing over the Q-Former's decoder layers and the LLM's layers (`checkpoint_layers`):
        same losses and gradients, activations of one layer at a time in the backward instead of all.

        Not transformers' `gradient_checkpointing_enable`: its layers checkpoint only in training mode (the frozen
        LLM stays in eval mode) and drop `past_key_values` (the reused prefix keys/values) when they do."""
        if isinstance(self.adapter, QFormer):
            checkpoint_layers(self.adapter.layers)
        layers = getattr(self.llm, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"{type(self.llm).__name__} has no `layers` list to checkpoint")
        checkpoint_layers(layers)
        self.gradient_checkpointing = True
        return self

    def encode_audio(self, features: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder outputs (B, T_enc, d_w) of mel features (B, n_mels, T); no gradient while the encoder is frozen.

        The trainer may cache them per utterance: item b's frames are [:encoder_frames_for(frames)[b]].
        """
        dtype = self.encoder.conv1.weight.dtype
        grad = contextlib.nullcontext() if self.encoder_trainable else torch.no_grad()
        with grad:
            return whisper_encode(self.encoder, features.to(dtype), frames)

    def audio_tokens(self, encoder_out: torch.Tensor, encoder_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The audio tokens v (B, Q, d_llm): adapter then projection, in the trainable parts' dtype (float32; their
        matmuls under autocast in `autocast_dtype` when it is set, the weights and the result staying float32)."""
        dtype = self.projection.weight.dtype
        if self.autocast_dtype is None:
            return self.projection(self.adapter(encoder_out.to(dtype), encoder_lengths))  # (B, Q, d_llm)
        with torch.autocast(encoder_out.device.type, dtype=self.autocast_dtype):
            v = self.projection(self.adapter(encoder_out.to(dtype), encoder_lengths))
        return v.to(dtype)

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """E(t): the LLM's input embeddings of token ids (N,) -> (N, d_llm), the alignment target when the
        cache stores ids only."""
        with torch.no_grad():
            return self.llm.get_input_embeddings()(ids.to(self.prefix_ids.device))

    def last_hidden(self, audio_tokens: torch.Tensor) -> torch.Tensor:
        """h_S (B, d_llm): the LLM's final hidden state at the last position of [embed(prefix), v, embed(suffix)].

        Every item has exactly Q audio tokens, so all rows have the same length: no padding, no attention mask.
        """
        return self.hidden_after_audio(audio_tokens)[:, -1]  # (B, d_llm)

    def answer_hidden(self, audio_tokens: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
        """(B, 1 + K, d_llm): the final hidden states at the last suffix position and at each of the K answer
        tokens (B, K) fed after it: the inputs of the next-token predictions of answer token 0..K (X-OPD)."""
        answer = self.llm.get_input_embeddings()(answer_ids.to(self.prefix_ids.device))  # (B, K, d_llm)
        return self.hidden_after_audio(audio_tokens, answer)[:, -(1 + answer_ids.shape[1]) :]

    def hidden_after_audio(self, audio_tokens: torch.Tensor, tail: torch.Tensor | None = None) -> torch.Tensor:
        """The LLM's final hidden states on [embed(prefix), v, embed(suffix), tail] (tail: (B, K, d_llm) embeddings
        or None), for the positions from the first audio token on (and the prefix's when they are recomputed)."""
        embed = self.llm.get_input_embeddings()
        v = audio_tokens.to(embed.weight.dtype)  # (B, Q, d_llm)
        batch, d = v.shape[0], v.shape[-1]
        prefix = embed(self.prefix_ids)  # (P, d_llm)
        suffix = embed(self.suffix_ids)[None].expand(batch, -1, d)  # (B, S, d_llm)
        after = [v, suffix] if tail is None else [v, suffix, tail.to(v.dtype)]
        if self.reuse_prefix_kv and len(self.prefix_ids) > 0:
            # The prefix precedes the audio in a causal LLM, so its keys/values do not depend on v: compute
            # them once for one row, repeat them over the batch, and run only [v, suffix, tail] on top.
            with torch.no_grad():
                cache = self.llm(inputs_embeds=prefix[None], use_cache=True).past_key_values  # batch 1
            cache.batch_repeat_interleave(batch)
            if self.gradient_checkpointing:
                read_only_prefix(cache)
            x = torch.cat(after, dim=1)  # (B, Q + S + K, d_llm)
            return self.llm(inputs_embeds=x, past_key_values=cache, use_cache=True).last_hidden_state
        x = torch.cat([prefix[None].expand(batch, -1, d), *after], dim=1)  # (B, P + Q + S + K, d_llm)
        return self.llm(inputs_embeds=x, use_cache=False).last_hidden_state

    def forward(
        self,
        features: torch.Tensor | None = None,
        frames: torch.Tensor | None = None,
        *,
        encoder_out: torch.Tensor | None = None,
        encoder_lengths: torch.Tensor | None = None,
        return_logits: bool = False,
        answer_ids: torch.Tensor | None = None,
    ) -> StudentOutput:
        """Student pass from mel features (+ mel frames per item) or from cached encoder outputs (+ their lengths).

        Lengths (frames or encoder_lengths) mask each item's padding; None attends to every frame (the paper).
        With `answer_ids` (B, K), the teacher's answers, the LLM also reads embed(answer[:-1]) after the suffix (one
        forward) and `answer_hidden` (B, K, d_llm) holds the final hidden states that predict answer tokens 0..K-1;
        h_s is its first row. Rows padded past their answer only change positions after their own (causal).
        """
        if (features is None) == (encoder_out is None):
            raise ValueError("give exactly one of features or encoder_out")
        if encoder_out is None:
            encoder_out = self.encode_audio(features, frames)  # (B, T_enc, d_w)
            encoder_lengths = None if frames is None else encoder_frames_for(frames)
        if encoder_lengths is not None:
            encoder_lengths = encoder_lengths.to(encoder_out.device)
        v = self.audio_tokens(encoder_out, encoder_lengths)  # (B, Q, d_llm)
        answer_hidden = None
        if answer_ids is None:
            h_s = self.last_hidden(v)  # (B, d_llm)
        else:
            answer_hidden = self.answer_hidden(v, answer_ids[:, :-1])  # (B, K, d_llm)
            h_s = answer_hidden[:, 0]  # (B, d_llm)
        logits = None
        if return_logits:
            if self.lm_head is None:
                raise ValueError("this student was built without the lm_head (keep_lm_head=False)")
            logits = self.lm_head(h_s)  # (B, vocab)
        return StudentOutput(h_s=h_s, audio_tokens=v, logits_last=logits, answer_hidden=answer_hidden)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the parameters that train (queries, adapter, projection): what a checkpoint needs to hold."""
        names = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}


def needs_lm_head(cfg: StudentConfig) -> bool:
    """Whether a loss of `cfg` reads next-token probabilities (the frozen lm_head) rather than hidden states."""
    return cfg.kl_weight > 0 or cfg.xopd_weight > 0 or (cfg.answer_weight > 0 and cfg.answer_loss in ("kl", "ce"))


def trainable_parameter_count(model: nn.Module) -> int:
    """Parameters with requires_grad (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
