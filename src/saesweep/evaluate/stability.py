"""The stability–fidelity frontier: for every setting trained with two or more seeds, how many features a
second seed finds again (one-to-one matched at cos ≥ found_threshold, as a share of the smaller
dictionary; mean and spread over the setting's seed pairs) against how faithful the setting is
(ce_recovered; FVU, and on synthetic activations the true features recovered). The settings on the
frontier are those no other setting beats on both stability and fidelity. Written to
evaluation/stability.csv and stability_frontier.png."""

from __future__ import annotations

import csv
import io
import itertools
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from saesweep import plots
from saesweep.io import atomic_write_bytes

from .compare import Comparison
from .runs import Run, settings_with_seeds
from .truth import RunTruth

STABILITY_FILE = "stability.csv"
FRONTIER_PLOT = "stability_frontier.png"


@dataclass(frozen=True)
class SettingStability:
    setting: str  # its runs, e.g. "0,3" (the first run names the setting in plots)
    architecture: str
    d_sae: int
    n_seeds: int
    found_by_other_seed: float  # mean over seed pairs of the matched share
    found_by_other_seed_sd: float  # its standard deviation over the pairs (0 for one pair)
    ce_recovered: float  # mean over the setting's runs (NaN without a language model)
    fvu: float
    l0: float
    true_recovered: float  # mean share of true features recovered (NaN unless synthetic)
    on_frontier: bool = False

    @property
    def fidelity(self) -> float:
        """What the frontier weighs against stability: ce_recovered, or 1 − FVU without a language model."""
        return self.ce_recovered if math.isfinite(self.ce_recovered) else 1 - self.fvu


def stability(runs: list[Run], comparison: Comparison, truth: list[RunTruth]) -> list[SettingStability]:
    recovered = {t.run: t.recovered_fraction for t in truth}
    out = []
    for same in settings_with_seeds(runs):
        shares = []
        for a, b in itertools.combinations(same, 2):
            pair = comparison.pairs.get((a.name, b.name))
            if pair is not None and pair.matched is not None:
                shares.append(pair.matched / min(a.d_sae, b.d_sae))
        if not shares:
            continue
        out.append(SettingStability(
            setting=",".join(r.name for r in same), architecture=(same[0].cfg.get("sae") or {}).get("architecture", ""),
            d_sae=same[0].d_sae, n_seeds=len(same), found_by_other_seed=float(np.mean(shares)),
            found_by_other_seed_sd=float(np.std(shares)), ce_recovered=_mean(r.metrics.get("ce_recovered") for r in same),
            fvu=_mean(r.metrics.get("fvu") for r in same), l0=_mean(r.metrics.get("l0") for r in same),
            true_recovered=_mean(recovered.get(r.name) for r in same),
        ))
    return [s.__class__(**{**asdict(s), "on_frontier": _on_frontier(s, out)}) for s in out]


def _mean(values) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _on_frontier(setting: SettingStability, all_settings: list[SettingStability]) -> bool:
    return not any(
        o.found_by_other_seed >= setting.found_by_other_seed and o.fidelity >= setting.fidelity
        and (o.found_by_other_seed, o.fidelity) != (setting.found_by_other_seed, setting.fidelity)
        for o in all_settings
    )


def write_stability(out_dir: Path, settings: list[SettingStability]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    names = [f.name for f in fields(SettingStability)]
    writer.writerow(names)
    writer.writerows([getattr(s, name) for name in names] for s in settings)
    atomic_write_bytes(out_dir / STABILITY_FILE, buffer.getvalue().encode())
    plots.plot_stability_frontier(out_dir / FRONTIER_PLOT, [
        plots.StabilityPoint(s.setting.split(",")[0], s.architecture, s.found_by_other_seed, s.found_by_other_seed_sd,
                             s.fidelity, s.on_frontier)
        for s in settings
    ], "ce_recovered" if any(math.isfinite(s.ce_recovered) for s in settings) else "1 − FVU")
