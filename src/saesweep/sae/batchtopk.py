"""BatchTopK SAE (Bussmann et al. 2024): in training, the k·batch largest activations of the whole
batch are kept, so a token may use more or fewer than k features; a running threshold (the mean of
each batch's smallest kept activation) replaces the batch rule at inference, where the SAE is a
JumpReLU SAE with that threshold for every feature (as SAELens saves it)."""

from __future__ import annotations

import torch

from .base import Sae, TrainStep, mse
from .jumprelu import JumpReluSae
from .topk import TopKSae

_THRESHOLD_MOMENTUM = 0.01  # weight of each batch in the running threshold (after the first 100: a plain mean before)


class BatchTopKSae(TopKSae):
    architecture = "batchtopk"  # TopK's keys: k, aux_k, aux_coef
    inference_architecture = JumpReluSae.architecture

    def __init__(self, d_in: int, d_sae: int, generator: torch.Generator | None = None, **hyperparameters):
        super().__init__(d_in, d_sae, generator, **hyperparameters)
        self.register_buffer("running_threshold", torch.tensor(0.0))
        self.register_buffer("threshold_batches", torch.tensor(0, dtype=torch.long))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.batch_topk(self.pre_acts(x))

    forward = Sae.forward  # encode by the batch rule, then the dense decode (not TopK's per-token path)

    def batch_topk(self, pre: torch.Tensor) -> torch.Tensor:
        """Keep the k·n_tokens largest positive activations of the batch, zero the rest."""
        acts = torch.relu(pre)
        flat = acts.reshape(-1)
        n_keep = min(self.hparams["k"] * (flat.numel() // self.d_sae), flat.numel())
        values, indices = flat.topk(n_keep, sorted=False)
        return torch.zeros_like(flat).scatter(0, indices, values).reshape(acts.shape)

    def training_loss(self, x: torch.Tensor, dead: torch.Tensor) -> TrainStep:
        pre = self.pre_acts(x)
        feature_acts = self.batch_topk(pre)
        self._update_threshold(feature_acts)
        x_hat = self.decode(feature_acts)
        losses = self.reconstruction_losses(feature_acts, x_hat, x)
        aux = self.aux_latents(pre, dead)
        aux_k = self.aux_k_loss(pre.gather(-1, aux.indices), aux, x - x_hat, dead)
        losses["aux_k"] = self.hparams["aux_coef"] * aux_k
        return TrainStep(losses, x_hat, feature_acts)

    def reconstruction_losses(self, feature_acts: torch.Tensor, x_hat: torch.Tensor, x: torch.Tensor) -> dict:
        return {"mse": mse(x_hat, x)}

    @torch.no_grad()
    def _update_threshold(self, feature_acts: torch.Tensor) -> None:
        # the smallest kept activation, without a host sync; a batch with none kept changes nothing
        smallest = torch.where(feature_acts > 0, feature_acts, torch.inf).amin()
        any_kept = torch.isfinite(smallest)
        self.threshold_batches += any_kept
        weight = torch.clamp(1.0 / self.threshold_batches.clamp_min(1), min=_THRESHOLD_MOMENTUM)
        # lerp out of place: torch.func.vmap (the batched ensemble step) has no batching rule for lerp_
        self.running_threshold.copy_(torch.lerp(self.running_threshold, torch.where(any_kept, smallest, self.running_threshold), weight))

    def copy_state_to(self, other: Sae, scale: float) -> None:
        other.running_threshold.copy_(self.running_threshold * scale)

    @torch.no_grad()
    def inference_form(self) -> JumpReluSae:
        out = JumpReluSae(self.d_in, self.d_sae).to(self.W_enc.device)
        for name, tensor in self.tensors().items():
            getattr(out, name).copy_(tensor)
        out.threshold.fill_(max(float(self.running_threshold), 0.0))
        return out
