"""How one dictionary is trained: its learning rate, the schedule around it, its gradient clip and when a latent
counts as dead.

Each architecture's config carries its own recipe (`sae.recipe` in conf/sae/*.yaml), chosen by measurement
(benchmarks/RESULTS.md, "Recipes per architecture") rather than shared: the step sizes that suit ReLU/L1
kill latents of the TopK family. Being part of `sae`, a recipe may differ between the dictionaries of one
ensemble: each trains in its own parameter group with its own schedule and clip.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

RECIPE_DOCS = {
    "lr": "Adam's learning rate (> 0)",
    "lr_warmup_steps": "linear warm-up steps (integer ≥ 0; at most train.lr_warmup_max_fraction of the run)",
    "lr_decay_fraction": "share of the steps at the end over which the learning rate decays linearly to 0 ([0, 1])",
    "grad_clip_norm": "the dictionary's gradient clipped to this norm before Adam (> 0), or null for none",
    "dead_window_tokens": "a latent is dead once silent for this many training tokens, for AuxK, resampling and "
                          "train/dead_fraction (integer > 0), or null (or absent) for train.dead_window_tokens",
}
OPTIONAL_KEYS = {"dead_window_tokens"}  # absent means null: recipes written before the key existed still load


@dataclass(frozen=True)
class Recipe:
    lr: float
    lr_warmup_steps: int
    lr_decay_fraction: float
    grad_clip_norm: float | None
    dead_window_tokens: int | None = None  # None: train.dead_window_tokens

    @classmethod
    def from_config(cls, recipe: Mapping) -> Recipe:
        """The recipe of a `sae.recipe` mapping, checked (a ValueError names the bad key and value)."""
        if problem := recipe_problem(recipe):
            raise ValueError(problem)
        return cls(**{f.name: recipe.get(f.name) for f in fields(cls)})

    def dead_window(self, shared: int) -> int:
        """The training tokens a latent must stay silent for to count as dead: this recipe's window, or the
        `shared` one (train.dead_window_tokens) when it names none."""
        return self.dead_window_tokens or shared

    def warmup_steps(self, total_steps: int, max_fraction: float) -> int:
        """The steps of the linear warm-up: lr_warmup_steps, but at most max_fraction of the run, so a short
        run still trains at its full learning rate (0 steps: full rate from the first)."""
        return min(self.lr_warmup_steps, int(total_steps * max_fraction))

    def lr_factor(self, total_steps: int, warmup_max_fraction: float) -> Callable[[int], float]:
        """The learning rate's multiplier at each step: linear warm-up, constant, linear decay to zero
        over the last lr_decay_fraction of the steps."""
        total = max(total_steps, 1)
        warmup = self.warmup_steps(total, warmup_max_fraction)
        decay_start = int(total * (1 - self.lr_decay_fraction))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if step >= decay_start:
                return max(total - step, 0) / max(total - decay_start, 1)
            return 1.0

        return factor


def recipe_problem(recipe: object) -> str | None:
    """What is wrong with a `sae.recipe` value (None: nothing), naming the key, the value and what is allowed."""
    allowed = "; ".join(f"{k}: {doc}" for k, doc in RECIPE_DOCS.items())
    if not isinstance(recipe, Mapping):
        return f"sae.recipe={recipe!r} must be a mapping of {', '.join(RECIPE_DOCS)}"
    if missing := [k for k in RECIPE_DOCS if k not in recipe and k not in OPTIONAL_KEYS]:
        return f"sae.recipe lacks {', '.join(missing)}; its keys: {allowed}"
    if unknown := sorted(set(recipe) - set(RECIPE_DOCS)):
        return f"sae.recipe has unknown keys {unknown}; its keys: {allowed}"

    def number(value: object, integer: bool = False) -> bool:
        kinds = (int,) if integer else (int, float)
        return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)

    lr, warmup, decay, clip, window = (recipe.get(k) for k in RECIPE_DOCS)
    checks = {
        "lr": number(lr) and lr > 0,
        "lr_warmup_steps": number(warmup, integer=True) and warmup >= 0,
        "lr_decay_fraction": number(decay) and 0 <= decay <= 1,
        "grad_clip_norm": clip is None or (number(clip) and clip > 0),
        "dead_window_tokens": window is None or (number(window, integer=True) and window > 0),
    }
    for key, ok in checks.items():
        if not ok:
            return f"sae.recipe.{key}={recipe[key]!r} is not allowed: {RECIPE_DOCS[key]}"
    return None
