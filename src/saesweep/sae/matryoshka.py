"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024): nested prefixes of the dictionary
each reconstruct the input on their own, so the first latents learn general features and later ones
refine them instead of splitting them. Saved, like BatchTopK, as a JumpReLU SAE."""

from __future__ import annotations

import torch

from .base import Hyperparameter, mse
from .batchtopk import BatchTopKSae


class MatryoshkaBatchTopKSae(BatchTopKSae):
    architecture = "matryoshka_batchtopk"
    hyperparameters = {
        **BatchTopKSae.hyperparameters,
        "group_sizes": Hyperparameter(
            None, "latents per nested group, summing to d_sae; null: d_sae/8, d_sae/8, d_sae/4, d_sae/2 (prefixes "
            "of 1/8, 1/4, 1/2 and all of the dictionary)", positive_int_list=True),
    }

    def prefix_widths(self) -> list[int]:
        sizes = self.hparams["group_sizes"] or default_group_sizes(self.d_sae)
        widths, total = [], 0
        for size in sizes:
            total += int(size)
            widths.append(total)
        return widths

    def reconstruction_losses(self, feature_acts: torch.Tensor, x_hat: torch.Tensor, x: torch.Tensor) -> dict:
        """The full reconstruction's error, and the summed errors of the smaller prefixes (each a
        reconstruction from its first m latents alone)."""
        prefix = sum(
            mse(feature_acts[:, :m] @ self.W_dec[:m] + self.b_dec, x) for m in self.prefix_widths()[:-1]
        )
        return {"mse": mse(x_hat, x), "prefix_mse": prefix}


def default_group_sizes(d_sae: int) -> list[int]:
    eighth = d_sae // 8
    return [eighth, eighth, d_sae // 4, d_sae - 2 * eighth - d_sae // 4]
