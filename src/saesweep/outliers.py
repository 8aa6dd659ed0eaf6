"""Outlier dimensions of the residual stream, and features that line up with one (the seed's observation
that its most persistent feature "appears to line up with the emergent outlier dimensions").

A residual dimension is an *outlier* when its mean magnitude over held-out tokens, E|x_d|, lies more than
`OUTLIER_SIGMAS` (3) standard deviations above the mean of that magnitude over all dimensions (the rule
of Kovaleva et al. 2021, "BERT Busters", and Puccetti et al. 2022). A feature is aligned with dimension d
by |cos(decoder row, e_d)|: its share of the unit direction along that basis vector; random directions
in d_in dimensions have largest |cos| around √(2 ln d_in / d_in) (≈ 0.15 at d_in 512).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OUTLIER_SIGMAS = 3.0


@dataclass(frozen=True)
class OutlierDimensions:
    mean_magnitude: torch.Tensor  # [d_in] E|x_d|
    dimensions: torch.Tensor  # the outlier dimensions, by decreasing magnitude
    threshold: float  # the magnitude above which a dimension is an outlier


class MagnitudeSums:
    """Σ|x_d|, Σ over tokens, kept while held-out activations stream past."""

    def __init__(self, d_in: int):
        self.abs_sum = torch.zeros(d_in, dtype=torch.float64)
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.abs_sum += x.abs().sum(0, dtype=torch.float64).cpu()
        self.n += len(x)

    def outliers(self) -> OutlierDimensions:
        magnitude = (self.abs_sum / max(self.n, 1)).float()
        threshold = float(magnitude.mean() + OUTLIER_SIGMAS * magnitude.std())
        above = (magnitude > threshold).nonzero().squeeze(-1)
        return OutlierDimensions(magnitude, above[magnitude[above].argsort(descending=True)], threshold)


@dataclass(frozen=True)
class BasisAlignment:
    cos: torch.Tensor  # [d_sae] largest |cos| of each decoder row with a basis direction
    dimension: torch.Tensor  # [d_sae] that basis direction
    on_outlier: torch.Tensor  # [d_sae] bool: it is an outlier dimension


def basis_alignment(W_dec: torch.Tensor, outliers: OutlierDimensions) -> BasisAlignment:
    rows = W_dec.float().cpu()
    cos = rows.abs() / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    best, dimension = cos.max(dim=-1)
    return BasisAlignment(best, dimension, torch.isin(dimension, outliers.dimensions))
