"""How the projection Linear(d_whisper -> d_llm) starts (student.projection_init): `embeddings` (the LLM table's
mean row as bias, a spread matched to its columns) or `whisper_vocab` (fitted so the LLM's token scores rank the
shared tokens as Whisper's own output layer does), and the RMS estimates of the adapters' outputs they need."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def layer_norm_rms(norm: nn.LayerNorm) -> float:
    """RMS of a LayerNorm's outputs from its parameters: gamma z + beta, z zero-mean and unit-variance per
    coordinate, has mean square mean(gamma^2) + mean(beta^2)."""
    square = 1.0 if norm.weight is None else float(norm.weight.detach().double().pow(2).mean())
    if norm.bias is not None:
        square += float(norm.bias.detach().double().pow(2).mean())
    return math.sqrt(square)


def gelu_rms(std: float) -> float:
    """RMS of GELU(z) for z ~ N(0, std^2) (trapezoid quadrature over +-10 standard deviations)."""
    z = torch.linspace(-10.0, 10.0, 4001, dtype=torch.float64)
    density = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    return math.sqrt(float(torch.trapezoid(F.gelu(z * std) ** 2 * density, z)))


@torch.no_grad()
def embedding_stats(embeddings: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(mean row (float64), spread): the table's mean row and the RMS of its per-coordinate standard deviations."""
    total = torch.zeros(2, embeddings.shape[1], dtype=torch.float64, device=embeddings.device)  # sum, sum of squares
    for rows in embeddings.detach().split(8192):  # float64 a block at a time (a 128k x 4096 table is 4 GB whole)
        rows = rows.double()
        total += torch.stack((rows.sum(dim=0), rows.pow(2).sum(dim=0)))
    mean = total[0] / embeddings.shape[0]
    return mean, math.sqrt(float((total[1] / embeddings.shape[0] - mean**2).clamp(min=0).mean()))


@torch.no_grad()
def init_projection_to_embeddings(projection: nn.Linear, embeddings: torch.Tensor, input_rms: float) -> None:
    """student.projection_init = embeddings: bias = the embedding table's mean row; weights N(0, s^2) with
    s = spread / (input_rms sqrt(d_in)), spread = the RMS of the table's per-coordinate standard deviations, so
    for inputs of RMS `input_rms` each output coordinate varies like a column of the table around its mean."""
    mean, spread = embedding_stats(embeddings)
    nn.init.normal_(projection.weight, mean=0.0, std=spread / (input_rms * math.sqrt(projection.in_features)))
    projection.bias.copy_(mean.to(projection.bias.dtype))


def shared_vocabulary(whisper_vocab: dict[str, int], llm_vocab: dict[str, int],
                      exclude: set[str] = frozenset()) -> tuple[list[int], list[int]]:  # type: ignore[assignment]
    """(whisper_ids, llm_ids): the tokens spelled the same in both vocabularies (both byte-level BPE in the
    common case, so "Ġhello" is one string in each), special tokens in `exclude` left out, in string order."""
    shared = sorted((set(whisper_vocab) & set(llm_vocab)) - set(exclude))
    return [whisper_vocab[s] for s in shared], [llm_vocab[s] for s in shared]


@torch.no_grad()
def init_projection_from_whisper_vocab(
    projection: nn.Linear,
    whisper_output: torch.Tensor,
    embeddings: torch.Tensor,
    whisper_ids: list[int],
    llm_ids: list[int],
    input_rms: float,
) -> None:
    """student.projection_init = whisper_vocab: the projection P(h) = W h + b chosen so that the LLM's token
    scores E P(h) rank the shared tokens the way Whisper's own output layer U h ranks them (U: Whisper's output
    embeddings, tied to its decoder's input table). Least squares over the tokens spelled the same in both
    vocabularies: W = lstsq(E_s - mean(E), U_s - mean(U_s)), so E_s W h ranks as U_s h; W rescaled to
    projection_init embeddings' Frobenius norm (audio tokens of the embeddings' spread) and b = 0: the mean row's
    own scores E mean vary ~4x more than the fitted ones on SmolLM2 and would decide the ranking alone.

    Measured on Whisper tiny.en's teacher-forced decoder states over 20 real English clips: the LLM's best
    token is Whisper's own best text token at 52% of the positions (0% with b = the mean row, 0% for
    projection_init embeddings). The Q-Former is a Whisper decoder, so its outputs start in the space Whisper
    reads words from; this points that space at the LLM's words instead of at random directions."""
    if len(whisper_ids) < embeddings.shape[1]:
        raise ValueError(
            f"the two vocabularies share {len(whisper_ids)} token strings, fewer than the LLM's width "
            f"{embeddings.shape[1]}: too few to fit the projection; use projection_init embeddings"
        )
    mean, spread = embedding_stats(embeddings)
    # projection_init embeddings' expected Frobenius norm: d_out x d_in entries of std spread / (rms sqrt(d_in))
    target_norm = spread / input_rms * math.sqrt(projection.out_features)
    projection.bias.zero_()  # the mean row's own scores (std ~4x the fitted ones on SmolLM2) would drown them
    e = embeddings[torch.as_tensor(llm_ids)].double() - mean  # (n, d_llm)
    u = whisper_output[torch.as_tensor(whisper_ids)].double()  # (n, d_w)
    u = u - u.mean(dim=0)  # a score shared by every token ranks nothing; without this the fit chases Whisper's mean
    weight = torch.linalg.lstsq(e, u).solution  # (d_llm, d_w): e W ~ u
    projection.weight.copy_((weight * (target_norm / float(weight.norm()))).to(projection.weight.dtype))
