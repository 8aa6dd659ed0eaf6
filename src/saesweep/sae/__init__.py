"""The SAE architectures, one class per file, each registered by its own name when it is defined (the
`sae` config group: one YAML per architecture in conf/sae/).

An architecture from outside this package registers the same way once its module is imported: name the
module in the `saesweep.architectures` entry-point group of its own package (`load_plugins` imports
them), and put its YAML in a config folder on Hydra's search path.
"""

from __future__ import annotations

import importlib.metadata
import logging

from .base import REGISTRY, Hyperparameter, Sae, SaeOutput, TrainStep, geometric_median
from .batchtopk import BatchTopKSae
from .gated import GatedSae
from .jumprelu import JumpReluSae
from .matryoshka import MatryoshkaBatchTopKSae, default_group_sizes
from .relu_l1 import ReluSae
from .topk import TopKSae

log = logging.getLogger(__name__)

ARCHITECTURES: dict[str, type[Sae]] = REGISTRY  # every architecture defined so far, by name
PLUGIN_GROUP = "saesweep.architectures"


def load_plugins() -> None:
    """Imports the architecture modules that installed packages name in the `saesweep.architectures`
    entry-point group; each registers its classes by defining them. One that fails to import is
    reported and skipped: the built-in architectures still work."""
    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            entry.load()
        except Exception as e:  # noqa: BLE001 — a broken plugin must not stop the built-in architectures
            log.warning("architecture plugin %s (%s) failed to load: %s", entry.name, entry.value, e)


def inference_class(architecture: str) -> type[Sae]:
    """The class a saved SAE of this architecture loads as (BatchTopK and Matryoshka: JumpReLU)."""
    cls = ARCHITECTURES[architecture]
    return ARCHITECTURES[getattr(cls, "inference_architecture", architecture)]


def saelens_architectures() -> dict[str, type[Sae]]:
    """The classes of SAELens's architecture names (cfg.json "architecture" of a saved form)."""
    return {cls.saelens_architecture: cls for cls in ARCHITECTURES.values() if cls.saelens_architecture}


def sparsity_knob(cls: type[Sae]) -> str | None:
    """The key that sets an architecture's sparsity: `k` where it has one, else its sparsity coefficient."""
    return "k" if "k" in cls.hyperparameters else cls.sparsity_coefficient


def sparsity_setting(cfg: dict) -> tuple[str, float] | None:
    """A run's sparsity knob and its value, from its cfg.json (`sae`, or the top-level `k`/`l1_coef` of
    runs from before it); None when its architecture has none or the run does not say."""
    cls = ARCHITECTURES.get(trained_architecture(cfg) or "")
    knob = sparsity_knob(cls) if cls is not None else next((k for k in ("k", "l1_coef") if cfg.get(k) is not None), None)
    value = None if knob is None else (cfg.get("sae") or {}).get(knob, cfg.get(knob))
    return None if value is None else (knob, value)


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
    return saelens_architectures().get(name)


__all__ = [
    "ARCHITECTURES", "PLUGIN_GROUP", "BatchTopKSae", "GatedSae", "Hyperparameter", "JumpReluSae",
    "MatryoshkaBatchTopKSae", "ReluSae", "Sae", "SaeOutput", "TopKSae", "TrainStep", "default_group_sizes",
    "geometric_median", "inference_class", "load_plugins", "saelens_architectures", "saved_class",
    "sparsity_knob", "sparsity_setting", "trained_architecture",
]


load_plugins()
