"""Dictionaries judged against the true features of synthetic activations (saesweep.synthetic).

- Recovery: the true features matched one-to-one to learned ones (Hungarian assignment on decoder
  cosine) at cos ≥ `threshold` (0.9), and the mean over true features of their best cosine with any
  learned feature (MMCS to the truth). A learned feature is *true* when its best cosine with a true
  feature reaches the threshold.
- Found again as a signal of real features: of the features a dictionary shares with another (another
  seed, a larger size), the share that are true (precision), and of its recovered true features, the
  share that are found again (recall), overall and by the true features' firing frequency.
- Absorption, for each parent/child pair of a hierarchy: the child's latent (the learned feature
  matched to the child) has absorbed the parent when its decoder direction keeps a cosine of at least
  `ABSORBED_COS` (0.3) with the parent's: it then writes part of the parent whenever the child fires,
  and the parent's own latent can stay silent on those tokens (Chanin et al. 2024, "A is for
  Absorption"). Random directions in the tested d_in have |cos| ≈ 1/√d_in, far below it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from saesweep.matching import match_rows
from saesweep.synthetic import TrueFeatures

RECOVERED_COS = 0.9
ABSORBED_COS = 0.3


@dataclass(frozen=True)
class Recovery:
    n_true: int
    recovered: int  # true features matched one-to-one at cos ≥ threshold
    mean_max_cos: float  # mean over true features of their best cosine with a learned feature
    learned_is_true: torch.Tensor  # [d_sae] bool: the learned feature's best true cosine ≥ threshold
    true_match: torch.Tensor  # [n_true] long: the learned feature matched one-to-one to each true one
    true_match_cos: torch.Tensor  # [n_true] its cosine

    @property
    def fraction(self) -> float:
        return self.recovered / self.n_true if self.n_true else float("nan")


def cosines(W_dec: torch.Tensor, truth: TrueFeatures) -> torch.Tensor:
    """[n_true, d_sae] cosine of every true direction with every learned decoder row."""
    learned = W_dec.detach().float().cpu()
    learned = learned / learned.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return truth.directions.float() @ learned.T


def recovery(W_dec: torch.Tensor, truth: TrueFeatures, threshold: float = RECOVERED_COS) -> Recovery:
    cos = cosines(W_dec, truth)
    match, match_cos = match_rows(cos).per_row_tensors(cos.shape[0])
    return Recovery(
        n_true=cos.shape[0],
        recovered=int((match_cos >= threshold).sum()),
        mean_max_cos=float(cos.max(dim=1).values.mean()),
        learned_is_true=cos.max(dim=0).values >= threshold,
        true_match=match,
        true_match_cos=match_cos,
    )


@dataclass(frozen=True)
class FoundAgainTruth:
    """How well "found again" picks out true features, for one dictionary against another."""

    found_again: int  # learned features found again
    precision: float  # of those, the share that are true
    recall: float  # of the recovered true features, the share whose latent is found again
    recall_by_frequency: list[tuple[float, float, float, int]]  # (low, high firing probability, recall, n)


def found_again_truth(
    found_again: torch.Tensor, rec: Recovery, truth: TrueFeatures, threshold: float = RECOVERED_COS,
    n_bins: int = 4,
) -> FoundAgainTruth:
    """`found_again` [d_sae] bool: which learned features another dictionary found again (MCS ≥ its
    threshold). Recall by frequency: the recovered true features in `n_bins` quantile bins of their
    firing probability."""
    found_again = found_again.cpu().bool()
    n_found = int(found_again.sum())
    precision = float((found_again & rec.learned_is_true).sum()) / n_found if n_found else float("nan")
    recovered = rec.true_match_cos >= threshold
    latent_found = torch.zeros_like(recovered)
    latent_found[recovered] = found_again[rec.true_match[recovered]]
    recall = float(latent_found[recovered].float().mean()) if recovered.any() else float("nan")
    probability = truth.firing_probability.double().numpy()
    edges = np.quantile(probability, np.linspace(0, 1, n_bins + 1))
    by_frequency = []
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = torch.as_tensor((probability >= low) & (probability <= high)) & recovered
        n = int(in_bin.sum())
        by_frequency.append((float(low), float(high), float(latent_found[in_bin].float().mean()) if n else float("nan"), n))
    return FoundAgainTruth(n_found, precision, recall, by_frequency)


@dataclass(frozen=True)
class Absorption:
    parent: int
    child: int
    child_latent: int  # the learned feature matched to the child (-1: none)
    cos_with_parent: float  # that latent's decoder cosine with the parent's direction
    absorbed: bool


def absorption(W_dec: torch.Tensor, truth: TrueFeatures, rec: Recovery) -> list[Absorption]:
    """For every parent/child pair: whether the child's latent has absorbed the parent's direction."""
    cos = cosines(W_dec, truth)
    out = []
    for parent, child in truth.hierarchy_pairs():
        latent = int(rec.true_match[child])
        with_parent = float(cos[parent, latent]) if latent >= 0 else float("nan")
        out.append(Absorption(parent, child, latent, with_parent, latent >= 0 and with_parent >= ABSORBED_COS))
    return out
