"""The dictionaries an evaluation compares: a sweep's finished runs (and why the others cannot be
evaluated), released dictionaries given with compare_with, and how runs relate (the same setting
with another seed; the larger dictionaries of the same setting and seed)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from saesweep.errors import CheckpointError, ConfigError
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
)
from saesweep.sae import ARCHITECTURES, trained_architecture

log = logging.getLogger(__name__)

RELEASED_PREFIX = "released:"  # names of the dictionaries given with compare_with
# cfg.json keys that may differ between two runs of the same setting (the seed itself, and records)
_NOT_SETTINGS = ("seed", "created", "saesweep_version", "torch_version", "python_version", "tokens_trained",
                 "train_contexts")
_SIZE_KEYS = ("dict_ratio", "d_sae")


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
        return f"{self.cfg.get('hook_point')} d_in={self.decoder.shape[1]} model={self.model}"

    @property
    def model(self) -> str | None:
        """The language model it reads: its path, or its hub name."""
        return self.cfg.get("model_path") or self.cfg.get("model_name")


@dataclass(frozen=True)
class FailedRun:
    """A run directory that cannot be evaluated: the job failed, is still running or is corrupt."""

    name: str
    path: Path
    overrides: str
    cfg: dict  # cfg.json when readable, else {}
    reason: str


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


def load_released(directories: list[Path], runs: list[Run]) -> list[Run]:
    """Dictionaries others released (any format load_sae reads), to compare with the sweep's runs. One
    of the sweep's model joins the sweep's comparison group, and is refused, naming the value, when its
    d_in or its hook point (where its files name one) differs from the sweep's. One whose files name
    another model keeps its model and hook point: it forms a group of its own, compared with the sweep's
    runs by activation on the same tokens (activation_similarity), which needs no shared basis."""
    if not runs:
        raise ConfigError("compare_with needs a sweep with at least one finished run to compare with")
    groups = {(run.cfg.get("hook_point"), run.decoder.shape[1]) for run in runs}
    released = []
    for directory in directories:
        try:
            sae = load_sae(directory)
        except CheckpointError as e:
            raise ConfigError(f"compare_with={str(directory)!r}: {e}") from None
        cfg = sae.run_cfg
        their_hook = cfg.get("hook_point") or cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name")
        name = f"{RELEASED_PREFIX}{Path(directory).name}"
        their_model = cfg.get("model_path") or cfg.get("model_name") or (cfg.get("metadata") or {}).get("model_name")
        if their_model is not None and their_model not in {run.model for run in runs}:
            if their_hook is None:
                raise ConfigError(f"compare_with={str(directory)!r} is from model {their_model!r} and names no hook point")
            described = {**cfg, "hook_point": their_hook, "architecture": trained_architecture(cfg),
                         "model_path": cfg.get("model_path"), "model_name": None if cfg.get("model_path") else their_model}
            released.append(Run(name, Path(directory), "", described, {}, sae.W_dec.detach().clone(), None))
            log.info("compare_with: %s (model %s at %s, d_sae %d): compared by activation", directory, their_model,
                     their_hook, sae.d_sae)
            continue
        if len(groups) > 1:
            raise ConfigError(f"compare_with: the sweep has runs at several hook points or widths {sorted(groups, key=str)}")
        ((hook_point, d_in),) = groups
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
        released.append(Run(name, Path(directory), "", described, {}, sae.W_dec.detach().clone(), None))
        log.info("compare_with: %s (%s, d_sae %d)", directory, described["architecture"], sae.d_sae)
    return released


def _runs_by_setting(runs: list[Run], ignore: tuple[str, ...]) -> list[list[Run]]:
    """The sweep's own runs (not released ones) in groups whose cfg.json agree but for `ignore`."""
    by_setting: dict[str, list[Run]] = {}
    for run in runs:
        if run.name.startswith(RELEASED_PREFIX) or run.cfg.get("seed") is None:
            continue
        by_setting.setdefault(_setting(run.cfg, ignore), []).append(run)
    return list(by_setting.values())


def _setting(cfg: dict, ignore: tuple[str, ...]) -> str:
    """What a run was asked to train, as a key: its cfg.json but for `ignore`. Under sae.target_l0 the
    sparsity coefficient is where the controller left it, an outcome that differs between seeds, not a
    setting: it is left out (in `sae` and its top-level copy)."""
    setting = {k: v for k, v in cfg.items() if k not in ignore}
    sae = dict(setting.get("sae") or {})
    cls = ARCHITECTURES.get(sae.get("architecture") or "")
    if sae.get("target_l0") is not None and cls is not None and cls.sparsity_coefficient:
        sae.pop(cls.sparsity_coefficient, None)
        setting.pop(cls.sparsity_coefficient, None)
        setting["sae"] = sae
    return json.dumps(setting, sort_keys=True, default=str)


def settings_with_seeds(runs: list[Run]) -> list[list[Run]]:
    """The sweep's settings trained with two or more seeds: their runs, one list per setting."""
    return [same for same in _runs_by_setting(runs, _NOT_SETTINGS) if len({r.cfg["seed"] for r in same}) > 1]


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


def _hydra_overrides(run_dir: Path) -> str:
    try:
        overrides = yaml.safe_load((run_dir / HYDRA_DIR / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return ""
    return " ".join(str(o) for o in overrides) if isinstance(overrides, list) else ""
