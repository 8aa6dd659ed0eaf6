"""ReLU SAE with an L1 penalty on the feature activations (Bricken et al. 2023, Cunningham et al. 2023),
with optional resampling of dead features (Anthropic's "Towards Monosemanticity" recipe)."""

from __future__ import annotations

import torch

from .base import Hyperparameter, Sae, TrainStep, mse


class ReluSae(Sae):
    architecture = "relu_l1"
    saelens_architecture = "standard"
    sparsity_coefficient = "l1_coef"
    hyperparameters = {
        "l1_coef": Hyperparameter(2.0, "the L1 penalty's weight, on activations normalised to E‖x‖² = d_in"),
        "resample_every_tokens": Hyperparameter(
            None, "re-initialise the features dead over train.dead_window_tokens each time this many training "
            "tokens pass (null: never)", integer=True, lowest=1),
        # Anthropic's April 2024 update, SAELens's decoder_init_norm: small first activations, fewer features killed early
        "encoder_init_norm": Hyperparameter(0.1, "each encoder column starts as its decoder row times this",
                                            inclusive=False),
    }
    per_member_hyperparameters = ("l1_coef", "encoder_init_norm")

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        self.W_enc.mul_(self.hparams["encoder_init_norm"])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_acts(x))

    def encode_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc[:, features] + self.b_enc[features])

    def training_loss(self, x: torch.Tensor, dead: torch.Tensor) -> TrainStep:
        x_hat, feature_acts = self(x)
        # activations are ≥ 0, so their sum is the L1 norm; decoder rows have unit norm
        l1 = feature_acts.sum(dim=-1).mean()
        return TrainStep({"mse": mse(x_hat, x), "l1": self.hparams["l1_coef"] * l1}, x_hat, feature_acts)

    def revives_after(self, tokens_seen: int, step_tokens: int) -> bool:
        """Every resample_every_tokens training tokens (0: never)."""
        every = self.hparams["resample_every_tokens"]
        return bool(every) and tokens_seen // every != (tokens_seen - step_tokens) // every

    @torch.no_grad()
    def revive_dead(
        self, dead: torch.Tensor, x: torch.Tensor, optimizer: torch.optim.Optimizer, tokens_seen: int, step_tokens: int
    ) -> torch.Tensor | None:
        """Anthropic's resampling: each dead feature gets the direction of a batch input drawn with
        probability ∝ its squared reconstruction loss; its decoder row becomes that unit direction, its
        encoder column the direction scaled to 0.2 × the mean norm of the live columns, its bias 0, and
        the Adam moments of all three are reset."""
        if not dead.any():
            return None
        losses = (self(x).x_hat - x).pow(2).sum(dim=-1)
        generator = torch.Generator(device=x.device).manual_seed(int(tokens_seen))
        chosen = torch.multinomial(losses.pow(2) + 1e-12, int(dead.sum()), replacement=True, generator=generator)
        directions = x[chosen] - self.b_dec
        directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        alive_norm = self.W_enc[:, ~dead].norm(dim=0).mean() if (~dead).any() else torch.tensor(1.0)
        self.W_dec[dead] = directions
        self.W_enc[:, dead] = directions.T * 0.2 * alive_norm
        self.b_enc[dead] = 0.0
        for parameter, rows in ((self.W_dec, dead), (self.W_enc, (slice(None), dead)), (self.b_enc, dead)):
            for moment in ("exp_avg", "exp_avg_sq"):
                if moment in optimizer.state.get(parameter, {}):
                    optimizer.state[parameter][moment][rows] = 0.0
        return dead.clone()
