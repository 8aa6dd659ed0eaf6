"""What an ensemble (several dictionaries trained in one pass, `train.ensemble=true`) needs beyond a
lone job: one logger per dictionary, and one checkpoint per run directory cut from the shared one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers.logger import Logger

from saesweep.checkpoints import AtomicCheckpointIO
from saesweep.target_l0 import TargetL0


class RunLogger(Logger):
    """One dictionary's own logger (its W&B run): gets the metrics logged under its `prefix`, with the
    prefix taken off, and those under no dictionary's prefix (Lightning's `epoch`)."""

    def __init__(self, inner: Logger, prefix: str, all_prefixes: Sequence[str]):
        super().__init__()
        self.inner = inner
        self.prefix = prefix
        self.others = tuple(p for p in all_prefixes if p != prefix)

    @property
    def name(self) -> str | None:
        return self.inner.name

    @property
    def version(self) -> int | str | None:
        return self.inner.version

    @property
    def save_dir(self) -> str | None:
        return self.inner.save_dir

    @property
    def experiment(self) -> Any:
        return self.inner.experiment

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        # each run was given its own job's config when it was made; the module's are the ensemble's
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        own = {k[len(self.prefix):]: v for k, v in metrics.items() if k.startswith(self.prefix)}
        unowned = {k: v for k, v in metrics.items() if not k.startswith((self.prefix, *self.others))}
        if own:
            self.inner.log_metrics(own | unowned, step)

    def finalize(self, status: str) -> None:
        self.inner.finalize(status)


def write_member_checkpoints(ensemble_ckpt: Path, paths: Sequence[Path], resume_keys: Sequence[dict]) -> None:
    """The ensemble checkpoint cut down to each SAE i, written to `paths[i]`: what a lone job of that SAE
    trained on the same batches would have written (its weights, its Adam moments, the shared schedule
    and stream position), so each run directory has a checkpoint of its own like every other. SAE i's
    optimizer state is its parameter group i (MemberAdam)."""
    checkpoint = torch.load(ensemble_ckpt, map_location="cpu", weights_only=True)  # read once for all
    for index, (path, resume_key) in enumerate(zip(paths, resume_keys)):
        prefix = f"saes.{index}."
        member = {
            **checkpoint,
            "state_dict": {
                (f"saes.0.{k[len(prefix):]}" if k.startswith(prefix) else k): v
                for k, v in checkpoint["state_dict"].items()
                if k.startswith(prefix) or not k.startswith("saes.")
            },
            "optimizer_states": [_group_alone(optimizer, index) for optimizer in checkpoint["optimizer_states"]],
            "saesweep_resume_key": resume_key,
        }
        member["callbacks"] = {
            key: TargetL0.member_state(state, index) if key.startswith(TargetL0.__qualname__) else state
            for key, state in checkpoint.get("callbacks", {}).items()
        }
        for key in ("saesweep_tokens_since_fired",):
            if key in checkpoint:
                member[key] = [checkpoint[key][index]]
        member.pop("saesweep_dropped", None)
        AtomicCheckpointIO().save_checkpoint(member, path)


def _group_alone(optimizer: dict, index: int) -> dict:
    """An optimizer state dict reduced to parameter group `index`, its parameters renumbered from 0."""
    group = optimizer["param_groups"][index]
    return {
        **optimizer,
        "state": {n: optimizer["state"][p] for n, p in enumerate(group["params"]) if p in optimizer["state"]},
        "param_groups": [{**group, "params": list(range(len(group["params"])))}],
    }
