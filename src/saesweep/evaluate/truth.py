"""The evaluation against the truth, for runs trained on synthetic activations (data=synthetic): each
dictionary's recovery of the true features, whether the features found again (by the other seed, in
the next larger dictionary) are the true ones, and absorption on parent/child hierarchies. Written to
evaluation/ground_truth.json; definitions in saesweep.ground_truth."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch

from saesweep.ground_truth import FoundAgainTruth, absorption, found_again_truth, recovery
from saesweep.synthetic import SYNTHETIC, SyntheticSpec, TrueFeatures, make_features

from .compare import Comparison
from .runs import Run

log = logging.getLogger(__name__)

GROUND_TRUTH_FILE = "ground_truth.json"


@dataclass(frozen=True)
class RunTruth:
    run: str
    recovered: int
    n_true: int
    mean_max_cos: float
    true_latents: int  # learned features within cos 0.9 of a true one
    by_seed: FoundAgainTruth | None  # found again by the run's other seed
    by_size: FoundAgainTruth | None  # found again in the next larger dictionary
    hierarchy_pairs: int
    absorbed: int

    @property
    def recovered_fraction(self) -> float:
        return self.recovered / self.n_true if self.n_true else math.nan


def truths(runs: list[Run]) -> dict[str, TrueFeatures]:
    """The true features behind each run trained on synthetic activations (rebuilt from the generator's
    knobs in its cfg.json: the features depend on them alone)."""
    made: dict[SyntheticSpec, TrueFeatures] = {}
    out = {}
    for run in runs:
        dataset = run.cfg.get("dataset") or {}
        if dataset.get("name") != SYNTHETIC:
            continue
        spec = SyntheticSpec(**{f.name: dataset[f.name] for f in dataclasses.fields(SyntheticSpec) if f.name in dataset})
        out[run.name] = made.setdefault(spec, make_features(spec))
    return out


def evaluate_truth(runs: list[Run], comparison: Comparison, found_threshold: float) -> list[RunTruth]:
    """Every synthetic run against its truth ([] when the sweep has none)."""
    true_features = truths(runs)
    larger = {name: findings.next_larger for name, findings in comparison.up_the_sizes.items()}
    out = []
    for run in runs:
        if run.name not in true_features:
            continue
        truth = true_features[run.name]
        rec = recovery(run.decoder, truth)

        absorbed = absorption(run.decoder, truth, rec)
        out.append(RunTruth(
            run.name, rec.recovered, rec.n_true, rec.mean_max_cos, int(rec.learned_is_true.sum()),
            _found_by(run.name, comparison.seed_partners.get(run.name), comparison, found_threshold, rec, truth),
            _found_by(run.name, larger.get(run.name), comparison, found_threshold, rec, truth),
            len(absorbed), sum(a.absorbed for a in absorbed),
        ))
        log.info("%s: %d of %d true features recovered (cos ≥ 0.9), mean max cosine %.3f", run.name, rec.recovered,
                 rec.n_true, rec.mean_max_cos)
    return out


def _found_by(
    name: str, other: str | None, comparison: Comparison, threshold: float, rec, truth: TrueFeatures
) -> FoundAgainTruth | None:
    """How true the features of run `name` that run `other` finds again (MCS ≥ threshold) are."""
    if other is None or (name, other) not in comparison.values:
        return None
    return found_again_truth(torch.as_tensor(comparison.values[name, other][0] >= threshold), rec, truth)


def ground_truth_json(results: list[RunTruth]) -> dict:
    return {"runs": [dataclasses.asdict(r) | {"recovered_fraction": r.recovered_fraction} for r in results]}
