"""Evaluation metrics of an SAE on held-out tokens (definitions in docs/METHODS.md, one place for all).

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

from saesweep.sae import Sae

DENSE_THRESHOLD = 0.1  # a feature firing on more than 10 % of tokens counts as dense
# The held-out documents of the training corpus: the headline set, whose metrics carry no prefix. Each
# extra set of eval.sets reports the same metrics as `<set name>/<metric>`.
HEADLINE_SET = "corpus"


def set_metric(set_name: str, metric: str) -> str:
    """The name of `metric` measured on the held-out set `set_name`."""
    return metric if set_name == HEADLINE_SET else f"{set_name}/{metric}"


class HeldOutSet(TensorDataset):
    """Rows: (tokens [ctx_len], activations [ctx_len, d_in], ce_clean [ctx_len-1], ce_zero [ctx_len-1]).

    Activations made without a language model (data=synthetic) have no tokens (zeros) and no losses
    (NaN): the metrics that need the model (ce_*, ppl_*) are NaN, not made up."""

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
    metrics: dict[str, float]  # the headline set's by name, each extra set's as `<set name>/<metric>`
    feature_stats: dict[str, torch.Tensor]  # per feature, on the headline set: frequency, mean_activation, max_activation

    @staticmethod
    def of_sets(results: dict[str, EvalResult]) -> EvalResult:
        """One SAE's results on several held-out sets (the headline set first) as one."""
        headline = next(iter(results.values()))
        metrics = {set_metric(name, k): v for name, result in results.items() for k, v in result.metrics.items()}
        return EvalResult(metrics, headline.feature_stats)


# Per-context sums kept by MetricAccumulator: the contexts are the units of the standard errors.
_CONTEXT_SUMS = ("tokens", "sq_err", "l0", "l1", "x_sq", "ce_tokens", "ce_clean", "ce_spliced", "ce_zero")


class MetricAccumulator:
    """Sums over held-out batches for one SAE (working on raw activations): per context, for the
    metrics and their standard errors, and per feature, for the feature statistics."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device):
        self.device = device
        self.context_sums: list[torch.Tensor] = []  # [batch, len(_CONTEXT_SUMS)] float64 each
        self.context_x_sums: list[torch.Tensor] = []  # [batch, d_in] float64: Σ x per context, for FVU's mean
        self.fire_count = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.act_max = torch.zeros(d_sae, device=device)

    @torch.no_grad()
    def update(self, sae: Sae, model, hook_point: str, batch) -> None:
        tokens, acts, ce_clean, ce_zero = batch
        x = acts.float()  # [batch, ctx_len, d_in]
        x_hat, feature_acts = sae(x)
        firing = feature_acts > 0
        if model is None:  # activations without a language model (data=synthetic): no loss to measure
            ce_spliced = torch.full_like(ce_clean, math.nan)
        else:
            ce_spliced = spliced_loss(model, tokens, hook_point, lambda act: sae(act.float()).x_hat)

        def per_context(values: torch.Tensor) -> torch.Tensor:
            return values.reshape(len(values), -1).sum(dim=1, dtype=torch.float64)

        self.context_sums.append(
            torch.stack(
                [
                    torch.full((len(x),), x.shape[1], dtype=torch.float64, device=x.device),
                    per_context((x - x_hat).pow(2)),
                    per_context(firing),
                    per_context(feature_acts),
                    per_context(x.pow(2)),
                    torch.full((len(x),), ce_clean.shape[1], dtype=torch.float64, device=x.device),
                    per_context(ce_clean),
                    per_context(ce_spliced),
                    per_context(ce_zero),
                ],
                dim=1,
            )
        )
        self.context_x_sums.append(x.sum(dim=1, dtype=torch.float64))
        flat_acts = feature_acts.reshape(-1, feature_acts.shape[-1])
        self.fire_count += firing.reshape(flat_acts.shape).sum(dim=0, dtype=torch.float64)
        self.act_sum += flat_acts.sum(dim=0, dtype=torch.float64)
        self.act_max = torch.maximum(self.act_max, flat_acts.max(dim=0).values.float())

    def all_reduce(self) -> None:
        """Combine the sums of every process of a torch.distributed group (each evaluated a part)."""
        import torch.distributed as dist

        for tensor in (self.fire_count, self.act_sum):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        dist.all_reduce(self.act_max, op=dist.ReduceOp.MAX)
        self.context_sums = [_all_gather_rows(torch.cat(self.context_sums))]
        self.context_x_sums = [_all_gather_rows(torch.cat(self.context_x_sums))]

    def compute(self) -> EvalResult:
        sums = dict(zip(_CONTEXT_SUMS, torch.cat(self.context_sums).T, strict=True))
        x_sums = torch.cat(self.context_x_sums)
        n = sums["tokens"].sum().item()
        mean = x_sums.sum(dim=0) / n
        # Σ_t ‖x_t − mean‖² of each context, from its Σ‖x‖² and Σx
        centred_sq = sums["x_sq"] - 2 * (x_sums @ mean) + sums["tokens"] * mean.pow(2).sum()
        frequency = (self.fire_count / n).float()
        ce_clean, ce_clean_se = ratio(sums["ce_clean"], sums["ce_tokens"])
        ce_spliced, _ = ratio(sums["ce_spliced"], sums["ce_tokens"])
        ce_zero, _ = ratio(sums["ce_zero"], sums["ce_tokens"])
        ce_delta, ce_delta_se = ratio(sums["ce_spliced"] - sums["ce_clean"], sums["ce_tokens"])
        ce_recovered, ce_recovered_se = ratio(sums["ce_zero"] - sums["ce_spliced"], sums["ce_zero"] - sums["ce_clean"])
        fvu, fvu_se = ratio(sums["sq_err"], centred_sq)
        l0, l0_se = ratio(sums["l0"], sums["tokens"])
        metrics = {
            "mse": sums["sq_err"].sum().item() / n,
            "fvu": fvu,
            "l0": l0,
            "l1": sums["l1"].sum().item() / n,
            "dead_fraction": (frequency == 0).float().mean().item(),
            "dense_fraction": (frequency > DENSE_THRESHOLD).float().mean().item(),
            "ce_clean": ce_clean,
            "ce_spliced": ce_spliced,
            "ce_zero_ablation": ce_zero,
            "ce_delta": ce_delta,
            "ppl_clean": math.exp(ce_clean),
            "ppl_spliced": math.exp(ce_spliced),
            "ppl_delta": math.exp(ce_spliced) - math.exp(ce_clean),
            "ce_recovered": ce_recovered,
            "fvu_se": fvu_se,
            "l0_se": l0_se,
            "ce_clean_se": ce_clean_se,
            "ce_delta_se": ce_delta_se,
            "ce_recovered_se": ce_recovered_se,
            "n_eval_tokens": float(n),
            "n_eval_contexts": float(len(x_sums)),
            "dead_window_tokens": float(n),  # dead_fraction: features that never fired on these tokens
        }
        feature_stats = {
            "frequency": frequency.cpu(),
            "mean_activation": (self.act_sum / self.fire_count.clamp_min(1)).float().cpu(),
            "max_activation": self.act_max.cpu(),
        }
        return EvalResult(metrics, feature_stats)


def ratio(numerators: torch.Tensor, denominators: torch.Tensor) -> tuple[float, float]:
    """Σ numerators / Σ denominators over contexts, and its standard error over contexts.

    The delta method for a ratio of sums (contexts as independent units):
    Var(R) ≈ n / (n − 1) · Σ (a_i − R b_i)² / (Σ b_i)². Contexts are spread over many documents
    (a few per document at most), which is what makes them close to independent.
    """
    total = denominators.sum().item()
    if total == 0:
        return float("nan"), float("nan")
    value = numerators.sum().item() / total
    n = len(numerators)
    if n < 2:
        return value, float("nan")
    residual_sq = (numerators - value * denominators).pow(2).sum().item()
    return value, math.sqrt(n / (n - 1) * residual_sq) / abs(total)


def _all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    """The rows of `local` from every process, concatenated (ranks may hold different row counts)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(local)], device=local.device))
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([rows[: int(c.item())] for rows, c in zip(gathered, counts, strict=True)])


def evaluate(sae: Sae, model, hook_point: str, held_out: HeldOutSet, batch_contexts: int) -> EvalResult:
    """All metrics of `sae` on the held-out set, outside any training loop."""
    device = next(model.parameters()).device
    sae = sae.to(device)
    acc = MetricAccumulator(sae.d_in, sae.d_sae, device)
    for start in range(0, len(held_out), batch_contexts):
        batch = held_out[start : start + batch_contexts]
        acc.update(sae, model, hook_point, [t.to(device) for t in batch])
    return acc.compute()
