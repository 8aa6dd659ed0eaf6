"""The comparison of a sweep's runs: MCS between every ordered pair of runs of a comparison group (the
same hook point, width and model) beside a random Gaussian baseline, their one-to-one matching, and
the features each run's other seed and its larger dictionaries find again."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from saesweep.errors import ConfigError
from saesweep.lm import resolve_device

from .cosines import (
    DEFAULT_CHUNK_SIZE,
    OverlapStats,
    matched_cosines,
    mcs,
    mcs_both_ways,
    overlap_stats,
    random_dictionary,
)
from .runs import Run, larger_dictionaries, seed_partners

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    thresholds: tuple[float, ...] = (0.7, 0.8, 0.9)  # MCS levels reported for every pair
    found_threshold: float = 0.9  # MCS at which a feature counts as found again
    chunk_size: int = DEFAULT_CHUNK_SIZE
    device: str = "auto"
    baseline_seed: int = 0
    # one-to-one matching is skipped for pairs whose cosine matrix has more entries (memory: 8 bytes each)
    matching_max_entries: int = 1 << 26

    def __post_init__(self) -> None:
        for t in (*self.thresholds, self.found_threshold):
            if not -1.0 <= t <= 1.0:
                raise ConfigError(f"MCS threshold {t} is outside [-1, 1] (a cosine similarity)")
        if not self.thresholds:
            raise ConfigError("thresholds=[] must name at least one MCS level, e.g. [0.7, 0.8, 0.9]")
        if not (isinstance(self.chunk_size, int) and self.chunk_size > 0):
            raise ConfigError(f"chunk_size={self.chunk_size} must be a positive integer")
        try:
            device = resolve_device(self.device)
        except RuntimeError:
            raise ConfigError(
                f"device={self.device!r} is not a torch device; e.g. auto, cpu, cuda, cuda:1"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"device={self.device!r} but CUDA is not available here; use device=auto or cpu"
            )

    @classmethod
    def from_config(cls, cfg: DictConfig) -> EvalSettings:
        return cls(
            thresholds=tuple(sorted(float(t) for t in cfg.thresholds)),
            found_threshold=float(cfg.found_threshold),
            chunk_size=cfg.chunk_size,
            device=cfg.device,
            baseline_seed=cfg.baseline_seed,
            matching_max_entries=cfg.matching_max_entries,
        )


@dataclass(frozen=True)
class Group:
    label: str
    runs: list[Run]
    largest: Run  # the largest dictionary; ties go to the first run in name order


@dataclass(frozen=True)
class PairOverlap:
    """How many of A's features B finds again, and how many a random dictionary of B's shape does."""

    trained: OverlapStats  # of mcs(A → B)
    baseline: OverlapStats  # of mcs(A → random Gaussian dictionary of B's shape)
    found_again: int  # A's features with MCS ≥ found_threshold in B
    baseline_found_again: int
    # one-to-one (Hungarian) matching of the two dictionaries: matched pairs with cosine ≥ found_threshold
    # (the same number both ways; at most the smaller dictionary's size); None when too large to match
    matched: int | None = None
    baseline_matched: int | None = None


@dataclass(frozen=True)
class SizeFindings:
    """A run's features found again up its size axis (larger dictionaries of the same settings and seed)."""

    next_larger: str  # the smallest larger dictionary
    in_next_larger: int  # features with MCS ≥ found_threshold there
    baseline_in_next_larger: int
    matched_in_next_larger: int | None  # one-to-one matched pairs with cosine ≥ found_threshold
    in_any_larger: int  # features with MCS ≥ found_threshold in at least one larger dictionary
    baseline_in_any_larger: int


@dataclass(frozen=True)
class Comparison:
    groups: list[Group]
    pairs: dict[tuple[str, str], PairOverlap]  # (A, B) → overlap, for every ordered pair within a group
    values: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]  # (A, B) → (mcs(A → B), A's MCS by chance)
    seed_partners: dict[str, str]  # run → the run that differs from it only in seed (see seed_partners)
    up_the_sizes: dict[str, SizeFindings]  # run → its features found again in larger dictionaries of its seed

    def largest_of(self, name: str) -> Run:
        """The largest dictionary of the comparison group of the run called `name`."""
        return next(group.largest for group in self.groups if any(run.name == name for run in group.runs))


def compare_runs(runs: list[Run], settings: EvalSettings) -> Comparison:
    """MCS between every ordered pair of runs in the same comparison group, with the chance baseline."""
    device = resolve_device(settings.device)
    log.info("computing MCS on %s in chunks of %d rows", device, settings.chunk_size)
    decoders = {run.name: run.decoder.to(device) for run in runs}
    random_dictionaries: dict[tuple[int, int], torch.Tensor] = {}
    baselines: dict[tuple[str, int], torch.Tensor] = {}  # (A, n_b) → mcs(A → random n_b × d)

    def baseline_mcs(a: Run, n_b: int) -> torch.Tensor:
        shape = (n_b, a.decoder.shape[1])
        if shape not in random_dictionaries:
            random_dictionaries[shape] = random_dictionary(shape, settings.baseline_seed).to(device)
        if (a.name, n_b) not in baselines:
            baselines[a.name, n_b] = mcs(
                decoders[a.name], random_dictionaries[shape], settings.chunk_size
            ).cpu()
        return baselines[a.name, n_b]

    def overlap(a: Run, b: Run, values: torch.Tensor, matched: tuple[int, int] | None) -> PairOverlap:
        chance = baseline_mcs(a, b.d_sae)
        return PairOverlap(
            trained=overlap_stats(values, settings.thresholds),
            baseline=overlap_stats(chance, settings.thresholds),
            found_again=int((values >= settings.found_threshold).sum()),
            baseline_found_again=int((chance >= settings.found_threshold).sum()),
            matched=matched[0] if matched else None,
            baseline_matched=matched[1] if matched else None,
        )

    def matching(a: Run, b: Run) -> tuple[int, int] | None:
        """Matched pairs at the threshold for a and b, and for a against a random dictionary of b's shape."""
        if a.d_sae * b.d_sae > settings.matching_max_entries:
            return None
        small, large = (a, b) if a.d_sae <= b.d_sae else (b, a)
        random_large = random_dictionaries.get((large.d_sae, large.decoder.shape[1]))
        if random_large is None:
            baseline_mcs(small, large.d_sae)  # makes the random dictionary of that shape
            random_large = random_dictionaries[(large.d_sae, large.decoder.shape[1])]
        t = settings.found_threshold
        return (
            int((matched_cosines(small.decoder, large.decoder) >= t).sum()),
            int((matched_cosines(small.decoder, random_large) >= t).sum()),
        )

    by_group: dict[str, list[Run]] = {}
    for run in runs:
        by_group.setdefault(run.comparison_group, []).append(run)
    groups, pairs, values = [], {}, {}
    for label, members in by_group.items():
        largest = max(members, key=lambda r: r.d_sae)  # max keeps the first of equals: name order
        groups.append(Group(label, members, largest))
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                log.info("MCS %s (%d features) ↔ %s (%d features)", a.name, a.d_sae, b.name, b.d_sae)
                a_to_b, b_to_a = (
                    v.cpu() for v in mcs_both_ways(decoders[a.name], decoders[b.name], settings.chunk_size)
                )
                matched = matching(a, b)
                pairs[a.name, b.name] = overlap(a, b, a_to_b, matched)
                pairs[b.name, a.name] = overlap(b, a, b_to_a, matched)
                values[a.name, b.name] = (a_to_b.numpy(), baseline_mcs(a, b.d_sae).numpy())
                values[b.name, a.name] = (b_to_a.numpy(), baseline_mcs(b, a.d_sae).numpy())
    return Comparison(groups, pairs, values, seed_partners(runs),
                      size_findings(runs, pairs, values, settings.found_threshold))


def size_findings(
    runs: list[Run],
    pairs: dict[tuple[str, str], PairOverlap],
    values: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]],
    threshold: float,
) -> dict[str, SizeFindings]:
    findings = {}
    for name, larger in larger_dictionaries(runs).items():
        found = [values[name, other][0] >= threshold for other in larger]
        chance = [values[name, other][1] >= threshold for other in larger]
        nearest = pairs[name, larger[0]]
        findings[name] = SizeFindings(
            next_larger=larger[0],
            in_next_larger=nearest.found_again,
            baseline_in_next_larger=nearest.baseline_found_again,
            matched_in_next_larger=nearest.matched,
            in_any_larger=int(np.logical_or.reduce(found).sum()),
            baseline_in_any_larger=int(np.logical_or.reduce(chance).sum()),
        )
    return findings
