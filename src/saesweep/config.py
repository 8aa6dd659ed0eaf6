"""Checks of a composed config, run before any expensive work; each error names the key, the bad
value and what is allowed."""

from __future__ import annotations

import difflib
import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from saesweep.data import EVAL_SET_KEYS
from saesweep.errors import ConfigError
from saesweep.metrics import HEADLINE_SET
from saesweep.recipe import recipe_problem
from saesweep.sae import ARCHITECTURES, Hyperparameter


def check_config(cfg: DictConfig) -> None:
    """Checks that need no model."""
    if not _number(cfg, "dict_ratio") > 0:
        raise ConfigError(f"dict_ratio={cfg.dict_ratio} must be > 0 (d_sae = dict_ratio × d_in)")
    if _number(cfg, "l1_coef") < 0:
        raise ConfigError(f"l1_coef={cfg.l1_coef} must be ≥ 0")
    if _number(cfg, "ctx_len", integer=True) < 2:
        raise ConfigError(f"ctx_len={cfg.ctx_len} must be ≥ 2 (a context needs a next token to predict)")
    check_architecture(cfg)
    for key in (
        "train.batch_size", "train.checkpoint_every_n_steps", "train.max_bad_steps", "eval.batch_contexts",
        "harvest_batch_contexts", "train.dead_window_tokens", "eval.every_n_steps",
    ):
        if _number(cfg, key, integer=True) <= 0:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be a positive integer")
    check_schedule(cfg)
    if _number(cfg, "n_tokens", integer=True) < cfg.train.batch_size:
        raise ConfigError(
            f"n_tokens={cfg.n_tokens} is less than one batch (train.batch_size={cfg.train.batch_size})"
        )
    if cfg.data.get("name") != "synthetic":
        check_documents(cfg)
    if _number(cfg, "eval.n_tokens", integer=True) < cfg.ctx_len:
        raise ConfigError(f"eval.n_tokens={cfg.eval.n_tokens} is less than one context (ctx_len={cfg.ctx_len})")
    check_eval_sets(cfg)
    check_types(cfg)


def check_jobs(cfgs: Sequence[DictConfig]) -> None:
    """Every job's config alone, and the jobs as one ensemble: what can be checked without the model or data."""
    for cfg in cfgs:
        check_config(cfg)
    check_ensemble(list(cfgs))


def check_eval_sets(cfg: DictConfig) -> None:
    """eval.sets: name → a corpus never trained on. The names become metric prefixes and file names."""
    sets = cfg.eval.get("sets") or {}
    if sets and cfg.data.get("name") == "synthetic":
        raise ConfigError(f"eval.sets={list(sets)} are text corpora, and data=synthetic has no language model to "
                          "read them; allowed: eval.sets={} with data=synthetic")
    for name, spec in sets.items():
        if name == HEADLINE_SET or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
            raise ConfigError(f"eval.sets.{name}: the name must be letters, digits, _ or - (starting with a letter), "
                              f"and not {HEADLINE_SET!r} (the training corpus's own held-out documents)")
        if not isinstance(spec, DictConfig):
            raise ConfigError(f"eval.sets.{name}={spec!r} must be a mapping with a path (a local file) or name "
                              f"(a hub dataset); allowed keys: {', '.join(EVAL_SET_KEYS)}")
        unknown = sorted(set(spec) - set(EVAL_SET_KEYS))
        if unknown:
            raise ConfigError(f"eval.sets.{name} has unknown keys {unknown}; allowed: {', '.join(EVAL_SET_KEYS)}")
        if not spec.get("path") and not spec.get("name"):
            raise ConfigError(f"eval.sets.{name} names no corpus: set its path (a local file) or name (a hub dataset)")


def check_documents(cfg: DictConfig) -> None:
    """The keys that decide how documents become contexts (every data source but synthetic activations)."""
    if _number(cfg, "data.mix_pool_contexts", integer=True) <= 0:
        raise ConfigError(f"data.mix_pool_contexts={cfg.data.mix_pool_contexts} must be a positive integer")
    if not 0 < _number(cfg, "data.heldout_fraction") < 1:
        raise ConfigError(
            f"data.heldout_fraction={cfg.data.heldout_fraction} must be in (0, 1): the fraction of documents held out "
            "for evaluation, the rest trained on"
        )
    per_document = cfg.data.contexts_per_document
    if per_document is not None and _number(cfg, "data.contexts_per_document", integer=True) <= 0:
        raise ConfigError(
            f"data.contexts_per_document={per_document} must be a positive integer, or null for every piece of a document"
        )


# Keys not bounded above, by what they must be; each is checked before anything loads, so that
# `seed=1.5` stops at once instead of after the model is loaded and the store harvested.
_SEED_KEYS = ("seed", "data.seed")
_POSITIVE_INTEGER_KEYS = ("store.shard_tokens", "store.buffer_tokens", "trainer.max_epochs")
_BOOLEAN_KEYS = ("store.drop_special_tokens", "data.prepend_bos", "train.compile", "train.ensemble")


def check_types(cfg: DictConfig) -> None:
    """The keys that only need a type (and a sign): seeds, sizes, switches, Adam's betas, the layer."""
    for key in _SEED_KEYS:
        if not 0 <= _number(cfg, key, integer=True) < 2**32:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be an integer in [0, 2^32)")
    for key in _POSITIVE_INTEGER_KEYS:
        if OmegaConf.select(cfg, key) is not None and _number(cfg, key, integer=True) <= 0:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be a positive integer")
    synthetic = cfg.data.get("name") == "synthetic"
    for key in _BOOLEAN_KEYS:
        if synthetic and key.startswith("data."):  # synthetic activations have no tokens
            continue
        if not isinstance(value := OmegaConf.select(cfg, key), bool):
            raise ConfigError(f"{key}={value!r} is not allowed; allowed: true or false")
    if _number(cfg, "layer", integer=True) < 0:
        raise ConfigError(f"layer={cfg.layer} must be an integer ≥ 0 (a transformer block)")
    for key, allowed in (("hook", False), ("hook_point", True)):
        value = OmegaConf.select(cfg, key)
        if not (isinstance(value, str) and value or (allowed and value is None)):
            raise ConfigError(f"{key}={value!r} is not allowed; allowed: a hook name{' or null' if allowed else ''}")
    if not (isinstance(buffer := cfg.store.get("device_buffer"), bool) or buffer == "auto"):
        raise ConfigError(f"store.device_buffer={buffer!r} is not allowed; allowed: auto, true or false")
    ratio = cfg.store.get("max_norm_ratio")
    if ratio is not None and not _number(cfg, "store.max_norm_ratio") > 0:
        raise ConfigError(f"store.max_norm_ratio={ratio} must be > 0, or null to keep every activation")
    if cfg.get("target_l0") is not None and not _number(cfg, "target_l0") > 0:
        raise ConfigError(f"target_l0={cfg.target_l0} must be > 0, or null")
    betas = cfg.train.adam_betas
    if not (OmegaConf.is_list(betas) and len(betas) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas
    )):
        raise ConfigError(f"train.adam_betas={_plain(betas)!r} is not allowed; allowed: two numbers in [0, 1)")


def _plain(value: object) -> object:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def check_schedule(cfg: DictConfig) -> None:
    """The learning rate and its schedule (the architecture's sae.recipe): warm-up, constant, decay to zero."""
    recipe = cfg.sae.get("recipe")
    if (problem := recipe_problem(OmegaConf.to_object(recipe) if OmegaConf.is_config(recipe) else recipe)) is not None:
        raise ConfigError(problem)
    warmup, decay = _number(cfg, "train.lr_warmup_max_fraction"), recipe.lr_decay_fraction
    if not 0 < warmup <= 1:
        raise ConfigError(f"train.lr_warmup_max_fraction={warmup} must be in (0, 1]: the largest share of the steps "
                          "the warm-up may take")
    if warmup + decay > 1:
        raise ConfigError(f"train.lr_warmup_max_fraction={warmup} and sae.recipe.lr_decay_fraction={decay} sum to more "
                          "than 1: the warm-up would run into the decay")


# Each architecture key and the values it allows: (integer, lowest, lowest allowed itself, may be null)
# a key every architecture takes: the L0 its sparsity coefficient is steered to (target_l0.py)
TARGET_L0 = Hyperparameter(None, "steer the sparsity coefficient (or set k) so that L0 reaches this", inclusive=False)


def check_architecture(cfg: DictConfig) -> None:
    """`sae.architecture` is known, every `sae.*` key is one of its keys, each value one its
    Hyperparameter allows."""
    architecture = cfg.sae.architecture
    if not isinstance(architecture, str) or architecture not in ARCHITECTURES:
        close = difflib.get_close_matches(str(architecture), ARCHITECTURES, n=3, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ConfigError(f"sae.architecture={architecture!r} is unknown; allowed: {sorted(ARCHITECTURES)}{hint}")
    own = ARCHITECTURES[architecture].hyperparameters
    for key in cfg.sae:
        if key in ("architecture", "recipe"):  # the recipe: check_schedule
            continue
        hyperparameter = TARGET_L0 if key == "target_l0" else own.get(key)
        value = OmegaConf.select(cfg, f"sae.{key}")
        if hyperparameter is None:
            raise ConfigError(
                f"sae.{key}={value!r} is not a key of sae={architecture}; its keys: "
                f"{', '.join(sorted(own)) or 'none'} (choose the architecture with sae=NAME)"
            )
        value = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
        if (problem := hyperparameter.problem(value)) is not None:
            raise ConfigError(f"sae.{key}={value!r} {problem}")


def _number(cfg: DictConfig, key: str, integer: bool = False) -> float:
    """The value at `key`, which must be a finite number (an integer when `integer`): a mistyped
    override such as `l1_coef=1e-3x` arrives as a string and would otherwise fail deep inside."""
    value = OmegaConf.select(cfg, key)
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        allowed = "an integer" if integer else "a finite number"
        raise ConfigError(f"{key}={value!r} is not {allowed}")
    return value


def check_with_model(cfg: DictConfig, n_ctx: int, d_in: int) -> int:
    """Checks that need the model's size; returns d_sae."""
    if cfg.ctx_len > n_ctx:
        raise ConfigError(f"ctx_len={cfg.ctx_len} exceeds the model's context length n_ctx={n_ctx}")
    d_sae = cfg.dict_ratio * d_in
    if not math.isfinite(d_sae) or abs(d_sae - round(d_sae)) > 1e-9:
        raise ConfigError(
            f"dict_ratio={cfg.dict_ratio} gives a non-integer d_sae={d_sae} for d_in={d_in}; "
            "choose a ratio whose product with d_in is a whole number"
        )
    d_sae = int(round(d_sae))
    if "k" in cfg.sae and cfg.sae.k > d_sae:
        raise ConfigError(f"sae.k={cfg.sae.k} exceeds d_sae={d_sae} (dict_ratio={cfg.dict_ratio} × d_in={d_in})")
    sizes = cfg.sae.get("group_sizes")
    if sizes is not None and sum(sizes) != d_sae:
        raise ConfigError(
            f"sae.group_sizes={list(sizes)} sum to {sum(sizes)}, but d_sae={d_sae} (dict_ratio={cfg.dict_ratio} × "
            f"d_in={d_in}); allowed: sizes summing to d_sae, or null for d_sae/8, d_sae/8, d_sae/4, d_sae/2"
        )
    return d_sae


def check_writable_dir(key: str, path: Path) -> None:
    """`path` is, or can be created as, a directory this process can write files in."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={str(path)!r} cannot be a directory: {existing} is a file; allowed: a writable directory")
    try:  # a real write, not os.access: root passes access checks on read-only mounts too
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(
            f"{key}={str(path)!r} is not writable ({existing}: {e.strerror}); allowed: a writable directory"
        ) from None


# What may differ between the dictionaries of one ensemble (train.ensemble=true): they read one
# activation stream with one schedule, so everything else must be the same. `sae` is the architecture
# and its keys.
ENSEMBLE_KEYS = ("dict_ratio", "l1_coef", "target_l0", "sae")


def _shared_settings(cfg: DictConfig) -> dict[str, object]:
    """Every setting of a job that its ensemble's other members must share (all but ENSEMBLE_KEYS)."""
    return {
        k: v for k, v in _flatten(OmegaConf.to_container(cfg, resolve=True)).items()
        if k.split(".")[0] not in ENSEMBLE_KEYS
    }


def check_ensemble(cfgs: list[DictConfig]) -> None:
    """The configs can be trained together in one pass: they differ only in ENSEMBLE_KEYS."""
    if not cfgs:
        raise ConfigError("an ensemble needs at least one job")
    first = _shared_settings(cfgs[0])
    for cfg in cfgs[1:]:
        other = _shared_settings(cfg)
        differing = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if differing:
            raise ConfigError(
                f"train.ensemble=true trains dictionaries that differ only in {', '.join(ENSEMBLE_KEYS)}; "
                f"these jobs also differ in: {', '.join(differing)}. Sweep those in separate runs, or drop "
                "train.ensemble"
            )


def ensemble_groups(cfgs: Sequence[DictConfig]) -> list[list[int]]:
    """The jobs of a sweep as ensembles, in order of first appearance: indices of the jobs that differ
    only in ENSEMBLE_KEYS go together (`seed=0,1 dict_ratio=1,2,4,8` → two ensembles of four)."""
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault(repr(sorted(_shared_settings(cfg).items(), key=lambda kv: kv[0])), []).append(i)
    return list(groups.values())


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"train": {"lr": 1}} → {"train.lr": 1}: leaves under their dotted override names."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_distributed(cfg: DictConfig, multirun: bool) -> None:
    """DDP with several processes per job needs a job that runs alone (or one Slurm task per device):
    Lightning starts the other ranks by rerunning this command line, which in a local multirun
    would rerun the whole sweep."""
    trainer = cfg.trainer
    strategy, devices = str(trainer.get("strategy", "auto")), trainer.get("devices", 1)
    several = not isinstance(devices, int) or devices > 1 or trainer.get("num_nodes", 1) > 1
    if multirun and strategy.startswith("ddp") and several and "SLURM_NTASKS" not in os.environ:
        raise ConfigError(
            f"trainer.strategy={strategy} with trainer.devices={devices} cannot run inside a local sweep (-m or "
            "train.ensemble=true): Lightning would start each extra process by rerunning the whole sweep. "
            "Run the job on its own (python train.py trainer=ddp ...), or sweep with hydra/launcher=slurm "
            "and hydra.launcher.tasks_per_node=<devices>"
        )
