"""Gated SAE (Rajamanoharan et al. 2024, "Improving dictionary learning with gated sparse
autoencoders"): a gate path decides which features fire, a magnitude path (sharing the gate's
weights up to a per-feature scale) how strongly; the L1 penalty acts on the gate only, so it does
not shrink the magnitudes. Tensor names as SAELens: W_enc, b_gate, r_mag, b_mag, W_dec, b_dec."""

from __future__ import annotations

import torch
from torch import nn

from .base import Hyperparameter, Sae, TrainStep, encoder_affine, mse


class GatedSae(Sae):
    architecture = "gated"
    saelens_architecture = "gated"
    sparsity_coefficient = "l1_coef"
    hyperparameters = {"l1_coef": Hyperparameter(2.0, "the L1 penalty's weight on the gate's activations")}
    per_member_hyperparameters = ("l1_coef",)
    activation_unit_parameters = ("b_gate", "b_mag", "b_dec")

    def __init__(self, d_in: int, d_sae: int, generator: torch.Generator | None = None, **hyperparameters):
        super().__init__(d_in, d_sae, generator, **hyperparameters)
        del self.b_enc  # a gated SAE has a gate and a magnitude bias instead
        self.b_gate = nn.Parameter(torch.zeros(d_sae))
        self.b_mag = nn.Parameter(torch.zeros(d_sae))
        self.r_mag = nn.Parameter(torch.zeros(d_sae))

    @classmethod
    def parameter_shapes(cls, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
        return {"W_enc": (d_in, d_sae), "b_gate": (d_sae,), "r_mag": (d_sae,), "b_mag": (d_sae,),
                "W_dec": (d_sae, d_in), "b_dec": (d_in,)}

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        for name in ("b_gate", "b_mag", "r_mag"):
            if hasattr(self, name):
                getattr(self, name).zero_()

    def _paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = encoder_affine(x, self.b_dec, self.W_enc, self.b_gate)
        magnitude = torch.relu(encoder_affine(x, self.b_dec, self.W_enc * self.r_mag.exp(), self.b_mag))
        return gate, magnitude

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return self._paths(x)[0]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        gate, magnitude = self._paths(x)
        return (gate > 0).to(magnitude.dtype) * magnitude

    def encode_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        centred = x - self.b_dec
        w = self.W_enc[:, features]
        gate = centred @ w + self.b_gate[features]
        magnitude = torch.relu(centred @ (w * self.r_mag[features].exp()) + self.b_mag[features])
        return (gate > 0).to(magnitude.dtype) * magnitude

    def training_loss(self, x: torch.Tensor, dead: torch.Tensor) -> TrainStep:
        gate, magnitude = self._paths(x)
        feature_acts = (gate > 0).to(magnitude.dtype) * magnitude
        x_hat = self.decode(feature_acts)
        gate_acts = torch.relu(gate)
        # the auxiliary term trains the gate to reconstruct through the frozen decoder
        aux_hat = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
        losses = {
            "mse": mse(x_hat, x),
            "l1": self.hparams["l1_coef"] * gate_acts.sum(dim=-1).mean(),
            "aux": mse(aux_hat, x),
        }
        return TrainStep(losses, x_hat, feature_acts)
