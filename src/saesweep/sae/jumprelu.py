"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping ahead"): a feature is its pre-activation where
that exceeds the feature's threshold, else zero; an L0 penalty trained through straight-through
estimators with a rectangle kernel of width `bandwidth`. BatchTopK and Matryoshka SAEs save as this."""

from __future__ import annotations

import torch
from torch import nn

from .base import Sae, TrainStep, mse


class JumpReluSae(Sae):
    architecture = "jumprelu"
    saelens_architecture = "jumprelu"
    sparsity_coefficient = "l0_coef"
    hyperparameters = {"l0_coef": 0.7, "threshold_init": 0.1, "bandwidth": 0.05}
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
        feature_acts = _JumpReLU.apply(pre, self.threshold, bandwidth)
        x_hat = self.decode(feature_acts)
        l0 = _Step.apply(pre, self.threshold, bandwidth).sum(dim=-1).mean()
        return TrainStep({"mse": mse(x_hat, x), "l0": self.hparams["l0_coef"] * l0}, x_hat, feature_acts)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        self.threshold.clamp_(min=1e-6)  # a negative threshold would let every feature fire


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre · H(pre − θ); d/dθ by the straight-through estimator −(θ/ε)·K((pre − θ)/ε)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        grad_threshold = -(threshold / eps) * _rectangle((pre - threshold) / eps) * grad
        return grad_pre, grad_threshold.reshape(-1, threshold.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    """H(pre − θ); d/dθ by the straight-through estimator −(1/ε)·K((pre − θ)/ε); no gradient to pre."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad
        return torch.zeros_like(pre), grad_threshold.reshape(-1, threshold.shape[-1]).sum(0), None
