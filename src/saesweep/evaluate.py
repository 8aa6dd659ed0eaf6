"""Post-hoc evaluation across the runs of a sweep: which features are real, in the sense that
dictionaries of different sizes find them again (max cosine similarity, MCS; docs/METHODS.md).

`evaluate_sweep(sweep_dir, ...)` reads every run directory of a sweep and writes, under
<sweep_dir>/evaluation/: mcs.json (MCS between every ordered pair of comparable runs, against a
random Gaussian baseline), summary.csv (one row per run: hyperparameters and metrics), the plots of
saesweep.plots and, unless disabled, one W&B evaluation run in the sweep's group.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from omegaconf import DictConfig

from saesweep import plots
from saesweep.errors import CheckpointError, ConfigError
from saesweep.io import atomic_write_bytes, atomic_write_json
from saesweep.lm import resolve_device
from saesweep.rundir import (
    HYDRA_DIR,
    RUN_MARKERS,
    find_run_dirs,
    load_feature_stats,
    load_job_error,
    load_metrics,
    load_run_config,
    load_sae,
    natural_key,
    recorded_wandb_group,
)
from saesweep.sae import trained_architecture

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 4096
EVALUATION_DIR = "evaluation"
MCS_FILE = "mcs.json"
SUMMARY_FILE = "summary.csv"
PLOT_FILES = {
    "mcs_hist": "mcs_hist.png",
    "features_found": "features_found.png",
    "mcs_matrix": "mcs_matrix.png",
    "pareto": "pareto.png",
    "found_by_size": "found_by_size.png",
    "mcs_vs_frequency": "mcs_vs_frequency.png",
}
_WANDB_MODES = ("online", "offline", "disabled")
_HYPERPARAMETERS = ("architecture", "hook_point", "d_in", "d_sae", "dict_ratio", "l1_coef", "k")


@torch.no_grad()
def mcs_both_ways(
    a: torch.Tensor, b: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mcs(a, b)` and `mcs(b, a)` from one pass over the similarity matrix, on `a`'s device.

    Rows are normalised one chunk at a time, so memory beyond the inputs stays at chunk_size² + two
    chunks of rows whatever the dictionary sizes.
    """
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"dictionaries of different widths cannot be compared: {a.shape[-1]} vs {b.shape[-1]}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive integer")
    device = a.device
    a_to_b = torch.full((a.shape[0],), -1.0, device=device)
    b_to_a = torch.full((b.shape[0],), -1.0, device=device)
    for i in range(0, a.shape[0], chunk_size):
        a_chunk = torch.nn.functional.normalize(a[i : i + chunk_size].float(), dim=-1)
        for j in range(0, b.shape[0], chunk_size):
            b_chunk = torch.nn.functional.normalize(b[j : j + chunk_size].to(device).float(), dim=-1)
            sims = a_chunk @ b_chunk.T
            a_to_b[i : i + chunk_size] = torch.maximum(a_to_b[i : i + chunk_size], sims.amax(dim=1))
            b_to_a[j : j + chunk_size] = torch.maximum(b_to_a[j : j + chunk_size], sims.amax(dim=0))
    # rounding puts identical directions at 1 + 1e-7; a cosine above 1 would fall outside [-1, 1] bins
    return a_to_b.clamp_(max=1.0), b_to_a.clamp_(max=1.0)


def mcs(a: torch.Tensor, b: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """For each row of `a` [n_a, d], its largest cosine similarity with any row of `b` [n_b, d]: [n_a].

    Computed over chunks of both dictionaries, so memory beyond the inputs stays at chunk_size² (plus
    two chunks of rows) whatever their sizes.
    """
    return mcs_both_ways(a, b, chunk_size)[0]


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
class WandbSettings:
    mode: str = "offline"  # offline: a local run under <sweep_dir>/evaluation/wandb, `wandb sync` later
    project: str = "saesweep"
    entity: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in _WANDB_MODES:
            raise ConfigError(f"logger.mode={self.mode!r} is not a W&B mode; allowed: {list(_WANDB_MODES)}")

    @classmethod
    def from_config(cls, cfg: DictConfig) -> WandbSettings:
        return cls(mode=cfg.mode, project=cfg.project, entity=cfg.entity)


@dataclass(frozen=True)
class Run:
    """A finished training job: what the evaluation needs from its run directory."""

    name: str  # the run directory relative to the sweep directory
    path: Path
    overrides: str  # the Hydra job's command-line overrides ("" when it was not a Hydra job)
    cfg: dict
    metrics: dict[str, float]
    decoder: torch.Tensor  # W_dec [d_sae, d_in], float32, CPU
    frequency: np.ndarray | None  # per feature: fraction of the held-out tokens it fired on (None: released)

    @property
    def d_sae(self) -> int:
        return self.decoder.shape[0]

    @property
    def dead_features(self) -> int:
        """Features that never fired on the held-out tokens (0 for a released dictionary: unknown)."""
        return 0 if self.frequency is None else int((self.frequency == 0).sum())

    @property
    def comparison_group(self) -> str:
        """Runs are compared only within a group: the same hook point, width and model (directions
        in different residual streams share no basis)."""
        model = self.cfg.get("model_path") or self.cfg.get("model_name")
        return f"{self.cfg.get('hook_point')} d_in={self.decoder.shape[1]} model={model}"


@dataclass(frozen=True)
class FailedRun:
    """A run directory that cannot be evaluated: the job failed, is still running or is corrupt."""

    name: str
    path: Path
    overrides: str
    cfg: dict  # cfg.json when readable, else {}
    reason: str


@dataclass(frozen=True)
class Group:
    label: str
    runs: list[Run]
    largest: Run  # the largest dictionary; ties go to the first run in name order


@dataclass(frozen=True)
class PairOverlap:
    """How many of A's features B finds again, and how many a random dictionary of B's shape does."""

    trained: dict  # overlap_stats of mcs(A → B)
    baseline: dict  # overlap_stats of mcs(A → random Gaussian dictionary of B's shape)
    found_again: int  # A's features with MCS ≥ found_threshold in B
    baseline_found_again: int
    # one-to-one (Hungarian) matching of the two dictionaries: matched pairs with cosine ≥ found_threshold
    # (the same number both ways; at most the smaller dictionary's size); None when too large to match
    matched: int | None = None
    baseline_matched: int | None = None


@dataclass(frozen=True)
class Comparison:
    groups: list[Group]
    pairs: dict[tuple[str, str], PairOverlap]  # (A, B) → overlap, for every ordered pair within a group
    values: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]  # (A, B) → (mcs(A → B), A's MCS by chance)
    seed_partners: dict[str, str]  # run → the run that differs from it only in seed (see seed_partners)
    up_the_sizes: dict[str, SizeFindings]  # run → its features found again in larger dictionaries of its seed


@dataclass(frozen=True)
class SweepEvaluation:
    runs: list[Run]
    failed: list[FailedRun]
    comparison: Comparison
    report: dict  # the content of mcs.json
    summary: list[dict]  # the rows of summary.csv
    out_dir: Path


def evaluation_dir(sweep_dir: str | Path) -> Path:
    """Where the evaluation of a sweep goes; checks first that the sweep directory exists."""
    if not Path(sweep_dir).is_dir():
        raise ConfigError(
            f"sweep_dir={str(sweep_dir)!r} is not a directory (expected multirun/<date>/<time>)"
        )
    return Path(sweep_dir) / EVALUATION_DIR


def load_run(run_dir: Path, name: str) -> Run | FailedRun:
    overrides = _hydra_overrides(run_dir)
    if (job_error := load_job_error(run_dir)) is not None:
        return FailedRun(name, run_dir, overrides, {}, f"job failed: {job_error}")
    try:
        cfg = load_run_config(run_dir)
    except CheckpointError as e:
        return FailedRun(name, run_dir, overrides, {}, str(e))
    try:
        sae = load_sae(run_dir)
        metrics = load_metrics(run_dir)
        frequency = load_feature_stats(run_dir).get("frequency")
        if frequency is None or frequency.shape != (sae.d_sae,):
            raise CheckpointError(f"{run_dir} has no per-feature frequency of {sae.d_sae} features")
    except CheckpointError as e:
        return FailedRun(name, run_dir, overrides, cfg, str(e))
    return Run(name, run_dir, overrides, cfg, metrics, sae.W_dec.detach().clone(), frequency.float().numpy())


def discover_runs(sweep_dir: Path, exclude: Path | None = None) -> tuple[list[Run], list[FailedRun]]:
    run_dirs = find_run_dirs(sweep_dir, exclude)
    if not run_dirs:
        raise ConfigError(
            f"sweep_dir={str(sweep_dir)!r} holds no run directories "
            f"(subdirectories with {', '.join(RUN_MARKERS)}); is it the output of `python train.py ... -m`?"
        )
    runs, failed = [], []
    for run_dir in run_dirs:
        loaded = load_run(run_dir, run_dir.relative_to(sweep_dir).as_posix())
        (failed if isinstance(loaded, FailedRun) else runs).append(loaded)
    for f in failed:
        log.warning("run %s cannot be evaluated: %s", f.name, f.reason)
    return runs, failed


RELEASED_PREFIX = "released:"  # names of the dictionaries given with compare_with


def load_released(directories: list[Path], runs: list[Run]) -> list[Run]:
    """Dictionaries others released (any format load_sae reads), to compare with the sweep's runs:
    each joins the sweep's comparison group, and is refused, naming the value, when its d_in or its hook
    point (where its files name one) differs from the sweep's."""
    if not runs:
        raise ConfigError("compare_with needs a sweep with at least one finished run to compare with")
    groups = {(run.cfg.get("hook_point"), run.decoder.shape[1]) for run in runs}
    if len(groups) > 1:
        raise ConfigError(f"compare_with: the sweep has runs at several hook points or widths {sorted(groups, key=str)}")
    ((hook_point, d_in),) = groups
    released = []
    for directory in directories:
        try:
            sae = load_sae(directory)
        except CheckpointError as e:
            raise ConfigError(f"compare_with={str(directory)!r}: {e}") from None
        cfg = sae.run_cfg
        their_hook = cfg.get("hook_point") or cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name")
        if sae.d_in != d_in:
            raise ConfigError(f"compare_with={str(directory)!r} has d_in={sae.d_in}, the sweep's runs d_in={d_in}")
        if their_hook is not None and cfg.get("source_format") != "sparsify" and their_hook != hook_point:
            raise ConfigError(
                f"compare_with={str(directory)!r} reads hook point {their_hook!r}, the sweep's runs {hook_point!r}: "
                "directions of different hook points share no basis"
            )
        # the sweep's model and hook: a released dictionary of the same width and hook point is compared with them
        described = {**cfg, "hook_point": hook_point, "architecture": trained_architecture(cfg),
                     "model_path": runs[0].cfg.get("model_path"), "model_name": runs[0].cfg.get("model_name")}
        name = f"{RELEASED_PREFIX}{Path(directory).name}"
        released.append(Run(name, Path(directory), "", described, {}, sae.W_dec.detach().clone(), None))
        log.info("compare_with: %s (%s, d_sae %d)", directory, described["architecture"], sae.d_sae)
    return released


def matched_cosines(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """One-to-one matching of the rows of `a` and `b` (decoder directions) that maximises the summed
    cosine (Hungarian assignment, scipy's linear_sum_assignment, as in Cunningham et al.'s
    run_mmcs_with_larger): the cosines of the min(n_a, n_b) matched pairs. Unlike max cosine, no row of
    one dictionary can count for several of the other."""
    from scipy.optimize import linear_sum_assignment

    cos = (_unit_rows(a.float().cpu()) @ _unit_rows(b.float().cpu()).T).double().numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return cos[rows, cols]


def _unit_rows(m: torch.Tensor) -> torch.Tensor:
    return m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)


def overlap_stats(values: torch.Tensor, thresholds: tuple[float, ...]) -> dict:
    """Mean MCS and, per threshold, the count and fraction of features at or above it."""
    n = values.numel()
    found = {}
    for t in thresholds:
        count = int((values >= t).sum())
        found[f"{t:g}"] = {"count": count, "fraction": count / n if n else math.nan}
    return {"mean_mcs": values.mean().item() if n else math.nan, "n_features": n, "found": found}


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
            # numpy's PCG64, not torch's generator: the same on every device, and no chance of
            # replaying a torch-seeded SAE initialisation (training seeds torch with small integers too)
            rng = np.random.default_rng(settings.baseline_seed)
            random_dictionaries[shape] = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(
                device
            )
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


# cfg.json keys that may differ between two runs of the same setting (the seed itself, and records)
_NOT_SETTINGS = ("seed", "created", "saesweep_version", "torch_version", "python_version", "tokens_trained",
                 "train_contexts")
_SIZE_KEYS = ("dict_ratio", "d_sae")


def _runs_by_setting(runs: list[Run], ignore: tuple[str, ...]) -> list[list[Run]]:
    """The sweep's own runs (not released ones) in groups whose cfg.json agree but for `ignore`."""
    by_setting: dict[str, list[Run]] = {}
    for run in runs:
        if run.name.startswith(RELEASED_PREFIX) or run.cfg.get("seed") is None:
            continue
        setting = json.dumps({k: v for k, v in run.cfg.items() if k not in ignore}, sort_keys=True, default=str)
        by_setting.setdefault(setting, []).append(run)
    return list(by_setting.values())


def seed_partners(runs: list[Run]) -> dict[str, str]:
    """Each run's partner trained with another `seed` and otherwise the same settings (the first in name
    order): a feature found again by a second seed at the same size is not an accident of initialisation."""
    partners = {}
    for same in _runs_by_setting(runs, _NOT_SETTINGS):
        for run in same:
            other = next((o for o in same if o.cfg["seed"] != run.cfg["seed"]), None)
            if other is not None:
                partners[run.name] = other.name
    return partners


def larger_dictionaries(runs: list[Run]) -> dict[str, list[str]]:
    """Each run's larger dictionaries trained with the same settings and seed, smallest first (its
    place on the sweep's size axis): the seed experiment's "found again in a larger dictionary" compares these."""
    ladders = {}
    for same in _runs_by_setting(runs, tuple(k for k in _NOT_SETTINGS if k != "seed") + _SIZE_KEYS):
        for run in same:
            larger = sorted((o for o in same if o.d_sae > run.d_sae), key=lambda o: (o.d_sae, natural_key(o.name)))
            if larger:
                ladders[run.name] = [o.name for o in larger]
    return ladders


@dataclass(frozen=True)
class SizeFindings:
    """A run's features found again up its size axis (larger dictionaries of the same settings and seed)."""

    next_larger: str  # the smallest larger dictionary
    in_next_larger: int  # features with MCS ≥ found_threshold there
    baseline_in_next_larger: int
    matched_in_next_larger: int | None  # one-to-one matched pairs with cosine ≥ found_threshold
    in_any_larger: int  # features with MCS ≥ found_threshold in at least one larger dictionary
    baseline_in_any_larger: int


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


def build_report(
    sweep_dir: Path, runs: list[Run], failed: list[FailedRun], comparison: Comparison, settings: EvalSettings
) -> dict:
    """The content of mcs.json."""
    largest_of = {run.name: group.largest for group in comparison.groups for run in group.runs}
    partners, up_the_sizes = comparison.seed_partners, comparison.up_the_sizes
    run_entries: dict[str, dict] = {}
    for run in runs:
        largest = largest_of[run.name]
        in_runs = {b: p.found_again for (a, b), p in comparison.pairs.items() if a == run.name}
        partner = partners.get(run.name)
        by_seed = comparison.pairs[run.name, partner] if partner else None
        run_entries[run.name] = {
            "status": "ok",
            "comparison_group": run.comparison_group,
            **{key: run.cfg.get(key) for key in _HYPERPARAMETERS},
            "architecture": trained_architecture(run.cfg),
            "dead_features": run.dead_features,
            "found_again": {
                "threshold": settings.found_threshold,
                "largest": largest.name,
                "in_largest": None if largest is run else in_runs[largest.name],
                "in_runs": in_runs,
                "matched_in_runs": {b: p.matched for (a, b), p in comparison.pairs.items() if a == run.name},
                "larger_same_seed": asdict(up_the_sizes[run.name]) if run.name in up_the_sizes else None,
                "other_seed": None if by_seed is None else {
                    "run": partner,
                    "found_again": by_seed.found_again,
                    "baseline_found_again": by_seed.baseline_found_again,
                    "matched": by_seed.matched,
                    "baseline_matched": by_seed.baseline_matched,
                },
            },
        }
    for f in failed:
        run_entries[f.name] = {"status": "failed", "reason": f.reason, "overrides": f.overrides}
    return {
        "sweep_dir": str(sweep_dir),
        "definition": "mcs_A→B[i] = max_j cos(W_dec_A[i], W_dec_B[j]); found again: mcs ≥ threshold; matched: "
        "pairs of a one-to-one (Hungarian) matching of A and B with cosine ≥ found_threshold",
        "baseline": f"A against a random Gaussian dictionary of B's shape (seed {settings.baseline_seed})",
        "thresholds": list(settings.thresholds),
        "found_threshold": settings.found_threshold,
        "comparison_groups": [
            {"label": g.label, "runs": [r.name for r in g.runs], "largest": g.largest.name}
            for g in comparison.groups
        ],
        "not_compared": (
            "runs in different comparison groups (hook point, d_in, model) are never compared"
            if len(comparison.groups) > 1
            else None
        ),
        "failed": {f.name: f.reason for f in failed},
        "runs": run_entries,
        "pairs": [
            {"a": a, "b": b, **p.trained, "baseline": p.baseline, "matched": p.matched,
             "baseline_matched": p.baseline_matched}
            for (a, b), p in comparison.pairs.items()
        ],
        "headline": headline(runs, failed, comparison),
        "found_in_a_larger_dictionary": {
            "definition": "Σ over runs of their features with MCS ≥ found_threshold in at least one larger "
            "dictionary of the same settings and seed (the seed experiment's count of features found again)",
            "features": sum(f.in_any_larger for f in up_the_sizes.values()),
            "baseline": sum(f.baseline_in_any_larger for f in up_the_sizes.values()),
        },
    }


def headline(runs: list[Run], failed: list[FailedRun], comparison: Comparison) -> dict[str, float]:
    """Flat numbers for a dashboard (the W&B run's summary): per run, its overlap with the largest
    dictionary of its group against chance."""
    numbers: dict[str, float] = {
        "n_runs": len(runs) + len(failed),
        "n_failed": len(failed),
        "n_comparison_groups": len(comparison.groups),
        "n_pairs": len(comparison.pairs),
    }
    for group in comparison.groups:
        for run in group.runs:
            if run is group.largest:
                continue
            p = comparison.pairs[run.name, group.largest.name]
            numbers[f"found_in_largest/{run.name}"] = p.found_again
            numbers[f"found_in_largest_fraction/{run.name}"] = p.found_again / run.d_sae
            numbers[f"baseline_found_in_largest/{run.name}"] = p.baseline_found_again
            numbers[f"mean_mcs_to_largest/{run.name}"] = p.trained["mean_mcs"]
            numbers[f"baseline_mean_mcs_to_largest/{run.name}"] = p.baseline["mean_mcs"]
    return numbers


def summary_rows(runs: list[Run], failed: list[FailedRun], comparison: Comparison) -> list[dict]:
    """One row per run (failed ones included), in name order: hyperparameters, the run's overlap with
    its group's largest dictionary, and every key of its metrics.json."""
    largest_of = {run.name: group.largest for group in comparison.groups for run in group.runs}
    partners, up_the_sizes = comparison.seed_partners, comparison.up_the_sizes
    metric_keys = list(dict.fromkeys(key for run in runs for key in run.metrics))
    # every architecture key of any run (sae.k, sae.l0_coef, ...): a column each, empty where it has none
    sae_keys = list(dict.fromkeys(k for r in [*runs, *failed] for k in (r.cfg.get("sae") or {}) if k != "architecture"))
    rows = []
    for entry in sorted([*runs, *failed], key=lambda r: natural_key(r.name)):
        row = {
            "run": entry.name,
            "status": "failed" if isinstance(entry, FailedRun) else "ok",
            "failure": entry.reason if isinstance(entry, FailedRun) else None,
            "overrides": entry.overrides,
            **{key: entry.cfg.get(key) for key in _HYPERPARAMETERS},
            "architecture": trained_architecture(entry.cfg),
            **{f"sae.{key}": (entry.cfg.get("sae") or {}).get(key) for key in sae_keys},
            "comparison_group": None,
            "largest_in_group": None,
            "dead_features": None,
            "mean_mcs_to_largest": None,
            "found_in_largest": None,
            "baseline_found_in_largest": None,
            "matched_with_largest": None,
            "baseline_matched_with_largest": None,
            "next_larger_run": None,
            "found_in_next_larger": None,
            "baseline_found_in_next_larger": None,
            "matched_with_next_larger": None,
            "found_in_any_larger": None,
            "baseline_found_in_any_larger": None,
            "other_seed_run": None,
            "found_by_other_seed": None,
            "baseline_found_by_other_seed": None,
            "matched_with_other_seed": None,
        }
        if isinstance(entry, Run):
            largest = largest_of[entry.name]
            row |= {
                "comparison_group": entry.comparison_group,
                "largest_in_group": largest.name,
                "dead_features": entry.dead_features,
            }
            if largest is not entry:
                p = comparison.pairs[entry.name, largest.name]
                row |= {
                    "mean_mcs_to_largest": p.trained["mean_mcs"],
                    "found_in_largest": p.found_again,
                    "baseline_found_in_largest": p.baseline_found_again,
                    "matched_with_largest": p.matched,
                    "baseline_matched_with_largest": p.baseline_matched,
                }
            if (up := up_the_sizes.get(entry.name)) is not None:
                row |= {
                    "next_larger_run": up.next_larger,
                    "found_in_next_larger": up.in_next_larger,
                    "baseline_found_in_next_larger": up.baseline_in_next_larger,
                    "matched_with_next_larger": up.matched_in_next_larger,
                    "found_in_any_larger": up.in_any_larger,
                    "baseline_found_in_any_larger": up.baseline_in_any_larger,
                }
            if partner := partners.get(entry.name):
                p = comparison.pairs[entry.name, partner]
                row |= {
                    "other_seed_run": partner,
                    "found_by_other_seed": p.found_again,
                    "baseline_found_by_other_seed": p.baseline_found_again,
                    "matched_with_other_seed": p.matched,
                }
        row |= {key: entry.metrics.get(key) if isinstance(entry, Run) else None for key in metric_keys}
        rows.append(row)
    return rows


def console_table(rows: list[dict], found_threshold: float) -> str:
    """The evaluation as a short table for the console: per run its fidelity (± standard error) and how
    many of its features are found again, beside chance: in the next larger dictionary of the same
    settings and seed when the sweep has a size axis (else in the largest of its group), and by the
    other seed when it has one; then the sweep's total found again in a larger dictionary."""

    def number(row: dict, key: str, digits: int) -> str:
        value, se = row.get(key), row.get(f"{key}_se")
        if value is None:
            return "-"
        return f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")

    def share(found: int, d_sae: int, matched: int | None) -> str:
        return f"{found} of {d_sae} ({found / d_sae:.1%}" + (f", matched {matched / d_sae:.1%})" if matched is not None else ")")

    seeds = any(row.get("other_seed_run") for row in rows)
    sizes = any(row.get("next_larger_run") for row in rows)
    where = "in the next larger, same seed" if sizes else "in the largest"
    header = ["run", "architecture", "d_sae", "L0", "FVU", "ce_recovered", f"found again {where} (MCS ≥ {found_threshold:g})"]
    if seeds:
        header.append("by the other seed")
    table = [header]
    for row in rows:
        if row["status"] != "ok":
            table.append([row["run"], "failed", "", "", "", "", str(row["failure"])[:60]] + [""] * seeds)
            continue
        if sizes:
            found = row.get("found_in_next_larger")
            again = "-" if found is None else (
                f"{share(found, row['d_sae'], row['matched_with_next_larger'])}; chance "
                f"{row['baseline_found_in_next_larger']} in {row['next_larger_run']}")
        elif (found := row["found_in_largest"]) is None:
            again = "(the largest)" if row["largest_in_group"] == row["run"] else "-"
        else:
            again = (f"{share(found, row['d_sae'], row['matched_with_largest'])}; chance "
                     f"{row['baseline_found_in_largest']} in {row['largest_in_group']}")
        line = [row["run"], str(row["architecture"]), str(row["d_sae"]), number(row, "l0", 1),
                number(row, "fvu", 4), number(row, "ce_recovered", 4), again]
        if seeds:
            found = row.get("found_by_other_seed")
            line.append("-" if found is None else (
                f"{share(found, row['d_sae'], row['matched_with_other_seed'])}; chance {row['baseline_found_by_other_seed']}"))
        table.append(line)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
    if sizes:
        total = sum(row.get("found_in_any_larger") or 0 for row in rows)
        chance = sum(row.get("baseline_found_in_any_larger") or 0 for row in rows)
        lines.append(f"features found again in a larger dictionary of the same seed (MCS ≥ {found_threshold:g}), "
                     f"all runs: {total} (chance {chance})")
    return "\n".join(lines)


def write_summary_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


def write_plots(
    out_dir: Path, runs: list[Run], comparison: Comparison, settings: EvalSettings
) -> dict[str, Path]:
    paths = {name: out_dir / file for name, file in PLOT_FILES.items()}
    by_name = {run.name: run for run in runs}
    hist_panels = []
    found_panels = []
    for group in comparison.groups:
        largest = group.largest
        points = []
        for run in group.runs:
            if (run.name, largest.name) not in comparison.values:
                continue
            values, chance = comparison.values[run.name, largest.name]
            hist_panels.append(
                plots.HistogramPanel(
                    title=f"run {run.name} ({run.d_sae} features) → run {largest.name} ({largest.d_sae})",
                    mcs=values,
                    baseline=chance,
                )
            )
            points.append(
                plots.FoundPoint(
                    d_sae=run.d_sae,
                    l1_coef=run.cfg.get("l1_coef"),
                    counts={t: int((values >= t).sum()) for t in settings.thresholds},
                    baseline_counts={t: int((chance >= t).sum()) for t in settings.thresholds},
                )
            )
        if points:
            title = f"found again in run {largest.name} ({largest.d_sae} features)"
            if len(comparison.groups) > 1:
                title += f"\n{group.label}"
            found_panels.append(plots.FoundPanel(title=title, points=points))
    plots.plot_mcs_histograms(paths["mcs_hist"], hist_panels, settings.found_threshold)
    _plot_found_again(paths, runs, comparison, settings.found_threshold)
    plots.plot_features_found(paths["features_found"], found_panels, settings.thresholds)

    names = [run.name for run in runs]
    matrix = np.full((len(names), len(names)), np.nan)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if a == b:
                matrix[i, j] = 1.0
            elif (a, b) in comparison.pairs:
                matrix[i, j] = comparison.pairs[a, b].trained["mean_mcs"]
    labels = [f"{name} ({by_name[name].d_sae})" for name in names]
    plots.plot_mcs_matrix(paths["mcs_matrix"], labels, matrix)
    plots.plot_pareto(
        paths["pareto"],
        [
            plots.ParetoPoint(
                name=run.name,
                l0=run.metrics.get("l0", math.nan),
                fvu=run.metrics.get("fvu", math.nan),
                ce_delta=run.metrics.get("ce_delta", math.nan),
                l1_coef=run.cfg.get("l1_coef"),
                dict_ratio=run.cfg.get("dict_ratio"),
                l0_se=run.metrics.get("l0_se", math.nan),
                fvu_se=run.metrics.get("fvu_se", math.nan),
                ce_delta_se=run.metrics.get("ce_delta_se", math.nan),
                architecture=trained_architecture(run.cfg),
            )
            for run in runs
        ],
    )
    return paths


def _plot_found_again(paths: dict[str, Path], runs: list[Run], comparison: Comparison, threshold: float) -> None:
    """found_by_size.png and mcs_vs_frequency.png: features found again in the next larger dictionary of
    the same seed, and by the other seed, by size and by feature frequency."""
    by_name = {run.name: run for run in runs}
    partners = comparison.seed_partners
    several_architectures = len({trained_architecture(run.cfg) for run in runs}) > 1

    def label(run: Run) -> str:
        return (f"{trained_architecture(run.cfg)}, " if several_architectures else "") + f"seed {run.cfg.get('seed')}"

    def series(pairs: dict[str, str]) -> list[plots.SizeSeries]:
        lines: dict[str, list[Run]] = {}
        for name in pairs:
            lines.setdefault(label(by_name[name]), []).append(by_name[name])
        out = []
        for line_label, members in lines.items():
            members.sort(key=lambda r: r.d_sae)
            found = [int((comparison.values[r.name, pairs[r.name]][0] >= threshold).sum()) for r in members]
            chance = [int((comparison.values[r.name, pairs[r.name]][1] >= threshold).sum()) for r in members]
            out.append(plots.SizeSeries(line_label, [r.d_sae for r in members], found, chance))
        return out

    next_larger = {name: found.next_larger for name, found in comparison.up_the_sizes.items()}
    up, across = "in the next larger dictionary, same seed", "by the other seed, same size"
    plots.plot_found_by_size(paths["found_by_size"], {up: series(next_larger), across: series(partners)}, threshold)

    def frequency_series(pairs: dict[str, str]) -> list[plots.FrequencySeries]:
        return [
            plots.FrequencySeries(f"{name} ({by_name[name].d_sae}) → {other}", by_name[name].frequency,
                                  *comparison.values[name, other])
            for name, other in sorted(pairs.items(), key=lambda kv: natural_key(kv[0]))
            if by_name[name].frequency is not None
        ]

    plots.plot_mcs_by_frequency(
        paths["mcs_vs_frequency"], {up: frequency_series(next_larger), across: frequency_series(partners)}, threshold
    )


def log_to_wandb(
    settings: WandbSettings,
    out_dir: Path,
    group: str,
    summary: list[dict],
    plot_paths: dict[str, Path],
    numbers: dict[str, float],
    config: dict,
) -> None:
    """One evaluation run in the sweep's group: the summary table, the plots and the headline numbers."""
    import wandb  # slow to import; only when a run is wanted

    run = wandb.init(
        mode=settings.mode,
        dir=str(out_dir),
        project=settings.project,
        entity=settings.entity,
        group=group,
        job_type="evaluation",
        name="evaluation",
        config=config,
    )
    try:
        columns = list(summary[0])
        table = wandb.Table(columns=columns, data=[[_table_cell(row[c]) for c in columns] for row in summary])
        run.log({"summary": table, **{name: wandb.Image(str(path)) for name, path in plot_paths.items()}})
        run.summary.update(numbers)
    finally:
        run.finish()


def evaluate_sweep(
    sweep_dir: str | Path,
    settings: EvalSettings | None = None,
    wandb_settings: WandbSettings | None = None,
    out_dir: Path | None = None,
    compare_with: list[Path] | None = None,
) -> SweepEvaluation:
    """Evaluate every run of a sweep and write mcs.json, summary.csv, the plots and the W&B run;
    `compare_with`: released dictionaries (SAELens, sparsify, dictionary_learning or saesweep
    directories) added to the comparison, named `released:<directory name>`."""
    settings = settings or EvalSettings()
    wandb_settings = wandb_settings or WandbSettings()
    sweep_dir = Path(sweep_dir)
    default_out_dir = evaluation_dir(sweep_dir)  # checks sweep_dir
    out_dir = Path(out_dir) if out_dir else default_out_dir
    runs, failed = discover_runs(sweep_dir, exclude=out_dir)
    if compare_with:
        runs = runs + load_released([Path(d) for d in compare_with], runs)
    log.info("%d runs to compare, %d failed", len(runs), len(failed))
    comparison = compare_runs(runs, settings)
    if runs and not comparison.pairs:
        log.warning(
            "no two runs of %s can be compared: MCS needs two dictionaries of the same hook point, d_in and model, "
            "and these runs are %s; fidelity is still summarised",
            sweep_dir, "; ".join(f"{g.label}: {', '.join(r.name for r in g.runs)}" for g in comparison.groups),
        )
    report = build_report(sweep_dir, runs, failed, comparison, settings)
    summary = summary_rows(runs, failed, comparison)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / MCS_FILE, report)
    write_summary_csv(out_dir / SUMMARY_FILE, summary)
    plot_paths = write_plots(out_dir, runs, comparison, settings)
    if wandb_settings.mode != "disabled":
        group = recorded_wandb_group([r.path for r in [*runs, *failed]], sweep_dir)
        config = {"sweep_dir": str(sweep_dir), **asdict(settings)}
        log_to_wandb(wandb_settings, out_dir, group, summary, plot_paths, report["headline"], config)
    log.info("wrote the evaluation of %s to %s", sweep_dir, out_dir)
    return SweepEvaluation(runs, failed, comparison, report, summary, out_dir)


def _hydra_overrides(run_dir: Path) -> str:
    try:
        overrides = yaml.safe_load((run_dir / HYDRA_DIR / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return ""
    return " ".join(str(o) for o in overrides) if isinstance(overrides, list) else ""


def _table_cell(value):
    # A W&B table column holds one type: text cells for everything but numbers and empties.
    return value if value is None or isinstance(value, (int, float)) else str(value)
