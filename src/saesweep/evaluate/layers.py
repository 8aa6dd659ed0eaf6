"""Features across the layers of one model: residual-stream hook points (`blocks.L.hook_resid_pre|mid|post`)
of the same model share a basis, so decoder directions of dictionaries at different layers can be matched.

For every pair of runs at different residual hook points of one model (and d_in), the one-to-one (Hungarian)
matching of their decoders, beside the matching against a random Gaussian dictionary of the other's shape
(the chance baseline, as compare.py draws it). A feature is *found at* another hook point when its matched
cosine with a run there is ≥ found_threshold; it *first appears* at the lowest hook point, at or below its
own, reached through matches down the layers (where its match first appears, if that is lower still).
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saesweep import plots
from saesweep.errors import ConfigError
from saesweep.io import atomic_write_bytes, atomic_write_json
from saesweep.lm import resolve_device
from saesweep.outliers import BasisAlignment

from .compare import EvalSettings
from .cosines import matching, random_dictionary
from .heldout import HeldOutComparison, RunPair, held_out_comparison
from .runs import RELEASED_PREFIX, Run

log = logging.getLogger(__name__)

_RESIDUAL = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|mid|post)$")
_POSITIONS = ("pre", "mid", "post")
LAYERS_FILE = "layers.json"
LAYER_FEATURES_FILE = "layer_features.csv"
PERSISTENCE_PLOT = "persistence.png"


def residual_order(hook_point: str | None) -> tuple[int, int] | None:
    """(layer, 0 pre | 1 mid | 2 post) of a residual-stream hook point; None for any other hook."""
    match = _RESIDUAL.match(hook_point or "")
    return (int(match.group(1)), _POSITIONS.index(match.group(2))) if match else None


@dataclass(frozen=True)
class Stack:
    """The runs of one model (and d_in) at two or more residual hook points."""

    model: str | None
    d_in: int
    hook_points: list[str]  # in residual order
    runs: list[Run]  # by hook point, then as the sweep lists them

    def runs_at(self, hook_point: str) -> list[Run]:
        return [run for run in self.runs if run.cfg.get("hook_point") == hook_point]


def residual_stacks(runs: list[Run]) -> list[Stack]:
    """The models of the sweep with runs at ≥ 2 residual hook points (each with its runs there)."""
    by_model: dict[tuple[str | None, int], list[Run]] = {}
    for run in runs:
        if residual_order(run.cfg.get("hook_point")) is not None:
            by_model.setdefault((run.model, run.decoder.shape[1]), []).append(run)
    stacks = []
    for (model, d_in), members in by_model.items():
        hook_points = sorted({run.cfg["hook_point"] for run in members}, key=residual_order)
        if len(hook_points) > 1:
            members = sorted(members, key=lambda run: hook_points.index(run.cfg["hook_point"]))
            stacks.append(Stack(model, d_in, hook_points, members))
    return stacks


@dataclass(frozen=True)
class PairMatch:
    """A's features matched one-to-one with B's: per feature of A, its match's index (-1 unmatched) and
    cosine (NaN), and its matched cosine against a random dictionary of B's shape."""

    a: str
    b: str
    index: np.ndarray
    cosine: np.ndarray
    chance: np.ndarray

    def found(self, threshold: float) -> int:
        return int((np.nan_to_num(self.cosine, nan=-1.0) >= threshold).sum())

    def chance_found(self, threshold: float) -> int:
        return int((np.nan_to_num(self.chance, nan=-1.0) >= threshold).sum())


@dataclass(frozen=True)
class Cell:
    """Features of the runs at hook point i found at hook point j (on the diagonal: all of them, no chance)."""

    count: int
    fraction: float
    chance_count: int | None
    chance_fraction: float | None


@dataclass(frozen=True)
class FeatureLayers:
    run: str
    feature: int
    hook_point: str
    found_at: tuple[str, ...]  # the other hook points where it is found (matched cosine ≥ found_threshold)
    first_hook_point: str
    mean_matched: float  # its best matched cosine at each other hook point (0 where unmatched), averaged
    frequency: float | None  # the share of held-out tokens it fires on (None: a released dictionary)


@dataclass(frozen=True)
class StackLayers:
    stack: Stack
    pairs: list[PairMatch]
    persistence: list[list[Cell]]  # [i][j]: features of hook point i found at hook point j
    features: list[FeatureLayers]  # every feature of every run of the stack
    first_appearance: list[int]  # per hook point: features that first appear there
    threshold: float  # found_threshold

    def top_features(self, n: int) -> list[FeatureLayers]:
        """The features found at the most other hook points, then with the highest mean matched cosine; dead
        ones (never fired on the held-out tokens) left out: their decoder rows stay near the initialisation,
        which runs of one seed share at every layer."""
        alive = [f for f in self.features if f.frequency != 0]
        return sorted(alive, key=lambda f: (-len(f.found_at), -f.mean_matched))[:n]


def cross_layer(stack: Stack, settings: EvalSettings) -> StackLayers:
    """Every pair of the stack's runs at different hook points matched, and what follows per feature."""
    pairs = _match_pairs(stack, settings)
    best = _best_per_hook(stack, pairs)  # run → other hook point → its features' best matches there
    threshold = settings.found_threshold
    first: dict[str, np.ndarray] = {}
    features = []
    for run in stack.runs:  # lower hook points first, so each match's first appearance is known
        own = stack.hook_points.index(run.cfg["hook_point"])
        first[run.name] = np.full(run.d_sae, own)
        for hook_point, there in best[run.name].items():
            if stack.hook_points.index(hook_point) < own:
                found = there.cosine >= threshold
                lower = np.array([first[s][i] if s else own for s, i in zip(there.run, there.index, strict=True)])
                first[run.name] = np.where(found, np.minimum(first[run.name], lower), first[run.name])
        features += _features(run, stack, best[run.name], first[run.name], threshold)
    persistence = [[_cell(stack, best, i, j, threshold) for j in stack.hook_points] for i in stack.hook_points]
    first_appearance = [sum(f.first_hook_point == h for f in features) for h in stack.hook_points]
    return StackLayers(stack, pairs, persistence, features, first_appearance, threshold)


def _match_pairs(stack: Stack, settings: EvalSettings) -> list[PairMatch]:
    chance_cache: dict[tuple[str, tuple[int, int]], np.ndarray] = {}

    def chance(a: Run, b: Run) -> np.ndarray:
        key = (a.name, tuple(b.decoder.shape))
        if key not in chance_cache:
            random = random_dictionary(tuple(b.decoder.shape), settings.baseline_seed)
            chance_cache[key] = matching(a.decoder, random).per_row(a.d_sae)[1]
        return chance_cache[key]

    pairs = []
    for i, a in enumerate(stack.runs):
        for b in stack.runs[i + 1 :]:
            if a.cfg["hook_point"] == b.cfg["hook_point"]:
                continue  # compared in mcs.json's comparison group
            if a.d_sae * b.d_sae > settings.matching_max_entries:
                log.warning("layers: %s and %s are too large to match one-to-one; skipped", a.name, b.name)
                continue
            log.info("layers: matching %s (%s) ↔ %s (%s)", a.name, a.cfg["hook_point"], b.name, b.cfg["hook_point"])
            m = matching(a.decoder, b.decoder)
            a_index, a_cosine = m.per_row(a.d_sae)
            b_index, b_cosine = m.swapped().per_row(b.d_sae)
            pairs.append(PairMatch(a.name, b.name, a_index, a_cosine, chance(a, b)))
            pairs.append(PairMatch(b.name, a.name, b_index, b_cosine, chance(b, a)))
    return pairs


@dataclass(frozen=True)
class BestMatch:
    """A run's features at one other hook point: per feature, its best matched cosine over the runs there
    (-1 where unmatched), the same by chance, and the run and feature it is matched with ("" and -1: none)."""

    cosine: np.ndarray
    chance: np.ndarray
    run: list[str]
    index: np.ndarray

    def joined(self, pair: PairMatch) -> BestMatch:
        """The best of these matches and those of `pair` (a run at the same hook point)."""
        new = np.nan_to_num(pair.cosine, nan=-1.0)
        better = new > self.cosine
        return BestMatch(
            np.maximum(self.cosine, new), np.maximum(self.chance, np.nan_to_num(pair.chance, nan=-1.0)),
            [pair.b if b else r for r, b in zip(self.run, better, strict=True)], np.where(better, pair.index, self.index),
        )


def _best_per_hook(stack: Stack, pairs: list[PairMatch]) -> dict[str, dict[str, BestMatch]]:
    by_name = {run.name: run for run in stack.runs}
    best: dict[str, dict[str, BestMatch]] = {run.name: {} for run in stack.runs}
    for pair in pairs:
        hook_point, n = by_name[pair.b].cfg["hook_point"], len(pair.cosine)
        none = BestMatch(np.full(n, -1.0), np.full(n, -1.0), [""] * n, np.full(n, -1))
        best[pair.a][hook_point] = best[pair.a].get(hook_point, none).joined(pair)
    return best


def _features(
    run: Run, stack: Stack, best: dict[str, BestMatch], first: np.ndarray, threshold: float
) -> list[FeatureLayers]:
    others = [h for h in stack.hook_points if h in best]
    cosines = np.stack([best[h].cosine for h in others]) if others else np.zeros((0, run.d_sae))
    mean = np.clip(cosines, 0.0, None).mean(axis=0) if others else np.zeros(run.d_sae)
    return [
        FeatureLayers(
            run.name, i, run.cfg["hook_point"], tuple(h for k, h in enumerate(others) if cosines[k, i] >= threshold),
            stack.hook_points[first[i]], float(mean[i]), None if run.frequency is None else float(run.frequency[i]),
        )
        for i in range(run.d_sae)
    ]


def _cell(stack: Stack, best: dict[str, dict[str, BestMatch]], i: str, j: str, threshold: float) -> Cell:
    runs = stack.runs_at(i)
    n = sum(run.d_sae for run in runs)
    if i == j:
        return Cell(n, 1.0 if n else float("nan"), None, None)
    found = sum(int((best[r.name][j].cosine >= threshold).sum()) for r in runs if j in best[r.name])
    chance = sum(int((best[r.name][j].chance >= threshold).sum()) for r in runs if j in best[r.name])
    return Cell(found, found / n, chance, chance / n)


def layers_json(layers: list[StackLayers], settings: EvalSettings, top_n: int, held_out: HeldOutComparison | None) -> dict:
    """The content of layers.json: across layers, and on held-out tokens when computed."""
    alignment = held_out.alignment_of if held_out else lambda run: None
    return {
        "definition": "features of A matched one-to-one (Hungarian) with B's decoder directions; a feature is found "
        f"at a hook point when its matched cosine with a run there is ≥ {settings.found_threshold:g}; it first "
        "appears at the lowest hook point, at or below its own, reached through such matches",
        "baseline": f"the same matching against a random Gaussian dictionary of B's shape (seed {settings.baseline_seed})",
        "found_threshold": settings.found_threshold,
        "models": [_stack_json(stack_layers, top_n, alignment) for stack_layers in layers],
        **(held_out.to_json() if held_out else {}),
    }


def _stack_json(layers: StackLayers, top_n: int, alignment: Callable[[str], BasisAlignment | None]) -> dict:
    stack = layers.stack
    cells = layers.persistence
    return {
        "model": stack.model,
        "d_in": stack.d_in,
        "hook_points": stack.hook_points,
        "runs": {run.name: run.cfg["hook_point"] for run in stack.runs},
        "persistence": {
            "rows": "features of the runs at hook point i", "columns": "found at hook point j",
            "n_features": [row[i].count for i, row in enumerate(cells)],
            "count": [[c.count for c in row] for row in cells],
            "fraction": [[c.fraction for c in row] for row in cells],
            "chance_count": [[c.chance_count for c in row] for row in cells],
            "chance_fraction": [[c.chance_fraction for c in row] for row in cells],
        },
        "first_appearance": dict(zip(stack.hook_points, layers.first_appearance, strict=True)),
        "pairs": [
            {"a": p.a, "b": p.b, "matched": p.found(layers.threshold), "chance_matched": p.chance_found(layers.threshold),
             "mean_matched_cosine": float(np.nanmean(p.cosine)) if np.isfinite(p.cosine).any() else None}
            for p in layers.pairs
        ],
        "top_features": [_feature_json(f, alignment(f.run)) for f in layers.top_features(top_n)],
    }


def _feature_json(feature: FeatureLayers, alignment: BasisAlignment | None) -> dict:
    entry = {
        "run": feature.run, "feature": feature.feature, "hook_point": feature.hook_point,
        "found_at": list(feature.found_at), "first_hook_point": feature.first_hook_point,
        "mean_matched_cosine": feature.mean_matched, "frequency": feature.frequency,
    }
    if alignment is not None:
        i = feature.feature
        entry["basis_direction"] = {"dimension": int(alignment.dimension[i]), "abs_cos": float(alignment.cos[i]),
                                    "outlier_dimension": bool(alignment.on_outlier[i])}
    return entry


def write_layer_features(path: Path, layers: list[StackLayers]) -> None:
    """layer_features.csv: one row per feature of every run in a stack."""
    columns = ["run", "feature", "hook_point", "found_at", "first_hook_point", "mean_matched_cosine", "frequency"]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([columns] + [
        [f.run, f.feature, f.hook_point, " ".join(f.found_at), f.first_hook_point, f"{f.mean_matched:.4f}",
         "" if f.frequency is None else f"{f.frequency:.6g}"]
        for stack_layers in layers for f in stack_layers.features
    ])
    atomic_write_bytes(path, buffer.getvalue().encode())


def plot_persistence(path: Path, layers: list[StackLayers]) -> None:
    plots.plot_persistence(path, [
        plots.PersistencePanel(
            title=f"{s.stack.model} (d_in {s.stack.d_in})",
            labels=s.stack.hook_points,
            fraction=np.array([[c.fraction for c in row] for row in s.persistence], dtype=float),
            chance=np.array([[np.nan if c.chance_fraction is None else c.chance_fraction for c in row]
                             for row in s.persistence], dtype=float),
        )
        for s in layers
    ])


@dataclass(frozen=True)
class LayerSettings:
    top_features: int = 20  # layers.json lists this many features found again at the most other layers
    activation_similarity: bool = False  # load the runs' LMs: activation similarity and outlier dimensions
    similarity_tokens: int = 20_000  # held-out tokens for both
    similarity_threshold: float = 0.9  # a feature is matched by activation at correlation ≥ this

    def __post_init__(self) -> None:
        if self.similarity_tokens < 2:
            raise ConfigError(f"similarity_tokens={self.similarity_tokens} must be at least 2")
        if not -1.0 <= self.similarity_threshold <= 1.0:
            raise ConfigError(f"similarity_threshold={self.similarity_threshold} is outside [-1, 1] (a correlation)")

    @classmethod
    def from_config(cls, cfg) -> LayerSettings:
        return cls(int(cfg.top_features), bool(cfg.activation_similarity), int(cfg.similarity_tokens),
                   float(cfg.similarity_threshold))


@dataclass(frozen=True)
class LayerEvaluation:
    stacks: list[StackLayers]
    held_out: HeldOutComparison | None
    files: list[Path]

    def console_line(self) -> str:
        parts = [f"{len(s.stack.hook_points)} hook points of {s.stack.model}" for s in self.stacks]
        if self.held_out:
            parts.append(f"activation similarity of {len(self.held_out.pairs)} pairs and outlier dimensions on "
                         f"{self.held_out.n_tokens} held-out tokens")
        return f"across layers: {'; '.join(parts)}: {', '.join(str(f) for f in self.files)}"


def evaluate_layers(
    runs: list[Run], seed_partners: dict[str, str], settings: EvalSettings, layer_settings: LayerSettings,
    out_dir: Path,
) -> LayerEvaluation | None:
    """layers.json, layer_features.csv and persistence.png when the sweep has runs at two residual hook
    points of one model, and the held-out comparison when asked for; None (nothing written) otherwise."""
    stacks = residual_stacks(runs)
    if not stacks and not layer_settings.activation_similarity:
        return None
    layers = [cross_layer(stack, settings) for stack in stacks]
    held_out = None
    if layer_settings.activation_similarity:
        held_out = held_out_comparison(
            runs, similarity_pairs(runs, stacks, seed_partners), resolve_device(settings.device),
            layer_settings.similarity_tokens, layer_settings.similarity_threshold, settings.baseline_seed,
        )
    files = [out_dir / LAYERS_FILE]
    atomic_write_json(files[0], layers_json(layers, settings, layer_settings.top_features, held_out))
    if layers:
        files += [out_dir / LAYER_FEATURES_FILE, out_dir / PERSISTENCE_PLOT]
        write_layer_features(files[1], layers)
        plot_persistence(files[2], layers)
    return LayerEvaluation(layers, held_out, files)


def similarity_pairs(runs: list[Run], stacks: list[Stack], seed_partners: dict[str, str]) -> list[RunPair]:
    """The pairs compared by activation: runs at different residual hook points of one model, the two seeds
    of a setting, runs of two models at the same hook point, and each released dictionary of another
    model (compare_with) with every run of the sweep, whatever its hook point."""
    by_name = {run.name: run for run in runs}
    pairs = [
        RunPair(a, b, "layers")
        for stack in stacks for i, a in enumerate(stack.runs) for b in stack.runs[i + 1 :]
        if a.cfg["hook_point"] != b.cfg["hook_point"]
    ]
    seeds = {tuple(sorted(pair)) for pair in seed_partners.items()}
    pairs += [RunPair(by_name[a], by_name[b], "seeds") for a, b in sorted(seeds)]
    own_models = {run.model for run in runs if not run.name.startswith(RELEASED_PREFIX)}
    from_elsewhere = {run.name for run in runs if run.name.startswith(RELEASED_PREFIX) and run.model not in own_models}
    pairs += [
        RunPair(a, b, "models")
        for i, a in enumerate(runs) for b in runs[i + 1 :]
        if a.model != b.model and (a.cfg.get("hook_point") == b.cfg.get("hook_point") or b.name in from_elsewhere)
    ]
    return pairs
