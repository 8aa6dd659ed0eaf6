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


__all__ = [
    "ARCHITECTURES", "BatchTopKSae", "GatedSae", "JumpReluSae", "MatryoshkaBatchTopKSae", "ReluSae", "Sae",
    "SaeOutput", "TopKSae", "TrainStep", "default_group_sizes", "geometric_median", "inference_class",
]
