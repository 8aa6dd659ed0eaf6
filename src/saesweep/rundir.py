"""The run directory contract (DESIGN.md): what a training job leaves on disk, and loading it back.

Only safetensors and JSON are read back; nothing is unpickled.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from saesweep.errors import CheckpointError
from saesweep.io import atomic_write_json, atomic_write_safetensors
from saesweep.metrics import EvalResult
from saesweep.sae import ARCHITECTURES, ReluSae

SAE_FILE = "sae.safetensors"
CFG_FILE = "cfg.json"
METRICS_FILE = "metrics.json"
FEATURE_STATS_FILE = "feature_stats.safetensors"
CHECKPOINT_DIR = "checkpoints"
HYDRA_DIR = ".hydra"  # what Hydra writes into every job directory before the job runs
RUN_MARKERS = (CFG_FILE, SAE_FILE, HYDRA_DIR)


def write_run_dir(run_dir: Path, sae: ReluSae, cfg: dict, result: EvalResult) -> None:
    """Weights, config, metrics and feature statistics, each written atomically; cfg.json last, so a
    directory with cfg.json is complete."""
    run_dir = Path(run_dir)
    atomic_write_safetensors(run_dir / SAE_FILE, {k: v.float() for k, v in sae.tensors().items()})
    atomic_write_safetensors(run_dir / FEATURE_STATS_FILE, result.feature_stats)
    atomic_write_json(run_dir / METRICS_FILE, result.metrics)
    atomic_write_json(run_dir / CFG_FILE, cfg)


def load_run_config(run_dir: Path) -> dict:
    return _load_json_object(Path(run_dir) / CFG_FILE, f"{run_dir} is not a finished saesweep run directory")


def load_metrics(run_dir: Path) -> dict[str, float]:
    return _load_json_object(Path(run_dir) / METRICS_FILE, "the job did not finish")


def _load_json_object(path: Path, when_missing: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {when_missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds {type(obj).__name__}, not a JSON object")
    return obj


def load_feature_stats(run_dir: Path) -> dict[str, torch.Tensor]:
    """Per feature: frequency, mean_activation, max_activation on the eval tokens."""
    return _load_safetensors(Path(run_dir) / FEATURE_STATS_FILE)


def load_sae(run_dir: str | Path, device: str | torch.device = "cpu") -> ReluSae:
    """Rebuild the SAE of a run directory from sae.safetensors and cfg.json alone."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    try:
        architecture, d_in, d_sae = cfg["architecture"], int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{run_dir / CFG_FILE} lacks a valid architecture/d_in/d_sae: {e}") from None
    if architecture not in ARCHITECTURES:
        raise CheckpointError(
            f"{run_dir / CFG_FILE}: architecture {architecture!r} is unknown; allowed: {sorted(ARCHITECTURES)}"
        )
    sae = ARCHITECTURES[architecture](d_in, d_sae)
    path = run_dir / SAE_FILE
    tensors = _load_safetensors(path)
    expected = sae.expected_shapes()
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if found != expected:
        raise CheckpointError(
            f"{path} does not match {CFG_FILE} ({architecture}, d_in={d_in}, d_sae={d_sae}): "
            f"expected tensors {expected}, found {found}"
        )
    sae.load_state_dict(tensors)
    sae.run_cfg = cfg
    return sae.to(device)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def find_run_dirs(sweep_dir: Path, exclude: Path | None = None) -> list[Path]:
    """Directories under `sweep_dir` that a training job wrote to (cfg.json, sae.safetensors or a
    Hydra .hydra/), in natural name order ("2" before "10"); `exclude` (the evaluation output) is skipped."""
    excluded = exclude.resolve() if exclude else None
    found = []
    pending = [Path(sweep_dir)]
    while pending:
        directory = pending.pop()
        for child in directory.iterdir():
            if not child.is_dir() or child.is_symlink() or child.resolve() == excluded:
                continue
            if any((child / marker).exists() for marker in RUN_MARKERS):
                found.append(child)
            else:
                pending.append(child)
    return sorted(found, key=lambda p: natural_key(p.relative_to(sweep_dir).as_posix()))


def run_dirs_in(sweep_dir: str | Path) -> list[Path]:
    """The finished run directories (those with cfg.json) anywhere under `sweep_dir`, in natural order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise CheckpointError(f"sweep directory {sweep_dir} does not exist")
    return [run for run in find_run_dirs(sweep_dir) if (run / CFG_FILE).is_file()]


def natural_key(name: str) -> list:
    """Sort key that puts "2" before "10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
