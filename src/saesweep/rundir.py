"""The run directory contract (DESIGN.md): what a training job leaves on disk, and loading it back.

Only safetensors and JSON are read back; SAE weights in a pickle file (sae.pt, from other tools) are
refused unless the caller passes trust_pickle=True, since unpickling can run arbitrary code.
"""

from __future__ import annotations

import json
import traceback
from datetime import datetime, timezone
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
PICKLE_SAE_FILES = ("sae.pt", "sae.pth", "sae.bin", "sae.ckpt")
ERROR_FILE = "error.json"  # written by a job that failed; removed when a rerun of it starts


def write_run_dir(run_dir: Path, sae: ReluSae, cfg: dict, result: EvalResult) -> None:
    """Weights, config, metrics and feature statistics, each written atomically; cfg.json last, so a
    directory with cfg.json is complete."""
    run_dir = Path(run_dir)
    atomic_write_safetensors(run_dir / SAE_FILE, {k: v.float() for k, v in sae.tensors().items()})
    atomic_write_safetensors(run_dir / FEATURE_STATS_FILE, result.feature_stats)
    atomic_write_json(run_dir / METRICS_FILE, result.metrics)
    atomic_write_json(run_dir / CFG_FILE, cfg)


def write_job_error(run_dir: Path, error: BaseException) -> None:
    """Record why a job failed, in its run directory, for the user and the evaluator."""
    atomic_write_json(
        Path(run_dir) / ERROR_FILE,
        {
            "type": type(error).__name__,
            "message": str(error),
            "traceback": "".join(traceback.format_exception(error)),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )


def load_job_error(run_dir: Path) -> str | None:
    """`"<type>: <message>"` of a failed job's error.json; None when the job recorded no failure."""
    path = Path(run_dir) / ERROR_FILE
    try:
        record = json.loads(path.read_text())
        return f"{record['type']}: {record['message']}"
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        return f"the job failed, but its {path} is unreadable ({e})"


def load_run_config(run_dir: Path) -> dict:
    path = Path(run_dir) / CFG_FILE
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {run_dir} is not a finished saesweep run directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} holds {type(cfg).__name__}, not a JSON object")
    return cfg


def load_metrics(run_dir: Path) -> dict[str, float]:
    path = Path(run_dir) / METRICS_FILE
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{path} holds {type(metrics).__name__}, not a JSON object")
    return metrics


def load_feature_stats(run_dir: Path) -> dict[str, torch.Tensor]:
    """Per feature: frequency, mean_activation, max_activation on the eval tokens."""
    return _load_safetensors(Path(run_dir) / FEATURE_STATS_FILE)


def load_sae(run_dir: str | Path, device: str | torch.device = "cpu", *, trust_pickle: bool = False) -> ReluSae:
    """Rebuild the SAE of a run directory from sae.safetensors and cfg.json alone.

    Without sae.safetensors, a pickle weights file (PICKLE_SAE_FILES) is loaded only with
    `trust_pickle=True`: unpickling a file can run any code its author put in it.
    """
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
    if d_in <= 0 or d_sae <= 0:
        raise CheckpointError(f"{run_dir / CFG_FILE}: d_in={d_in} and d_sae={d_sae} must be positive")
    path = run_dir / SAE_FILE
    pickled = [run_dir / name for name in PICKLE_SAE_FILES if (run_dir / name).is_file()]
    if path.is_file() or not pickled:
        tensors = _load_safetensors(path)
    else:
        path = pickled[0]
        tensors = _load_pickled_tensors(path, trust_pickle)
    expected = ARCHITECTURES[architecture].parameter_shapes(d_in, d_sae)
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if found != expected:
        raise CheckpointError(
            f"{path} does not match {CFG_FILE} ({architecture}, d_in={d_in}, d_sae={d_sae}): "
            f"expected tensors {expected}, found {found}"
        )
    sae = ARCHITECTURES[architecture](d_in, d_sae)
    sae.load_state_dict(tensors)
    sae.run_cfg = cfg
    return sae.to(device)


def _load_pickled_tensors(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    if not trust_pickle:
        raise CheckpointError(
            f"refusing to load {path}: it is a pickle file, and unpickling can run arbitrary code. Convert it to "
            f"{SAE_FILE}, or, if you trust its source, call load_sae(..., trust_pickle=True)"
        )
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # unpickling a damaged file fails in many ways (EOFError, UnpicklingError, ...)
        raise CheckpointError(f"{path} is not a readable torch pickle file: {type(e).__name__}: {e}") from None
    if not (isinstance(tensors, dict) and all(isinstance(t, torch.Tensor) for t in tensors.values())):
        raise CheckpointError(f"{path} holds {type(tensors).__name__}, not a dict of tensors")
    return tensors


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
