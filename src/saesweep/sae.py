"""The sparse autoencoder ("dictionary").

ReLU encoder on the input centred by the decoder bias, untied decoder whose rows (the feature
directions) are kept at unit norm, L1 penalty on the feature activations (Bricken et al. 2023,
Cunningham et al. 2023). Parameter names and shapes follow SAELens/SAEBench.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class SaeOutput(NamedTuple):
    x_hat: torch.Tensor  # [..., d_in] reconstruction
    feature_acts: torch.Tensor  # [..., d_sae] non-negative feature activations


class ReluSae(nn.Module):
    architecture = "relu_l1"

    def __init__(self, d_in: int, d_sae: int, generator: torch.Generator | None = None):
        super().__init__()
        self.d_in = d_in
        self.d_sae = d_sae
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows, encoder = decoder transpose (a good start: each feature
        first reads the direction it writes)."""
        self.W_dec.normal_(generator=generator)
        self.normalize_decoder()
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def encode_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """`encode(x)[..., features]` without computing the other features: [..., len(features)]."""
        return torch.relu((x - self.b_dec) @ self.W_enc[:, features] + self.b_enc[features])

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return feature_acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> SaeOutput:
        feature_acts = self.encode(x)
        return SaeOutput(self.decode(feature_acts), feature_acts)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each (unit) decoder row: the step then moves the
        direction, not the norm, which the L1 penalty would otherwise shrink away."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor) -> None:
        """Decoder bias at the geometric median of a data sample (robust centre of the activations)."""
        self.b_dec.copy_(geometric_median(sample.float()).to(self.b_dec))

    @torch.no_grad()
    def rescaled(self, scale: float) -> ReluSae:
        """A copy that takes and returns activations `scale` times larger, with features scaled alike.

        Training runs on activations divided by `scale`; this folds the factor back so the saved SAE
        works on raw activations and keeps unit-norm decoder rows.
        """
        out = ReluSae(self.d_in, self.d_sae).to(self.W_enc.device)
        out.W_enc.copy_(self.W_enc)
        out.b_enc.copy_(self.b_enc * scale)
        out.W_dec.copy_(self.W_dec)
        out.b_dec.copy_(self.b_dec * scale)
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters()}

    @staticmethod
    def parameter_shapes(d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
        """The shapes `ReluSae(d_in, d_sae)` has, known before allocating it (a corrupt cfg.json may
        claim sizes too large to allocate)."""
        return {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}


ARCHITECTURES: dict[str, type[ReluSae]] = {ReluSae.architecture: ReluSae}


@torch.no_grad()
def geometric_median(points: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to `points` [n, d]."""
    median = points.mean(dim=0)
    for _ in range(iters):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        updated = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if (updated - median).norm() <= tol * median.norm().clamp_min(1.0):
            return updated
        median = updated
    return median
