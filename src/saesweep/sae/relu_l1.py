"""ReLU SAE with an L1 penalty on the feature activations (Bricken et al. 2023, Cunningham et al. 2023)."""

from __future__ import annotations

import torch

from .base import Sae, TrainStep, mse


class ReluSae(Sae):
    architecture = "relu_l1"
    hyperparameters = {"l1_coef": 2.0}  # on activations normalised to E‖x‖² = d_in

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_acts(x))

    def encode_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc[:, features] + self.b_enc[features])

    def training_loss(self, x: torch.Tensor, dead: torch.Tensor) -> TrainStep:
        x_hat, feature_acts = self(x)
        # activations are ≥ 0, so their sum is the L1 norm; decoder rows have unit norm
        l1 = feature_acts.sum(dim=-1).mean()
        return TrainStep({"mse": mse(x_hat, x), "l1": self.hparams["l1_coef"] * l1}, x_hat, feature_acts)
