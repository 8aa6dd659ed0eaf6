"""The run directory contract (README, "The run directory"): what a training job leaves on disk, and loading it back;
a run's settings (cfg.json) and its W&B group, one rule for its training, evaluation, report and steering runs.

Only safetensors and JSON are read back; SAE weights in a pickle file (sae.pt, from other tools) are
refused unless the caller passes trust_pickle=True, since unpickling can run arbitrary code.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from saesweep.data import HeldOutContexts, context_source
from saesweep.errors import CheckpointError, SaesweepError
from saesweep.foreign import read_foreign
from saesweep.io import atomic_write_json, atomic_write_safetensors
from saesweep.metrics import EvalResult
from saesweep.sae import ARCHITECTURES, Sae, saelens_architectures, saved_class

# SAELens's file name, so that sae_lens.SAE.load_from_disk reads a run directory as it is; runs from
# before it have LEGACY_SAE_FILE, which every loader still reads
SAE_FILE = "sae_weights.safetensors"
LEGACY_SAE_FILE = "sae.safetensors"
CFG_FILE = "cfg.json"
METRICS_FILE = "metrics.json"
FEATURE_STATS_FILE = "feature_stats.safetensors"
CHECKPOINT_DIR = "checkpoints"
HYDRA_DIR = ".hydra"  # what Hydra writes into every job directory before the job runs
MULTIRUN_FILE = "multirun.yaml"  # what Hydra writes into a sweep directory
ENSEMBLE_DIR = ".ensemble"  # in the sweep directory: the shared checkpoint while an ensemble trains
RUN_MARKERS = (CFG_FILE, SAE_FILE, LEGACY_SAE_FILE, HYDRA_DIR)
PICKLE_SAE_FILES = ("sae.pt", "sae.pth", "sae.bin", "sae.ckpt")
ERROR_FILE = "error.json"  # written by a job that failed; removed when a rerun of it starts
LOCK_FILE = ".saesweep.lock"  # held by the job writing the directory; names it (host, pid, start)


class RunDirBusyError(SaesweepError):
    """Another live job is writing the run directory."""


_held_locks: dict[Path, object] = {}  # run directories this process holds, with their open lock files


def lock_run_dir(run_dir: Path) -> bool:
    """Hold `run_dir`'s lock (until `unlock_run_dir` or the end of the process), so that no second job
    writes the same directory at the same time; a second job gets RunDirBusyError naming the holder.
    The lock is the kernel's (flock): a dead holder's lock is gone with it and is taken over. False
    where this process holds it already (or is not a DDP job's first rank): nothing to release."""
    run_dir = Path(run_dir).absolute()
    if run_dir in _held_locks or not _is_first_rank():
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_file = open(run_dir / LOCK_FILE, "a+")  # noqa: SIM115 -- held open until the process ends
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        try:
            holder = json.loads(lock_file.read())
            who = f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
        except (json.JSONDecodeError, KeyError, TypeError):
            who = "a job that has not yet written its name"
        lock_file.close()
        raise RunDirBusyError(
            f"run directory {run_dir} is in use by another job ({who}); wait for it to end, or give this job "
            "its own directory (hydra.run.dir=... or hydra.sweep.dir=...)"
        ) from None
    lock_file.seek(0)
    lock_file.truncate()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lock_file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started}))
    lock_file.flush()
    _held_locks[run_dir] = lock_file
    return True


def unlock_run_dir(run_dir: Path) -> None:
    lock_file = _held_locks.pop(Path(run_dir).absolute())
    fcntl.flock(lock_file, fcntl.LOCK_UN)
    lock_file.close()


@contextmanager
def locked_run_dirs(run_dirs: Sequence[Path]) -> Iterator[None]:
    """Every one of `run_dirs` locked (lock_run_dir) for the block, and released after it; the locks
    taken before a RunDirBusyError are released at once. A sweep of many jobs in one process thus
    holds only the current job's."""
    locked: list[Path] = []
    try:
        for run_dir in run_dirs:
            if lock_run_dir(run_dir):
                locked.append(run_dir)
        yield
    finally:
        for run_dir in locked:
            unlock_run_dir(run_dir)


def _is_first_rank() -> bool:
    """Not one of the extra processes of a DDP job (which share rank 0's run directory)."""
    return all(os.environ.get(key, "0") == "0" for key in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


def write_run_dir(run_dir: Path, sae: Sae, cfg: dict, result: EvalResult) -> None:
    """Weights, config, metrics and feature statistics, each written atomically; cfg.json last, so a
    directory with cfg.json is complete."""
    run_dir = Path(run_dir)
    atomic_write_safetensors(run_dir / SAE_FILE, {k: v.float() for k, v in sae.tensors().items()})
    atomic_write_safetensors(run_dir / FEATURE_STATS_FILE, result.feature_stats)
    atomic_write_json(run_dir / METRICS_FILE, result.metrics)
    atomic_write_json(run_dir / CFG_FILE, cfg)


def is_finished(run_dir: Path) -> bool:
    """The directory holds a finished run: its weights, metrics.json and cfg.json (written last)."""
    return all((run_dir / name).is_file() for name in (METRICS_FILE, CFG_FILE)) and weights_file(run_dir).is_file()


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
    return _load_json_object(Path(run_dir) / CFG_FILE, f"{run_dir} is not a finished saesweep run directory")


def run_setting(run_cfg: dict, *keys: str):
    """A value of cfg.json (nested keys), or a CheckpointError naming the missing key."""
    value = run_cfg
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise CheckpointError(f"cfg.json has no {'.'.join(keys)}: the run directory is from an older saesweep")
        value = value[key]
    return value


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


def weights_file(run_dir: Path) -> Path:
    """The weights of a run directory: SAE_FILE, or LEGACY_SAE_FILE in runs from before it."""
    legacy = Path(run_dir) / LEGACY_SAE_FILE
    return legacy if legacy.is_file() and not (Path(run_dir) / SAE_FILE).is_file() else Path(run_dir) / SAE_FILE


def load_sae(run_dir: str | Path, device: str | torch.device = "cpu", *, trust_pickle: bool = False) -> Sae:
    """Rebuild the SAE of a run directory (or of a SAELens directory) from its weights and cfg.json alone.

    Without a safetensors weights file, a pickle weights file (PICKLE_SAE_FILES) is loaded only with
    `trust_pickle=True`: unpickling a file can run any code its author put in it.
    """
    run_dir = Path(run_dir)
    foreign = read_foreign(run_dir, lambda path: _load_pickled_tensors(path, trust_pickle))
    if foreign is None and not (run_dir / CFG_FILE).is_file():
        raise CheckpointError(
            f"{run_dir} is not a finished saesweep run directory, nor a SAELens (cfg.json + {SAE_FILE}), sparsify "
            "(cfg.json + sae.safetensors) or dictionary_learning (config.json + ae.pt) directory"
        )
    cfg = foreign[0] if foreign else load_run_config(run_dir)
    try:
        architecture, d_in, d_sae = cfg["architecture"], int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{run_dir / CFG_FILE} lacks a valid architecture/d_in/d_sae: {e}") from None
    cls = saved_class(cfg)  # BatchTopK and Matryoshka runs hold their JumpReLU form
    if cls is None:
        raise CheckpointError(
            f"{run_dir / CFG_FILE}: architecture {architecture!r} is unknown; allowed: {sorted(ARCHITECTURES)} "
            f"or SAELens's {sorted(saelens_architectures())}"
        )
    if d_in <= 0 or d_sae <= 0:
        raise CheckpointError(f"{run_dir / CFG_FILE}: d_in={d_in} and d_sae={d_sae} must be positive")
    # SAELens settings that change what the weights compute, which saesweep's SAEs do not have
    for key, supported in (("apply_b_dec_to_input", True), ("normalize_activations", "none"), ("reshape_activations", "none")):
        if cfg.get(key, supported) != supported:
            raise CheckpointError(f"{run_dir / CFG_FILE}: {key}={cfg[key]!r} is not supported; allowed: {supported!r}")
    path = weights_file(run_dir)
    pickled = [run_dir / name for name in PICKLE_SAE_FILES if (run_dir / name).is_file()]
    if foreign:
        tensors = foreign[1]
    elif path.is_file() or not pickled:
        tensors = _load_safetensors(path)
    else:
        path = pickled[0]
        tensors = _load_pickled_tensors(path, trust_pickle)
    expected = cls.parameter_shapes(d_in, d_sae)
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if found != expected:
        raise CheckpointError(
            f"{path} does not match {CFG_FILE} ({architecture}, d_in={d_in}, d_sae={d_sae}): "
            f"expected tensors {expected}, found {found}"
        )
    saved_keys = cfg.get("sae") or {k: cfg[k] for k in ("k",) if k in cfg}  # SAELens's TopK keeps k at the top
    sae = cls(d_in, d_sae, **{k: v for k, v in saved_keys.items() if k in cls.hyperparameters})
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


def find_run_dirs(sweep_dir: Path, exclude: Path | None = None) -> list[Path]:
    """Directories under `sweep_dir` that a training job wrote to (cfg.json, the weights or a
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


def sweep_dir_of(run_dir: Path) -> Path | None:
    """The sweep a run directory belongs to: the nearest folder above it holding Hydra's multirun.yaml
    (spelt the way `run_dir` is); None for a job outside a sweep."""
    return next((d for d in Path(run_dir).parents if (d / MULTIRUN_FILE).is_file()), None)


def wandb_group(run_dir: Path, sweep_dir: Path | None = None) -> str:
    """A run's W&B group, the one rule for its training, evaluation, report and steering runs: the
    sweep directory its training job was given (hydra.sweep.dir), so that every run of a sweep shares
    one group; a job outside a sweep is a group of its own, its run directory. Training knows both;
    the tools that come after it read them back with `recorded_wandb_group`."""
    return str(Path(sweep_dir or run_dir))


def recorded_wandb_group(run_dirs: Sequence[Path], sweep_dir: Path | None = None) -> str:
    """`wandb_group` of runs trained earlier, from their Hydra record (.hydra/hydra.yaml): the sweep
    directory as the jobs saw it, however the user spells it now.

    `sweep_dir`: the runs' sweep (default: `sweep_dir_of` the first run). Hydra records sweep.dir
    unresolved (`multirun/${now:...}`) and the working directory it was relative to, so a relative one
    is rebuilt from those; a lone job's group is its recorded output directory. Without a Hydra
    record: the sweep directory, or the run directory, as given.
    """
    sweep_dir = sweep_dir or (sweep_dir_of(run_dirs[0]) if run_dirs else None)
    for run_dir in run_dirs:
        try:
            hydra = yaml.safe_load((Path(run_dir) / HYDRA_DIR / "hydra.yaml").read_text())["hydra"]
            runtime, configured = hydra["runtime"], str(hydra["sweep"]["dir"])
            cwd = str(runtime["cwd"])
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            continue
        if sweep_dir is None:
            return wandb_group(Path(runtime.get("output_dir") or run_dir))
        if not Path(configured).is_absolute():
            configured = os.path.relpath(Path(sweep_dir).absolute(), cwd)
        elif "${" in configured:
            configured = str(Path(sweep_dir).absolute())
        return wandb_group(Path(run_dir), Path(configured))
    return wandb_group(Path(run_dirs[0]) if run_dirs else sweep_dir, sweep_dir)


def held_out_contexts(tokenizer, run_cfg: dict, n_tokens: int, purpose: str) -> HeldOutContexts:
    """The first contexts of the held-out order of a run's dataset (its cfg.json), `n_tokens` rounded up to
    whole contexts; `purpose` names them in the error when the held-out documents are too few."""
    ctx_len = run_setting(run_cfg, "ctx_len")
    dataset = run_setting(run_cfg, "dataset")
    run_setting(run_cfg, "dataset", "heldout_fraction")  # runs before held-out documents cannot be rebuilt
    return context_source(dataset, tokenizer, ctx_len).held_out_contexts(-(-n_tokens // ctx_len), purpose)
