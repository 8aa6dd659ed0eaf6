"""Evaluation metrics of an SAE on held-out tokens (definitions in DESIGN.md, one place for all).

`HeldOutSet` runs the language model once over the evaluation contexts and keeps what does not
depend on the SAE: the clean activations, the clean next-token loss and the zero-ablation loss.
`MetricAccumulator` then sums per batch what each metric needs, so the same code serves the periodic
evaluation in training and the final one (and, batch by batch, several processes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from saesweep.sae import ReluSae

DENSE_THRESHOLD = 0.1  # a feature firing on more than 10 % of tokens counts as dense


class HeldOutSet(TensorDataset):
    """Rows: (tokens [ctx_len], activations [ctx_len, d_in], ce_clean [ctx_len-1], ce_zero [ctx_len-1])."""

    @classmethod
    @torch.no_grad()
    def build(cls, model, contexts: torch.Tensor, hook_point: str, batch_contexts: int) -> HeldOutSet:
        device = next(model.parameters()).device
        acts, ce_clean, ce_zero = [], [], []
        for start in range(0, len(contexts), batch_contexts):
            batch = contexts[start : start + batch_contexts].to(device)
            loss, cache = model.run_with_cache(
                batch, names_filter=[hook_point], return_type="loss", loss_per_token=True
            )
            acts.append(cache[hook_point].float().cpu())
            ce_clean.append(loss.float().cpu())
            ce_zero.append(spliced_loss(model, batch, hook_point, torch.zeros_like).float().cpu())
        return cls(contexts, torch.cat(acts), torch.cat(ce_clean), torch.cat(ce_zero))

    _NAMES = ("tokens", "activations", "ce_clean", "ce_zero")

    @property
    def n_tokens(self) -> int:
        return self.tensors[0].numel()

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(self._NAMES, self.tensors, strict=True))

    @classmethod
    def from_named_tensors(cls, tensors: dict[str, torch.Tensor]) -> HeldOutSet:
        return cls(*(tensors[name] for name in cls._NAMES))


def spliced_loss(model, tokens: torch.Tensor, hook_point: str, replace) -> torch.Tensor:
    """Per-token next-token loss [batch, ctx_len-1] with the hook's activation replaced by `replace(act)`."""

    def hook(act, hook):
        return replace(act).to(act.dtype)

    return model.run_with_hooks(
        tokens, return_type="loss", loss_per_token=True, fwd_hooks=[(hook_point, hook)]
    )


@dataclass
class EvalResult:
    metrics: dict[str, float]
    feature_stats: dict[str, torch.Tensor]  # per feature: frequency, mean_activation, max_activation


class MetricAccumulator:
    """Sums over held-out batches for one SAE (working on raw activations)."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device):
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        self.sums = {
            name: zeros()
            for name in ("tokens", "sq_err", "l0", "l1", "ce_tokens", "ce_clean", "ce_spliced", "ce_zero")
        }
        self.x_sum = zeros(d_in)
        self.x_sq_sum = zeros()
        self.fire_count = zeros(d_sae)
        self.act_sum = zeros(d_sae)
        self.act_max = torch.zeros(d_sae, device=device)

    @torch.no_grad()
    def update(self, sae: ReluSae, model, hook_point: str, batch) -> None:
        tokens, acts, ce_clean, ce_zero = batch
        x = acts.reshape(-1, acts.shape[-1]).float()
        x_hat, feature_acts = sae(x)
        firing = feature_acts > 0
        s = self.sums
        s["tokens"] += x.shape[0]
        s["sq_err"] += (x - x_hat).pow(2).sum(dtype=torch.float64)
        s["l0"] += firing.sum(dtype=torch.float64)
        s["l1"] += feature_acts.sum(dtype=torch.float64)
        self.x_sum += x.sum(dim=0, dtype=torch.float64)
        self.x_sq_sum += x.pow(2).sum(dtype=torch.float64)
        self.fire_count += firing.sum(dim=0, dtype=torch.float64)
        self.act_sum += feature_acts.sum(dim=0, dtype=torch.float64)
        self.act_max = torch.maximum(self.act_max, feature_acts.max(dim=0).values.float())

        ce_spliced = spliced_loss(model, tokens, hook_point, lambda act: sae(act.float()).x_hat)
        s["ce_tokens"] += ce_clean.numel()
        s["ce_clean"] += ce_clean.sum(dtype=torch.float64)
        s["ce_spliced"] += ce_spliced.sum(dtype=torch.float64)
        s["ce_zero"] += ce_zero.sum(dtype=torch.float64)

    def all_reduce(self) -> None:
        """Combine the sums of every process of a torch.distributed group (each evaluated a part)."""
        import torch.distributed as dist

        for tensor in (*self.sums.values(), self.x_sum, self.x_sq_sum, self.fire_count, self.act_sum):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        dist.all_reduce(self.act_max, op=dist.ReduceOp.MAX)

    def compute(self) -> EvalResult:
        s = {name: v.item() for name, v in self.sums.items()}
        n = s["tokens"]
        # Σ‖x − mean‖² = Σ‖x‖² − n‖mean‖², accumulated in float64
        total_var = self.x_sq_sum.item() - (self.x_sum.pow(2).sum().item() / n)
        frequency = (self.fire_count / n).float()
        ce_clean = s["ce_clean"] / s["ce_tokens"]
        ce_spliced = s["ce_spliced"] / s["ce_tokens"]
        ce_zero = s["ce_zero"] / s["ce_tokens"]
        zero_gap = ce_zero - ce_clean
        metrics = {
            "mse": s["sq_err"] / n,
            "fvu": s["sq_err"] / total_var,
            "l0": s["l0"] / n,
            "l1": s["l1"] / n,
            "dead_fraction": (frequency == 0).float().mean().item(),
            "dense_fraction": (frequency > DENSE_THRESHOLD).float().mean().item(),
            "ce_clean": ce_clean,
            "ce_spliced": ce_spliced,
            "ce_zero_ablation": ce_zero,
            "ce_delta": ce_spliced - ce_clean,
            "ppl_clean": math.exp(ce_clean),
            "ppl_spliced": math.exp(ce_spliced),
            "ppl_delta": math.exp(ce_spliced) - math.exp(ce_clean),
            "ce_recovered": (ce_zero - ce_spliced) / zero_gap if zero_gap != 0 else float("nan"),
            "n_eval_tokens": float(n),
        }
        feature_stats = {
            "frequency": frequency.cpu(),
            "mean_activation": (self.act_sum / self.fire_count.clamp_min(1)).float().cpu(),
            "max_activation": self.act_max.cpu(),
        }
        return EvalResult(metrics, feature_stats)


def evaluate(sae: ReluSae, model, hook_point: str, held_out: HeldOutSet, batch_contexts: int) -> EvalResult:
    """All metrics of `sae` on the held-out set, outside any training loop."""
    device = next(model.parameters()).device
    sae = sae.to(device)
    acc = MetricAccumulator(sae.d_in, sae.d_sae, device)
    for start in range(0, len(held_out), batch_contexts):
        batch = held_out[start : start + batch_contexts]
        acc.update(sae, model, hook_point, [t.to(device) for t in batch])
    return acc.compute()
