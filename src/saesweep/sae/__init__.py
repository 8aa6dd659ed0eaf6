"""The SAE architectures, one class per file, registered by name (the `sae` config group)."""

from __future__ import annotations

from .base import Sae, SaeOutput, TrainStep, geometric_median
from .batchtopk import BatchTopKSae
from .gated import GatedSae
from .jumprelu import JumpReluSae
from .matryoshka import MatryoshkaBatchTopKSae, default_group_sizes
from .relu_l1 import ReluSae
from .topk import TopKSae

ARCHITECTURES: dict[str, type[Sae]] = {
    cls.architecture: cls
    for cls in (ReluSae, TopKSae, BatchTopKSae, JumpReluSae, MatryoshkaBatchTopKSae, GatedSae)
}


def inference_class(architecture: str) -> type[Sae]:
    """The class a saved SAE of this architecture loads as (BatchTopK and Matryoshka: JumpReLU)."""
    cls = ARCHITECTURES[architecture]
    return ARCHITECTURES[getattr(cls, "inference_architecture", architecture)]


# SAELens's architecture names of the saved forms (cfg.json "architecture" of a run directory)
SAELENS_ARCHITECTURES: dict[str, type[Sae]] = {
    cls.saelens_architecture: cls for cls in ARCHITECTURES.values() if cls.saelens_architecture
}


def trained_architecture(cfg: dict) -> str | None:
    """The architecture a run trained (its cfg.json's `sae.architecture`; older runs: `architecture`)."""
    return (cfg.get("sae") or {}).get("architecture") or cfg.get("architecture")


def saved_class(cfg: dict) -> type[Sae] | None:
    """The class that loads the weights a cfg.json describes: a saesweep run's inference form, or the
    saesweep class of a SAELens architecture name; None when neither names a known architecture."""
    trained = (cfg.get("sae") or {}).get("architecture")
    if trained in ARCHITECTURES:
        return inference_class(trained)
    name = cfg.get("architecture")
    if name in ARCHITECTURES:  # runs from before the SAELens names
        return inference_class(name)
    return SAELENS_ARCHITECTURES.get(name)


__all__ = [
    "ARCHITECTURES", "BatchTopKSae", "GatedSae", "JumpReluSae", "MatryoshkaBatchTopKSae", "ReluSae", "Sae",
    "SAELENS_ARCHITECTURES", "SaeOutput", "TopKSae", "TrainStep", "default_group_sizes", "geometric_median",
    "inference_class", "saved_class", "trained_architecture",
]
