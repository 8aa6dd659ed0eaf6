"""What a run says about itself: cfg.json (`describe_run`), the architecture trained with all its keys
(`describe_sae`, also part of the initialisation seed) and its W&B name (`run_name`)."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import saesweep
from saesweep.data import dataset_description
from saesweep.sae import ARCHITECTURES, inference_class, sparsity_knob
from saesweep.synthetic import is_synthetic


def sae_hyperparameters(cfg: DictConfig) -> dict:
    """The architecture's own keys (`sae.*` but `architecture`, `target_l0` and `recipe`), as constructor
    arguments; `sae.target_l0` is the k of an architecture that has one."""
    keys = {k: v for k, v in OmegaConf.to_container(cfg.sae, resolve=True).items()
            if k not in ("architecture", "target_l0", "recipe")}
    if cfg.sae.get("target_l0") is not None and "k" in keys:
        keys["k"] = int(round(cfg.sae.target_l0))
    return keys


def describe_sae(cfg: DictConfig) -> dict:
    """The architecture and all its keys, its recipe included: cfg.json's `sae` (all but the recipe seed
    the initialisation)."""
    target = {"target_l0": cfg.sae.target_l0} if cfg.sae.get("target_l0") is not None else {}
    recipe = {"recipe": OmegaConf.to_container(cfg.sae.recipe, resolve=True)} if cfg.sae.get("recipe") is not None else {}
    return {"architecture": cfg.sae.architecture, **sae_hyperparameters(cfg), **target, **recipe}


def run_name(cfg: DictConfig) -> str:
    """A W&B run's name: the setting it trains, e.g. `topk-k32-x4-s0` or `relu_l1-l1=2-x8-s1` (architecture,
    its sparsity knob: k where it has one, else its sparsity coefficient; dict_ratio, seed); a job of a
    sweep adds its number, ` #3`."""
    sae = cfg.sae
    knob = sparsity_knob(ARCHITECTURES[sae.architecture])
    if knob is None or sae.get(knob) is None:
        sparsity = None
    elif knob == "k":
        sparsity = f"k{sae.k}"
    else:
        sparsity = f"{knob.removesuffix('_coef')}={sae[knob]:g}"
    parts = [sae.architecture, sparsity, f"x{cfg.dict_ratio:g}", f"s{cfg.seed}"]
    return "-".join(str(p) for p in parts if p is not None)


def describe_run(
    cfg: DictConfig, hook_point: str, d_in: int, d_sae: int, tokens_trained: int, train_contexts: int
) -> dict:
    """cfg.json: everything needed to rebuild the SAE and interpret it."""
    return {
        # SAELens's name of what the weights hold (BatchTopK and Matryoshka are saved as JumpReLU); the
        # architecture trained, with all its keys, is `sae`
        "architecture": inference_class(cfg.sae.architecture).saelens_architecture,
        "sae": describe_sae(cfg),
        "d_in": d_in,
        "d_sae": d_sae,
        "dict_ratio": cfg.dict_ratio,
        "l1_coef": cfg.sae.get("l1_coef"),
        "k": cfg.sae.get("k"),
        "hook_point": hook_point,
        # for SAELens (sae_lens.SAE.load_from_disk): how the weights are to be used
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "context_size": cfg.ctx_len,
        "prepend_bos": cfg.data.get("prepend_bos", False),  # synthetic activations have no tokens
        "dataset_path": cfg.data.name or str(Path(cfg.data.path).resolve()),
        # model.path wins when both are set; synthetic activations come from no model
        "model_name": None if cfg.model.path or is_synthetic(cfg.data) else cfg.model.name,
        "model_path": str(Path(cfg.model.path).resolve()) if cfg.model.path and not is_synthetic(cfg.data) else None,
        "dataset": dataset_description(cfg),
        "ctx_len": cfg.ctx_len,
        "eval_n_tokens": cfg.eval.n_tokens,  # the first eval_n_tokens of the held-out order (ContextSource)
        "n_tokens": cfg.n_tokens,
        "epochs": cfg.trainer.get("max_epochs", 1),  # passes over the n_tokens (trainer.max_steps may cut the last)
        "tokens_trained": tokens_trained,
        "train_contexts": train_contexts,  # contexts the harvest read
        "seed": cfg.seed,
        "train": OmegaConf.to_container(cfg.train, resolve=True),
        "saesweep_version": saesweep.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
