"""The evaluation's figures: the inputs of saesweep.plots drawn from a comparison (MCS histograms,
features found again by threshold, by size and by frequency, the MCS matrix, the Pareto front)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from saesweep import plots
from saesweep.rundir import natural_key
from saesweep.sae import sparsity_setting, trained_architecture

from .compare import Comparison, EvalSettings
from .runs import Run

PLOT_FILES = {
    "mcs_hist": "mcs_hist.png",
    "features_found": "features_found.png",
    "mcs_matrix": "mcs_matrix.png",
    "pareto": "pareto.png",
    "found_by_size": "found_by_size.png",
    "mcs_vs_frequency": "mcs_vs_frequency.png",
}


def write_plots(
    out_dir: Path, runs: list[Run], comparison: Comparison, settings: EvalSettings
) -> dict[str, Path]:
    paths = {name: out_dir / file for name, file in PLOT_FILES.items()}
    by_name = {run.name: run for run in runs}
    hist_panels = []
    found_panels = []
    for group in comparison.groups:
        largest = group.largest
        points = []
        for run in group.runs:
            if (run.name, largest.name) not in comparison.values:
                continue
            values, chance = comparison.values[run.name, largest.name]
            hist_panels.append(
                plots.HistogramPanel(
                    title=f"run {run.name} ({run.d_sae} features) → run {largest.name} ({largest.d_sae})",
                    mcs=values,
                    baseline=chance,
                )
            )
            points.append(
                plots.FoundPoint(
                    d_sae=run.d_sae,
                    sparsity=sparsity_setting(run.cfg),
                    counts={t: int((values >= t).sum()) for t in settings.thresholds},
                    baseline_counts={t: int((chance >= t).sum()) for t in settings.thresholds},
                )
            )
        if points:
            title = f"found again in run {largest.name} ({largest.d_sae} features)"
            if len(comparison.groups) > 1:
                title += f"\n{group.label}"
            found_panels.append(plots.FoundPanel(title=title, points=points))
    plots.plot_mcs_histograms(paths["mcs_hist"], hist_panels, settings.found_threshold)
    _plot_found_again(paths, runs, comparison, settings.found_threshold)
    plots.plot_features_found(paths["features_found"], found_panels, settings.thresholds)

    names = [run.name for run in runs]
    matrix = np.full((len(names), len(names)), np.nan)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if a == b:
                matrix[i, j] = 1.0
            elif (a, b) in comparison.pairs:
                matrix[i, j] = comparison.pairs[a, b].trained.mean_mcs
    labels = [f"{name} ({by_name[name].d_sae})" for name in names]
    plots.plot_mcs_matrix(paths["mcs_matrix"], labels, matrix)
    plots.plot_pareto(
        paths["pareto"],
        [
            plots.ParetoPoint(
                name=run.name,
                l0=run.metrics.get("l0", math.nan),
                fvu=run.metrics.get("fvu", math.nan),
                ce_delta=run.metrics.get("ce_delta", math.nan),
                sparsity=sparsity_setting(run.cfg),
                dict_ratio=run.cfg.get("dict_ratio"),
                l0_se=run.metrics.get("l0_se", math.nan),
                fvu_se=run.metrics.get("fvu_se", math.nan),
                ce_delta_se=run.metrics.get("ce_delta_se", math.nan),
                architecture=trained_architecture(run.cfg),
            )
            for run in runs
        ],
    )
    return paths


def _plot_found_again(paths: dict[str, Path], runs: list[Run], comparison: Comparison, threshold: float) -> None:
    """found_by_size.png and mcs_vs_frequency.png: features found again in the next larger dictionary of
    the same seed, and by the other seed, by size and by feature frequency."""
    by_name = {run.name: run for run in runs}
    partners = comparison.seed_partners
    several_architectures = len({trained_architecture(run.cfg) for run in runs}) > 1

    def label(run: Run) -> str:
        return (f"{trained_architecture(run.cfg)}, " if several_architectures else "") + f"seed {run.cfg.get('seed')}"

    def series(pairs: dict[str, str]) -> list[plots.SizeSeries]:
        lines: dict[str, list[Run]] = {}
        for name in pairs:
            lines.setdefault(label(by_name[name]), []).append(by_name[name])
        out = []
        for line_label, members in lines.items():
            members.sort(key=lambda r: r.d_sae)
            found = [int((comparison.values[r.name, pairs[r.name]][0] >= threshold).sum()) for r in members]
            chance = [int((comparison.values[r.name, pairs[r.name]][1] >= threshold).sum()) for r in members]
            out.append(plots.SizeSeries(line_label, [r.d_sae for r in members], found, chance))
        return out

    next_larger = {name: found.next_larger for name, found in comparison.up_the_sizes.items()}
    up, across = "in the next larger dictionary, same seed", "by the other seed, same size"
    plots.plot_found_by_size(paths["found_by_size"], {up: series(next_larger), across: series(partners)}, threshold)

    def frequency_series(pairs: dict[str, str]) -> list[plots.FrequencySeries]:
        return [
            plots.FrequencySeries(f"{name} ({by_name[name].d_sae}) → {other}", by_name[name].frequency,
                                  *comparison.values[name, other])
            for name, other in sorted(pairs.items(), key=lambda kv: natural_key(kv[0]))
            if by_name[name].frequency is not None
        ]

    plots.plot_mcs_by_frequency(
        paths["mcs_vs_frequency"], {up: frequency_series(next_larger), across: frequency_series(partners)}, threshold
    )
