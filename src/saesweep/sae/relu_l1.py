"""ReLU SAE with an L1 penalty on the feature activations (Bricken et al. 2023, Cunningham et al. 2023),
with optional resampling of dead features (Anthropic's "Towards Monosemanticity" recipe)."""

from __future__ import annotations

import torch

from .base import RESAMPLE_EVERY_TOKENS, Hyperparameter, ResamplingSae, TrainStep, encoder_init_norm, mse


class ReluSae(ResamplingSae):
    architecture = "relu_l1"
    saelens_architecture = "standard"
    sparsity_coefficient = "l1_coef"
    hyperparameters = {
        "l1_coef": Hyperparameter(2.0, "the L1 penalty's weight, on activations normalised to E‖x‖² = d_in"),
        "resample_every_tokens": RESAMPLE_EVERY_TOKENS,
        # Anthropic's April 2024 update, SAELens's decoder_init_norm: small first activations, fewer features killed early
        "encoder_init_norm": encoder_init_norm(0.1),
    }
    per_member_hyperparameters = ("l1_coef", "encoder_init_norm")
    resampled_encoder_norm = 0.2  # Anthropic's: a revived feature starts weak and grows only where it helps

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_acts(x))

    def encode_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc[:, features] + self.b_enc[features])

    def training_loss(self, x: torch.Tensor, dead: torch.Tensor) -> TrainStep:
        x_hat, feature_acts = self(x)
        # activations are ≥ 0, so their sum is the L1 norm; decoder rows have unit norm
        l1 = feature_acts.sum(dim=-1).mean()
        return TrainStep({"mse": mse(x_hat, x), "l1": self.hparams["l1_coef"] * l1}, x_hat, feature_acts)
