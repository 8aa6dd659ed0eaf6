"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping ahead"): a feature is its pre-activation where
that exceeds the feature's threshold, else zero; an L0 penalty trained through straight-through
estimators with a rectangle kernel of width `bandwidth`. BatchTopK and Matryoshka SAEs save as this."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import Hyperparameter, Sae, TrainStep, mse


class JumpReluSae(Sae):
    architecture = "jumprelu"
    saelens_architecture = "jumprelu"
    sparsity_coefficient = "l0_coef"
    hyperparameters = {
        "l0_coef": Hyperparameter(0.7, "the weight of the L0 penalty (through the threshold's straight-through estimator)"),
        "threshold_init": Hyperparameter(0.1, "every feature's threshold at the start", inclusive=False),
        "bandwidth": Hyperparameter(0.05, "the straight-through estimators' kernel width", inclusive=False),
    }
    per_member_hyperparameters = ("l0_coef", "threshold_init", "bandwidth")
    activation_unit_parameters = ("b_enc", "b_dec", "threshold")

    def __init__(self, d_in: int, d_sae: int, generator: torch.Generator | None = None, **hyperparameters):
        super().__init__(d_in, d_sae, generator, **hyperparameters)
        self.threshold = nn.Parameter(torch.full((d_sae,), float(self.hparams["threshold_init"])))

    @classmethod
    def parameter_shapes(cls, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
        return {**super().parameter_shapes(d_in, d_sae), "threshold": (d_sae,)}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        return pre * (pre > self.threshold)

    def encode_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec) @ self.W_enc[:, features] + self.b_enc[features]
        return pre * (pre > self.threshold[features])

    def training_loss(self, x: torch.Tensor, dead: torch.Tensor) -> TrainStep:
        pre = self.pre_acts(x)
        bandwidth = self.hparams["bandwidth"]
        feature_acts = jump_relu(pre, self.threshold, bandwidth)
        x_hat = self.decode(feature_acts)
        l0 = heaviside(pre, self.threshold, bandwidth).sum(dim=-1).mean()
        return TrainStep({"mse": mse(x_hat, x), "l0": self.hparams["l0_coef"] * l0}, x_hat, feature_acts)

    @classmethod
    @torch.no_grad()
    def after_optimizer_step(cls, saes: Sequence[Sae]) -> None:
        super().after_optimizer_step(saes)
        # a negative threshold would let every feature fire
        torch._foreach_clamp_min_([sae.threshold for sae in saes], 1e-6)


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def jump_relu(pre: torch.Tensor, threshold: torch.Tensor, bandwidth) -> torch.Tensor:
    """pre · H(pre − θ); d/dθ by the straight-through estimator −(θ/ε)·K((pre − θ)/ε)."""
    kernel = _rectangle((pre.detach() - threshold.detach()) / bandwidth)
    return pre * (pre > threshold) + _straight_through(threshold, -(threshold.detach() / bandwidth) * kernel)


def heaviside(pre: torch.Tensor, threshold: torch.Tensor, bandwidth) -> torch.Tensor:
    """H(pre − θ); d/dθ by the straight-through estimator −(1/ε)·K((pre − θ)/ε); no gradient to pre."""
    kernel = _rectangle((pre.detach() - threshold.detach()) / bandwidth)
    return (pre > threshold).to(pre.dtype) + _straight_through(threshold, -(1.0 / bandwidth) * kernel)


def _straight_through(threshold: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Zero in value, with `grad` as its gradient to `threshold`: plain autograd, where custom
    autograd.Functions would need rules of their own for torch.func.vmap (the batched ensemble step)."""
    return (threshold - threshold.detach()) * grad.detach()
