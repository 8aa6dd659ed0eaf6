"""Activation similarity: two dictionaries compared by what their features do on the same tokens, not by
their decoder directions. For every feature of A, the best Pearson correlation of its activations with
any feature of B, and the one-to-one matched correlations (Hungarian assignment), against a chance
baseline: the same statistics with B's activations in a shuffled token order. This works where decoder
cosine cannot: across layers, architectures, and models that share a tokenizer.

Memory is bounded: the held-out tokens are streamed in batches and only running sums are kept (per
feature Σa, Σa², and the cross sums Σ a·bᵀ, twice: in order and shuffled), never a tokens × features
matrix of the whole set.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from saesweep.errors import ConfigError
from saesweep.matching import match_rows
from saesweep.sae import Sae


@dataclass(frozen=True)
class ActivationSimilarity:
    """A's features against B's: `best[i]` the highest correlation of A's feature i with any of B's,
    `matched[i]` its correlation with the B feature matched to it one-to-one (NaN where unmatched);
    `*_chance` the same with B's tokens shuffled. Features that never vary (dead) correlate 0."""

    correlation: torch.Tensor  # [d_sae_a, d_sae_b]
    best: torch.Tensor
    best_index: torch.Tensor
    matched: torch.Tensor
    matched_index: torch.Tensor
    best_chance: torch.Tensor
    matched_chance: torch.Tensor
    n_tokens: int

    def share_above(self, threshold: float) -> tuple[float, float]:
        """The share of A's features matched one-to-one at ≥ threshold, and the same by chance."""
        return float((self.matched >= threshold).float().mean()), float((self.matched_chance >= threshold).float().mean())


class CorrelationSums:
    """Running sums for the Pearson correlations of A's features with B's (in float64)."""

    def __init__(self, d_a: int, d_b: int, device: torch.device | str = "cpu"):
        kwargs = {"dtype": torch.float64, "device": device}
        self.n = 0
        self.sum_a, self.sq_a = torch.zeros(d_a, **kwargs), torch.zeros(d_a, **kwargs)
        self.sum_b, self.sq_b = torch.zeros(d_b, **kwargs), torch.zeros(d_b, **kwargs)
        self.cross = torch.zeros(d_a, d_b, **kwargs)
        self.cross_shuffled = torch.zeros(d_a, d_b, **kwargs)

    def update(self, a: torch.Tensor, b: torch.Tensor, generator: torch.Generator) -> None:
        """One batch of the same tokens: A's feature activations [n, d_a], B's [n, d_b]."""
        a, b = a.float(), b.float()
        self.n += len(a)
        self.sum_a += a.sum(0, dtype=torch.float64)
        self.sq_a += a.pow(2).sum(0, dtype=torch.float64)
        self.sum_b += b.sum(0, dtype=torch.float64)
        self.sq_b += b.pow(2).sum(0, dtype=torch.float64)
        self.cross += a.T @ b  # float32 per batch, summed in float64
        shuffled = torch.randperm(len(b), generator=generator).to(b.device)
        self.cross_shuffled += a.T @ b[shuffled]

    def correlations(self, shuffled: bool = False) -> torch.Tensor:
        n = self.n
        covariance = n * (self.cross_shuffled if shuffled else self.cross) - torch.outer(self.sum_a, self.sum_b)
        var_a = (n * self.sq_a - self.sum_a.pow(2)).clamp_min(0)
        var_b = (n * self.sq_b - self.sum_b.pow(2)).clamp_min(0)
        scale = torch.outer(var_a.sqrt(), var_b.sqrt())
        return torch.where(scale > 0, covariance / scale.clamp_min(1e-300), 0.0).float().cpu()


def activation_similarity(
    sae_a: Sae, sae_b: Sae, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], seed: int = 0
) -> ActivationSimilarity:
    """`batches`: (activations at A's hook [n, d_in_a], at B's hook [n, d_in_b]) for the same tokens."""
    device = sae_a.W_dec.device
    sums = CorrelationSums(sae_a.d_sae, sae_b.d_sae, device)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for x_a, x_b in batches:
            sums.update(sae_a.encode(x_a.to(device).float()), sae_b.encode(x_b.to(device).float()), generator)
    if sums.n < 2:
        raise ConfigError(f"activation similarity needs at least 2 tokens; got {sums.n}")
    correlation, chance = sums.correlations(), sums.correlations(shuffled=True)
    best, best_index = correlation.max(dim=1)
    matched_index, matched = match_rows(correlation).per_row_tensors(correlation.shape[0])
    return ActivationSimilarity(
        correlation, best, best_index, matched, matched_index, chance.max(dim=1).values, match_rows(chance).per_row_tensors(chance.shape[0])[1], sums.n
    )


def check_same_tokenizer(name_a: str, tokenizer_a, name_b: str, tokenizer_b) -> None:
    """Activations on "the same tokens" need one tokenizer: the same vocabulary, token for token."""
    vocab_a, vocab_b = tokenizer_a.get_vocab(), tokenizer_b.get_vocab()
    if vocab_a != vocab_b:
        differing = len(set(vocab_a.items()) ^ set(vocab_b.items()))
        raise ConfigError(
            f"{name_a} and {name_b} have different tokenizers ({len(vocab_a)} and {len(vocab_b)} tokens, {differing} "
            "entries differ): their features cannot be compared on the same tokens"
        )


def agreement_with_decoder_matching(similarity: ActivationSimilarity, decoder_index: np.ndarray | torch.Tensor) -> float:
    """The share of A's features whose activation-matched B feature is the one decoder MCS matched to it
    (`decoder_index[i]`: B's feature matched to A's feature i by decoder cosine, -1 unmatched)."""
    decoder_index = torch.as_tensor(decoder_index, dtype=torch.long)
    both = (decoder_index >= 0) & (similarity.matched_index >= 0)
    return float((similarity.matched_index[both] == decoder_index[both]).float().mean()) if both.any() else float("nan")
