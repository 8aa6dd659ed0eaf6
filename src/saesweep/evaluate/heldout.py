"""What the runs' features do on held-out tokens (evaluate.py's opt-in `activation_similarity=true`): the
runs' language models are loaded from their cfg.json and run over held-out contexts of the first run's
dataset, streamed in batches.

- Activation similarity (saesweep.similarity) between pairs of runs: across layers of one model, two seeds
  of one setting, and the same hook point of two models that share a tokenizer. Per pair, the share of A's
  features matched one-to-one with one of B's at activation correlation ≥ `threshold`, against B's tokens
  shuffled; where the two share a basis, the agreement of that matching with the decoder matching.
- Outlier dimensions (saesweep.outliers) per model and hook point, and per run the features whose decoder
  direction lies closest to an outlier dimension of the basis.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from saesweep.activations import activations_at
from saesweep.errors import ConfigError
from saesweep.lm import load_model
from saesweep.outliers import BasisAlignment, MagnitudeSums, OutlierDimensions, basis_alignment
from saesweep.rundir import held_out_contexts, load_sae
from saesweep.similarity import activation_similarity, agreement_with_decoder_matching, check_same_tokenizer

from .cosines import matching
from .runs import Run

log = logging.getLogger(__name__)

BATCH_CONTEXTS = 32  # held-out contexts per forward pass


@dataclass(frozen=True)
class RunPair:
    a: Run
    b: Run
    relation: str  # "layers", "seeds" or "models"

    @property
    def shares_basis(self) -> bool:
        """Decoder directions of the two are comparable (the same model and d_in: one residual stream or hook)."""
        return self.relation != "models" and self.a.decoder.shape[1] == self.b.decoder.shape[1]


@dataclass(frozen=True)
class PairSimilarity:
    a: str
    b: str
    relation: str
    share: float  # of A's features matched one-to-one at correlation ≥ threshold
    chance_share: float  # the same with B's tokens shuffled
    mean_matched: float
    chance_mean_matched: float
    agreement: float | None  # share of matched features whose partner is the decoder matching's (None: no shared basis)


@dataclass(frozen=True)
class HookOutliers:
    model: str | None
    hook_point: str
    outliers: OutlierDimensions


@dataclass(frozen=True)
class RunOutliers:
    run: str
    hook_point: str
    alignment: BasisAlignment

    @property
    def on_outlier(self) -> int:
        return int(self.alignment.on_outlier.sum())


@dataclass(frozen=True)
class HeldOutComparison:
    n_tokens: int
    threshold: float
    pairs: list[PairSimilarity]
    hooks: list[HookOutliers]
    runs: list[RunOutliers]

    def alignment_of(self, run: str) -> BasisAlignment | None:
        return next((r.alignment for r in self.runs if r.run == run), None)

    def to_json(self) -> dict:
        return {
            "n_tokens": self.n_tokens,
            "activation_similarity": {
                "definition": "Pearson correlation of feature activations on the same held-out tokens; A's features "
                f"matched one-to-one (Hungarian) with B's; share: matched at correlation ≥ {self.threshold:g}; chance: "
                "B's activations in shuffled token order; agreement: share of A's features whose activation match "
                "is their decoder-cosine match (pairs with a shared basis)",
                "threshold": self.threshold,
                "pairs": [asdict(p) for p in self.pairs],
            },
            "outlier_dimensions": {
                "definition": "residual dimensions whose mean |activation| on the held-out tokens is more than 3 "
                "standard deviations (over dimensions) above the mean; a feature is aligned with the basis "
                "direction of its decoder row's largest |cos|",
                "hook_points": [
                    {"model": h.model, "hook_point": h.hook_point, "dimensions": h.outliers.dimensions.tolist(),
                     "magnitude_threshold": h.outliers.threshold}
                    for h in self.hooks
                ],
                "runs": {
                    r.run: {"hook_point": r.hook_point, "features_on_outlier": r.on_outlier,
                            "share": r.on_outlier / max(len(r.alignment.on_outlier), 1)}
                    for r in self.runs
                },
            },
        }


def held_out_comparison(
    runs: list[Run], pairs: list[RunPair], device: torch.device, n_tokens: int, threshold: float, seed: int
) -> HeldOutComparison:
    """Outlier dimensions at every hook point of `runs` and activation similarity of `pairs`, on `n_tokens`
    held-out tokens; a ConfigError in one line when two models' tokenizers differ."""
    models = _load_models(runs, device)
    source = next((run for run in runs if "dataset" in run.cfg), None)
    if source is None:
        raise ConfigError("activation_similarity: no run records its dataset (cfg.json 'dataset'); nothing to hold out")
    contexts = held_out_contexts(models[source.model].tokenizer, source.cfg, n_tokens, "activation similarity").tokens
    log.info("held-out: %d tokens of %s's dataset", contexts.numel(), source.name)
    hooks = _outliers(runs, models, contexts)
    outliers = {(h.model, h.hook_point): h.outliers for h in hooks}
    run_outliers = [
        RunOutliers(run.name, run.cfg["hook_point"], basis_alignment(run.decoder, outliers[run.model, run.cfg["hook_point"]]))
        for run in runs
    ]
    similarities = [_similarity(pair, models, contexts, device, threshold, seed) for pair in pairs]
    return HeldOutComparison(contexts.numel(), threshold, similarities, hooks, run_outliers)


def _load_models(runs: list[Run], device: torch.device) -> dict:
    models: dict = {}
    for run in runs:
        if run.model not in models:
            log.info("loading the language model %s", run.model)
            models[run.model] = load_model(run.cfg.get("model_name"), run.cfg.get("model_path"), device)
    first, *others = models
    for other in others:
        check_same_tokenizer(f"model {first}", models[first].tokenizer, f"model {other}", models[other].tokenizer)
    return models


def _batches(models: dict, contexts: torch.Tensor, wanted: list[tuple[str | None, str]]) -> Iterator[list[torch.Tensor]]:
    """Per batch of contexts: the activations [tokens, d_in] at each (model, hook point) of `wanted`."""
    for start in range(0, len(contexts), BATCH_CONTEXTS):
        batch = contexts[start : start + BATCH_CONTEXTS]
        acts = {}
        for model in dict.fromkeys(m for m, _ in wanted):
            hook_points = list(dict.fromkeys(h for m, h in wanted if m == model))
            acts |= {(model, h): x for h, x in activations_at(models[model], batch, hook_points).items()}
        yield [acts[key].reshape(-1, acts[key].shape[-1]) for key in wanted]


def _outliers(runs: list[Run], models: dict, contexts: torch.Tensor) -> list[HookOutliers]:
    d_in = {(run.model, run.cfg["hook_point"]): run.decoder.shape[1] for run in runs}
    wanted = list(d_in)
    sums = [MagnitudeSums(d_in[key]) for key in wanted]
    for batch in _batches(models, contexts, wanted):
        for s, x in zip(sums, batch, strict=True):
            s.update(x)
    return [HookOutliers(model, hook_point, s.outliers()) for (model, hook_point), s in zip(wanted, sums, strict=True)]


def _similarity(
    pair: RunPair, models: dict, contexts: torch.Tensor, device: torch.device, threshold: float, seed: int
) -> PairSimilarity:
    a, b = pair.a, pair.b
    log.info("activation similarity %s ↔ %s (%s)", a.name, b.name, pair.relation)
    sae_a, sae_b = (load_sae(run.path).to(device).eval() for run in (a, b))
    wanted = [(a.model, a.cfg["hook_point"]), (b.model, b.cfg["hook_point"])]
    result = activation_similarity(sae_a, sae_b, (tuple(x) for x in _batches(models, contexts, wanted)), seed)
    share, chance_share = result.share_above(threshold)
    agreement = None
    if pair.shares_basis:
        decoder_index, _ = matching(a.decoder, b.decoder).per_row(a.d_sae)
        agreement = agreement_with_decoder_matching(result, decoder_index)
    return PairSimilarity(
        a.name, b.name, pair.relation, share, chance_share, float(np.nanmean(result.matched.numpy())),
        float(np.nanmean(result.matched_chance.numpy())), agreement,
    )
