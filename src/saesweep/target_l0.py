"""A target L0 (`sae.target_l0=N`) for the architectures whose sparsity is set by a coefficient (ReLU/L1 and
gated: l1_coef; JumpReLU: l0_coef): a controller steers the coefficient during training so the dictionary
ends at about N active features per token, and then holds it, so the final dictionary is trained at one
fixed coefficient (recorded in cfg.json). The TopK family needs no controller: its k is set to N.

The controller, every `every` steps from the end of the learning-rate warm-up until `1 − freeze_fraction`
of the run: it measures the L0 of each controlled SAE on the step's batch (one host read per adjustment,
not per step) and moves the coefficient in log space, log c ← log c + gain · (log(L0 / N) + horizon · s),
by at most a factor `max_factor` at a time, where s is the smoothed slope of log L0 per step. L0 falls as
the coefficient rises (roughly L0 ∝ c^−β, β ≈ 1–2), so the error shrinks by about 1 − gain·β per
adjustment; gain 0.3 keeps that well inside stability. The slope term is there because a dictionary
answers a new coefficient only over tens to hundreds of steps: JumpReLU's thresholds move by about the
learning rate a step whatever the coefficient (Adam), so on the L0 alone the controller kept lowering the
coefficient while L0 was already rising towards the target, and L0 went on rising after the freeze
(+17 % to +37 % at targets 6 and 12 on synthetic data). Steering on where L0 is heading `horizon` steps on
ends it within ±6 % there (benchmarks/RESULTS.md). Its state is checkpointed: a resumed job continues with
the coefficient, the last L0 and the slope it had.
"""

from __future__ import annotations

import logging
import math

import lightning as L
import torch

log = logging.getLogger(__name__)


class TargetL0(L.Callback):
    """`controlled[i] = (key, target)`: SAE i's coefficient hyperparameter and its target L0."""

    def __init__(
        self, controlled: dict[int, tuple[str, float]], freeze_fraction: float = 0.25, every: int = 10,
        gain: float = 0.3, max_factor: float = 2.0, horizon: int = 100, slope_smoothing: float = 0.1,
    ):
        self.controlled = controlled
        self.freeze_fraction = freeze_fraction
        self.every, self.gain, self.max_step = every, gain, math.log(max_factor)
        self.horizon, self.slope_smoothing = horizon, slope_smoothing
        self.log_coefficients: dict[int, float] = {}
        self.log_l0s: dict[int, float] = {}  # per controlled SAE: log L0 at the last adjustment
        self.slopes: dict[int, float] = {}  # per controlled SAE: log L0's change per step, smoothed over adjustments
        self.start_steps: dict[int, int] = {}  # per controlled SAE: the end of its warm-up
        self.freeze_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        total = pl_module.total_steps
        self.start_steps = {
            i: pl_module.recipes[i].warmup_steps(total, pl_module.lr_warmup_max_fraction) for i in self.controlled
        }
        self.freeze_step = int(total * (1 - self.freeze_fraction))
        for i, (key, _) in self.controlled.items():
            if i in self.log_coefficients:  # resumed: the coefficient the job had reached
                pl_module.saes[i].hparams[key] = math.exp(self.log_coefficients[i])
            else:
                self.log_coefficients[i] = math.log(max(pl_module.saes[i].hparams[key], 1e-12))
        pl_module.coefficients_changed()

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every or step >= self.freeze_step:
            return
        live = [i for i in self.controlled if i not in pl_module.dropped and self.start_steps[i] <= step]
        if not live:
            return
        x = pl_module._last_batch
        l0s = torch.stack([(pl_module.saes[i].encode(x) > 0).sum(-1).float().mean() for i in live]).tolist()
        for i, l0 in zip(live, l0s):
            key, target = self.controlled[i]
            log_l0 = math.log(max(l0, 1e-2))
            slope = self.slopes.get(i, 0.0)
            if i in self.log_l0s:
                slope += self.slope_smoothing * ((log_l0 - self.log_l0s[i]) / self.every - slope)
                self.slopes[i] = slope
            self.log_l0s[i] = log_l0
            change = self.gain * (log_l0 - math.log(target) + self.horizon * slope)
            self.log_coefficients[i] += max(-self.max_step, min(self.max_step, change))
            pl_module.saes[i].hparams[key] = math.exp(self.log_coefficients[i])
        pl_module.coefficients_changed()
        if step + self.every >= self.freeze_step:
            log.info("target L0: coefficients frozen from step %d: %s", step,
                     {i: round(math.exp(c), 6) for i, c in self.log_coefficients.items()})

    def coefficient(self, i: int) -> float:
        return math.exp(self.log_coefficients[i])

    _STATE = ("log_coefficients", "log_l0s", "slopes")

    def state_dict(self) -> dict:
        return {name: {str(i): v for i, v in getattr(self, name).items()} for name in self._STATE}

    def load_state_dict(self, state_dict: dict) -> None:
        for name in self._STATE:  # checkpoints from before the slope term hold only the coefficients
            setattr(self, name, {int(i): v for i, v in state_dict.get(name, {}).items()})

    @classmethod
    def member_state(cls, state_dict: dict, index: int) -> dict:
        """The state of an ensemble's controller cut down to member `index`, as a lone job of it has it."""
        return {name: {"0": own[str(index)]} if str(index) in (own := state_dict.get(name, {})) else {}
                for name in cls._STATE}
