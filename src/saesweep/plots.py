"""The evaluator's plots (PNG). Each function takes plain numbers and writes one file atomically.

Figures are built with matplotlib's object API (`Figure`, rendered by Agg), not pyplot: no global
figure state, no display needed, safe to call from any thread or a headless job.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from saesweep.io import atomic_write_bytes

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", ":", "-.")
_DPI = 120


@dataclass(frozen=True)
class HistogramPanel:
    title: str
    mcs: np.ndarray  # per feature of a run: its MCS with the largest dictionary
    baseline: np.ndarray  # the same against a random dictionary of the largest one's shape


@dataclass(frozen=True)
class FoundPoint:
    d_sae: int
    sparsity: tuple[str, float] | None  # the run's sparsity knob and its value (sae.sparsity_setting)
    counts: dict[float, int]  # threshold → features with MCS ≥ threshold in the largest dictionary
    baseline_counts: dict[float, int]  # the same against a random dictionary


@dataclass(frozen=True)
class FoundPanel:
    title: str
    points: list[FoundPoint]


@dataclass(frozen=True)
class ParetoPoint:
    name: str
    l0: float
    fvu: float
    ce_delta: float
    sparsity: tuple[str, float] | None  # the run's sparsity knob and its value (sae.sparsity_setting)
    dict_ratio: float | None
    # standard errors over the held-out contexts (nan for runs from before they were recorded)
    l0_se: float = math.nan
    fvu_se: float = math.nan
    ce_delta_se: float = math.nan
    architecture: str | None = None


def plot_mcs_histograms(path: Path, panels: list[HistogramPanel], found_threshold: float) -> None:
    """Distribution of MCS per run against the largest dictionary, the random baseline overlaid."""
    if not panels:
        return _write_message(path, "MCS against the largest dictionary", "no two comparable runs")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5.2 * cols, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    low = min(0.0, *(float(np.min(np.concatenate([p.mcs, p.baseline]))) for p in panels))
    bins = np.linspace(low, 1.0, 51)
    for ax, panel in zip(axes, panels, strict=False):
        ax.hist(
            panel.mcs, bins=bins, color="tab:blue", alpha=0.75, label=f"trained (mean {panel.mcs.mean():.2f})"
        )
        ax.hist(
            panel.baseline,
            bins=bins,
            histtype="step",
            color="black",
            linewidth=1.5,
            label=f"random baseline (mean {panel.baseline.mean():.2f})",
        )
        ax.axvline(
            found_threshold, color="tab:red", linestyle="--", label=f"found again: MCS ≥ {found_threshold:g}"
        )
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("MCS with the largest dictionary")
        ax.set_ylabel("features")
        ax.legend(fontsize=8, loc="upper left")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("Max cosine similarity of each run's features to the largest dictionary")
    _save(fig, path)


def plot_features_found(path: Path, panels: list[FoundPanel], thresholds: tuple[float, ...]) -> None:
    """x = dictionary size, y = its features with MCS ≥ threshold in the largest dictionary, a line per
    threshold (and per sparsity setting, l1_coef or k, when the sweep has several); chance as a grey dashed line."""
    if not panels:
        return _write_message(path, "Features found again", "no two comparable runs")
    fig = Figure(figsize=(6.4 * len(panels), 4.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    colors = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, len(thresholds)))
    lowest = min(thresholds)
    for ax, panel in zip(axes, panels, strict=False):
        settings = sorted({p.sparsity for p in panel.points}, key=lambda v: (v is None, v or ("", 0.0)))
        for setting, linestyle in zip(settings, cycle(_LINESTYLES), strict=False):
            points = sorted((p for p in panel.points if p.sparsity == setting), key=lambda p: p.d_sae)
            sizes = [p.d_sae for p in points]
            suffix = f", {setting[0]}={setting[1]:g}" if len(settings) > 1 and setting is not None else ""
            for threshold, color in zip(thresholds, colors, strict=True):
                ax.plot(
                    sizes,
                    [p.counts[threshold] for p in points],
                    marker="o",
                    color=color,
                    linestyle=linestyle,
                    label=f"MCS ≥ {threshold:g}{suffix}",
                )
            ax.plot(
                sizes,
                [p.baseline_counts[lowest] for p in points],
                marker="x",
                color="grey",
                linestyle="--",
                label=f"random baseline, MCS ≥ {lowest:g}{suffix}",
            )
        _size_axis(ax, sorted({p.d_sae for p in panel.points}), "features found again (MCS ≥ threshold)", panel.title)
        ax.legend(fontsize=8)
    fig.suptitle("Features of each dictionary found again in the largest one")
    _save(fig, path)


@dataclass(frozen=True)
class SizeSeries:
    """Features found again, per dictionary size, along one line of a sweep (e.g. one seed's sizes)."""

    label: str
    d_sae: list[int]
    found: list[int]  # features found again at found_threshold
    baseline: list[int]  # the same against random dictionaries of the same shapes


def plot_found_by_size(
    path: Path, panels: dict[str, list[SizeSeries]], threshold: float
) -> None:
    """Does finding features again rise with dictionary size? One row per kind of "again" (in the next
    larger dictionary of the same seed; by the other seed at the same size): counts on the left,
    fractions of the dictionary on the right, each series beside its chance baseline (grey, dashed)."""
    panels = {title: series for title, series in panels.items() if series}
    if not panels:
        return _write_message(path, "Features found again by dictionary size",
                              "no larger dictionary of the same settings and seed, and no second seed")
    fig = Figure(figsize=(12, 4.4 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 2, squeeze=False)
    for (title, series), (count_ax, fraction_ax) in zip(panels.items(), axes, strict=True):
        for one, marker in zip(series, cycle(_MARKERS), strict=False):
            sizes = np.asarray(one.d_sae, dtype=float)
            for ax, scale in ((count_ax, 1.0), (fraction_ax, 1.0 / sizes)):
                ax.plot(sizes, np.asarray(one.found) * scale, marker=marker, label=one.label)
                ax.plot(sizes, np.asarray(one.baseline) * scale, marker=marker, color="grey", linestyle="--",
                        alpha=0.7, label=f"chance ({one.label})")
        sizes = sorted({d for one in series for d in one.d_sae})
        for ax, ylabel in ((count_ax, "features found again"), (fraction_ax, "fraction of the dictionary")):
            _size_axis(ax, sizes, ylabel, f"{title} (MCS ≥ {threshold:g})")
        fraction_ax.set_ylim(0.0, 1.0)
        count_ax.legend(fontsize=8)
    fig.suptitle("Features found again, by dictionary size")
    _save(fig, path)


@dataclass(frozen=True)
class FrequencySeries:
    label: str
    frequency: np.ndarray  # per feature: fraction of held-out tokens it fires on
    mcs: np.ndarray  # per feature: its MCS in the other dictionary
    baseline: np.ndarray  # per feature: its MCS in a random dictionary of the other's shape


_FREQUENCY_BINS = 12


def plot_mcs_by_frequency(path: Path, panels: dict[str, list[FrequencySeries]], threshold: float) -> None:
    """Are frequent features found first? Each feature's MCS against its firing frequency (log scale),
    the median per frequency bin as a line, and the median of chance (grey, dashed); dead features,
    which have no frequency to place, are counted in the legend."""
    panels = {title: series for title, series in panels.items() if series}
    if not panels:
        return _write_message(path, "MCS by feature frequency", "no two comparable runs")
    fig = Figure(figsize=(6.4 * len(panels), 4.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    colors = matplotlib.colormaps["viridis"]
    for ax, (title, series) in zip(axes, panels.items(), strict=True):
        alive = [one.frequency[one.frequency > 0] for one in series]
        low = min((a.min() for a in alive if a.size), default=1e-6)
        high = max((a.max() for a in alive if a.size), default=1.0)
        edges = np.geomspace(low, high * 1.0001, _FREQUENCY_BINS + 1)
        for i, one in enumerate(series):
            color = colors(0.85 * i / max(1, len(series) - 1))
            keep = one.frequency > 0
            x, y, chance = one.frequency[keep], one.mcs[keep], one.baseline[keep]
            ax.scatter(x, y, s=3, alpha=0.25, color=color, linewidths=0)
            which = np.clip(np.digitize(x, edges) - 1, 0, _FREQUENCY_BINS - 1)
            filled = [b for b in range(_FREQUENCY_BINS) if (which == b).any()]
            centres = np.sqrt(edges[filled] * edges[np.asarray(filled, dtype=int) + 1])
            dead = int((~keep).sum())
            ax.plot(centres, [np.median(y[which == b]) for b in filled], color=color, marker="o",
                    label=one.label + (f" ({dead} dead not shown)" if dead else ""))
            ax.plot(centres, [np.median(chance[which == b]) for b in filled], color="grey", linestyle="--", alpha=0.7)
        ax.axhline(threshold, color="black", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("feature frequency (fraction of held-out tokens)")
        ax.set_ylabel("MCS")
        ax.set_title(f"{title}\n(lines: median per frequency bin; grey dashed: chance; dotted: {threshold:g})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("MCS against feature frequency")
    _save(fig, path)


def plot_mcs_matrix(path: Path, labels: list[str], matrix: np.ndarray) -> None:
    """Run × run heatmap of mean MCS (row A's features searched in column B); NaN = not comparable."""
    n = len(labels)
    if n == 0:
        return _write_message(path, "Mean MCS between runs", "no finished run")
    size = max(4.5, 0.6 * n + 2.5)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0.0, vmax=1.0)
    _annotate(ax, matrix, lambda i, j: "n/a" if np.isnan(matrix[i, j]) else f"{matrix[i, j]:.2f}")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("B: run searched (features)")
    ax.set_ylabel("A: run whose features are matched (features)")
    ax.set_title(
        "Mean MCS of A's features in B\n(grey: different hook point, d_in or model; never compared)",
        fontsize=10,
    )
    fig.colorbar(image, ax=ax, label="mean max cosine similarity")
    _save(fig, path)


@dataclass(frozen=True)
class StabilityPoint:
    label: str
    architecture: str
    stability: float  # share found again by another seed
    stability_sd: float
    fidelity: float
    on_frontier: bool


def plot_stability_frontier(path: Path, points: list[StabilityPoint], fidelity_label: str) -> None:
    """Stability (found again by another seed) against fidelity, one point per setting; the frontier joined."""
    if not points:
        return _write_message(path, "Stability against fidelity", "no setting was trained with two seeds")
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    markers = dict(zip(sorted({p.architecture for p in points}), cycle("osD^vP*X")))
    for p in points:
        ax.errorbar(p.fidelity, p.stability, yerr=p.stability_sd, fmt=markers[p.architecture], capsize=3,
                    color="tab:red" if p.on_frontier else "tab:blue", label=p.architecture)
        ax.annotate(p.label, (p.fidelity, p.stability), textcoords="offset points", xytext=(4, 4), fontsize=8)
    frontier = sorted((p for p in points if p.on_frontier), key=lambda p: p.fidelity)
    ax.plot([p.fidelity for p in frontier], [p.stability for p in frontier], "--", color="tab:red", linewidth=1)
    handles = {h.get_label(): h for h in ax.get_legend_handles_labels()[0]}
    ax.legend(handles.values(), handles.keys(), fontsize=8, title="architecture (red: on the frontier)")
    ax.set_xlabel(fidelity_label)
    ax.set_ylabel("found again by another seed (one-to-one, share)")
    ax.set_title("Stability against fidelity, per setting (bars: spread over seed pairs)", fontsize=10)
    _save(fig, path)


@dataclass(frozen=True)
class PersistencePanel:
    title: str
    labels: list[str]  # hook points, in residual order
    fraction: np.ndarray  # [i, j]: share of the features at hook point i found at hook point j
    chance: np.ndarray  # the same against random dictionaries (NaN on the diagonal)


def plot_persistence(path: Path, panels: list[PersistencePanel]) -> None:
    """Per model, hook point × hook point heatmap: the share of the features of row i's runs found at column j."""
    if not panels:
        return _write_message(path, "Features found again across layers", "no model with runs at two residual hook points")
    size = max(4.5, 0.7 * max(len(p.labels) for p in panels) + 2.5)
    fig = Figure(figsize=((size + 1.2) * len(panels), size), layout="constrained")
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    for ax, panel in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels, strict=True):
        image = ax.imshow(np.ma.masked_invalid(panel.fraction), cmap=cmap, vmin=0.0, vmax=1.0)

        def text(i: int, j: int, panel: PersistencePanel = panel) -> str:
            chance = panel.chance[i, j]
            return f"{panel.fraction[i, j]:.2f}" + ("" if np.isnan(chance) else f"\n({chance:.2f})")

        _annotate(ax, panel.fraction, text)
        n = len(panel.labels)
        ax.set_xticks(range(n), panel.labels, rotation=45, ha="right")
        ax.set_yticks(range(n), panel.labels)
        ax.set_xlabel("found at (matched cosine ≥ threshold)")
        ax.set_ylabel("features of the runs at")
        ax.set_title(f"{panel.title}\nshare found again (chance in brackets)", fontsize=10)
        fig.colorbar(image, ax=ax, label="share of the row's features")
    _save(fig, path)


def _annotate(ax, matrix: np.ndarray, text) -> None:
    """Each cell's `text(i, j)`, white on dark cells; none beyond 16 × 16 (no longer fits)."""
    if max(matrix.shape) > 16:
        return
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            dark = not np.isnan(matrix[i, j]) and matrix[i, j] < 0.6
            ax.text(j, i, text(i, j), ha="center", va="center", fontsize=9, color="white" if dark else "black")


def _bar(se: float) -> float:
    return se if math.isfinite(se) else 0.0


def plot_pareto(path: Path, points: list[ParetoPoint]) -> None:
    """L0 against FVU and against ce_delta with ±1 standard error bars; colour = the sparsity setting
    (l1_coef, l0_coef, k ...: each architecture's own) when every run has the same knob, marker =
    dict_ratio, or the architecture when the sweep has several (then each label names dict_ratio)."""
    points = [p for p in points if math.isfinite(p.l0)]
    if not points:
        return _write_message(path, "Sparsity against reconstruction", "no finished run with metrics")
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax_fvu, ax_ce = fig.subplots(1, 2)
    knobs = {p.sparsity[0] for p in points if p.sparsity is not None}
    knob = next(iter(knobs)) if len(knobs) == 1 else None  # colours compare values of one knob only
    values = [p.sparsity[1] for p in points if p.sparsity is not None and knob is not None]
    norm = _color_norm(values)
    cmap = matplotlib.colormaps["plasma"]
    by_architecture = len({p.architecture for p in points}) > 1

    def kind(p: ParetoPoint):
        return p.architecture if by_architecture else p.dict_ratio

    ratios = sorted({kind(p) for p in points}, key=lambda v: (v is None, str(v) if by_architecture else v or 0.0))
    markers = dict(zip(ratios, cycle(_MARKERS), strict=False))
    for ax, metric, ylabel, title in (
        (ax_fvu, "fvu", "FVU (fraction of variance unexplained)", "Sparsity against reconstruction"),
        (ax_ce, "ce_delta", "ce_delta (nats: spliced − clean loss)", "Sparsity against downstream loss"),
    ):
        for ratio in ratios:
            group = [p for p in points if kind(p) == ratio]
            ax.errorbar(
                [p.l0 for p in group],
                [getattr(p, metric) for p in group],
                xerr=[_bar(p.l0_se) for p in group],
                yerr=[_bar(getattr(p, f"{metric}_se")) for p in group],
                fmt="none",
                ecolor="black",
                elinewidth=0.8,
                capsize=3,
                zorder=1,
            )
            ax.scatter(
                [p.l0 for p in group],
                [getattr(p, metric) for p in group],
                marker=markers[ratio],
                s=70,
                c=[cmap(norm(p.sparsity[1])) if p.sparsity is not None and knob else "grey" for p in group],
                edgecolors="black",
                linewidths=0.6,
                zorder=2,
            )
            for p in group:
                label = f"{p.name} ({p.dict_ratio:g}×)" if by_architecture and p.dict_ratio is not None else p.name
                ax.annotate(
                    label, (p.l0, getattr(p, metric)), textcoords="offset points", xytext=(5, 4), fontsize=8
                )
        ax.set_xlabel("L0 (mean active features per token)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles = [
        Line2D(
            [],
            [],
            marker=markers[r],
            linestyle="",
            color="lightgrey",
            markeredgecolor="black",
            markersize=8,
            label=(str(r) if by_architecture else f"dict_ratio={r:g}") if r is not None else "unknown",
        )
        for r in ratios
    ]
    ax_ce.legend(handles=handles, fontsize=8, title="marker", title_fontsize=8)
    suptitle = "Runs of the sweep (labels: run names)"
    if len(set(values)) > 1:
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=[ax_fvu, ax_ce], label=knob)
    elif values:  # one value: a colour bar would only show an arbitrary range around it
        suptitle += f"; every run has {knob}={values[0]:g}"
    fig.suptitle(suptitle)
    _save(fig, path)


def _size_axis(ax, sizes: list[int], ylabel: str, title: str) -> None:
    """An x axis of dictionary sizes (log 2, a tick at each size), the y label, the title and a grid."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(d) for d in sizes])
    ax.minorticks_off()
    ax.set_xlabel("dictionary size (features)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def _color_norm(values: list[float]) -> Normalize:
    """A log colour scale when the values span a decade or more (how coefficient sweeps are usually spaced)."""
    if not values:
        return Normalize(0.0, 1.0)
    low, high = min(values), max(values)
    if low > 0 and high / low >= 10:
        return LogNorm(low, high)
    return Normalize(low, high)


def _write_message(path: Path, title: str, message: str) -> None:
    fig = Figure(figsize=(6, 3), layout="constrained")
    ax = fig.subplots()
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=12)
    ax.set_axis_off()
    fig.suptitle(title)
    _save(fig, path)


def _save(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    atomic_write_bytes(path, buffer.getvalue())
