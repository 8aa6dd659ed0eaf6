"""What an evaluation says: the content of mcs.json, its headline numbers, the rows of summary.csv and
the console's table of them."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from saesweep.io import atomic_write_bytes
from saesweep.rundir import natural_key
from saesweep.sae import sparsity_setting, trained_architecture

from .compare import Comparison, EvalSettings
from .runs import FailedRun, Run

_HYPERPARAMETERS = ("architecture", "hook_point", "d_in", "d_sae", "dict_ratio", "l1_coef", "k")


def hyperparameters(cfg: dict) -> dict:
    """The run's settings that mcs.json and summary.csv show: the architecture as trained and its
    sparsity knob with its value, whatever the architecture (l1_coef and k also in their own columns)."""
    knob, value = sparsity_setting(cfg) or (None, None)
    return {**{key: cfg.get(key) for key in _HYPERPARAMETERS}, "architecture": trained_architecture(cfg),
            "sparsity_knob": knob, "sparsity": value}


def mcs_json(
    sweep_dir: Path, runs: list[Run], failed: list[FailedRun], comparison: Comparison, settings: EvalSettings
) -> dict:
    """The content of mcs.json."""
    up_the_sizes = comparison.up_the_sizes
    run_entries = {run.name: _run_entry(run, comparison, settings) for run in runs}
    for f in failed:
        run_entries[f.name] = {"status": "failed", "reason": f.reason, "overrides": f.overrides}
    return {
        "sweep_dir": str(sweep_dir),
        "definition": "mcs_A→B[i] = max_j cos(W_dec_A[i], W_dec_B[j]); found again: mcs ≥ threshold; matched: "
        "pairs of a one-to-one (Hungarian) matching of A and B with cosine ≥ found_threshold",
        "baseline": f"A against a random Gaussian dictionary of B's shape (seed {settings.baseline_seed})",
        "thresholds": list(settings.thresholds),
        "found_threshold": settings.found_threshold,
        "comparison_groups": [
            {"label": g.label, "runs": [r.name for r in g.runs], "largest": g.largest.name}
            for g in comparison.groups
        ],
        "not_compared": (
            "runs in different comparison groups (hook point, d_in, model) are never compared"
            if len(comparison.groups) > 1
            else None
        ),
        "failed": {f.name: f.reason for f in failed},
        "runs": run_entries,
        "pairs": [
            {"a": a, "b": b, **p.trained.to_json(), "baseline": p.baseline.to_json(), "matched": p.matched,
             "baseline_matched": p.baseline_matched}
            for (a, b), p in comparison.pairs.items()
        ],
        "headline": headline(runs, failed, comparison),
        "found_in_a_larger_dictionary": {
            "definition": "Σ over runs of their features with MCS ≥ found_threshold in at least one larger "
            "dictionary of the same settings and seed (the seed experiment's count of features found again)",
            "features": sum(f.in_any_larger for f in up_the_sizes.values()),
            "baseline": sum(f.baseline_in_any_larger for f in up_the_sizes.values()),
        },
    }


def _run_entry(run: Run, comparison: Comparison, settings: EvalSettings) -> dict:
    """A finished run in mcs.json: its setting and the features other dictionaries find again."""
    largest = comparison.largest_of(run.name)
    in_runs = {b: p.found_again for (a, b), p in comparison.pairs.items() if a == run.name}
    partner = comparison.seed_partners.get(run.name)
    by_seed = comparison.pairs[run.name, partner] if partner else None
    up = comparison.up_the_sizes.get(run.name)
    return {
        "status": "ok",
        "comparison_group": run.comparison_group,
        **hyperparameters(run.cfg),
        "dead_features": run.dead_features,
        "found_again": {
            "threshold": settings.found_threshold,
            "largest": largest.name,
            "in_largest": None if largest is run else in_runs[largest.name],
            "in_runs": in_runs,
            "matched_in_runs": {b: p.matched for (a, b), p in comparison.pairs.items() if a == run.name},
            "larger_same_seed": None if up is None else asdict(up),
            "other_seed": None if by_seed is None else {
                "run": partner,
                "found_again": by_seed.found_again,
                "baseline_found_again": by_seed.baseline_found_again,
                "matched": by_seed.matched,
                "baseline_matched": by_seed.baseline_matched,
            },
        },
    }


def headline(runs: list[Run], failed: list[FailedRun], comparison: Comparison) -> dict[str, float]:
    """Flat numbers for a dashboard (the W&B run's summary): per run, its overlap with the largest
    dictionary of its group against chance."""
    numbers: dict[str, float] = {
        "n_runs": len(runs) + len(failed),
        "n_failed": len(failed),
        "n_comparison_groups": len(comparison.groups),
        "n_pairs": len(comparison.pairs),
    }
    for group in comparison.groups:
        for run in group.runs:
            if run is group.largest:
                continue
            p = comparison.pairs[run.name, group.largest.name]
            numbers[f"found_in_largest/{run.name}"] = p.found_again
            numbers[f"found_in_largest_fraction/{run.name}"] = p.found_again / run.d_sae
            numbers[f"baseline_found_in_largest/{run.name}"] = p.baseline_found_again
            numbers[f"mean_mcs_to_largest/{run.name}"] = p.trained.mean_mcs
            numbers[f"baseline_mean_mcs_to_largest/{run.name}"] = p.baseline.mean_mcs
    return numbers


@dataclass(frozen=True)
class SummaryRow:
    """One run of summary.csv (failed ones included): its setting, how many of its features the largest
    dictionary of its group, its next larger dictionaries and its other seed find again beside chance,
    and its metrics.json. `columns()` is the row as summary.csv and the W&B table have it."""

    run: str
    status: str  # ok | failed
    failure: str | None
    overrides: str
    setting: dict[str, object]  # hyperparameters(), then sae.<key> for every architecture key of the sweep
    comparison_group: str | None = None
    largest_in_group: str | None = None
    dead_features: int | None = None
    mean_mcs_to_largest: float | None = None
    found_in_largest: int | None = None
    baseline_found_in_largest: int | None = None
    matched_with_largest: int | None = None
    baseline_matched_with_largest: int | None = None
    next_larger_run: str | None = None
    found_in_next_larger: int | None = None
    baseline_found_in_next_larger: int | None = None
    matched_with_next_larger: int | None = None
    found_in_any_larger: int | None = None
    baseline_found_in_any_larger: int | None = None
    other_seed_run: str | None = None
    found_by_other_seed: int | None = None
    baseline_found_by_other_seed: int | None = None
    matched_with_other_seed: int | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)  # every key of any run's metrics.json

    def columns(self) -> dict[str, object]:
        """Column name → value: run, status, failure, overrides, the setting, the overlaps, the metrics."""
        overlaps = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("setting", "metrics")}
        first = {key: overlaps.pop(key) for key in ("run", "status", "failure", "overrides")}
        return first | self.setting | overlaps | self.metrics


def summary_rows(runs: list[Run], failed: list[FailedRun], comparison: Comparison) -> list[SummaryRow]:
    """One row per run (failed ones included), in name order: hyperparameters, the run's overlap with
    its group's largest dictionary, and every key of its metrics.json."""
    metric_keys = list(dict.fromkeys(key for run in runs for key in run.metrics))
    # every architecture key of any run (sae.k, sae.l0_coef, ...): a column each, empty where it has none
    sae_keys = list(dict.fromkeys(k for r in [*runs, *failed] for k in _sae_columns(r.cfg) if k != "sae.architecture"))
    rows = []
    for entry in sorted([*runs, *failed], key=lambda r: natural_key(r.name)):
        setting = hyperparameters(entry.cfg) | {key: _sae_columns(entry.cfg).get(key) for key in sae_keys}
        if isinstance(entry, FailedRun):
            metrics = dict.fromkeys(metric_keys)
            rows.append(SummaryRow(entry.name, "failed", entry.reason, entry.overrides, setting, metrics=metrics))
        else:
            metrics = {key: entry.metrics.get(key) for key in metric_keys}
            rows.append(_run_row(entry, comparison, setting, metrics))
    return rows


def _sae_columns(cfg: dict) -> dict[str, object]:
    """The run's architecture keys as columns: `sae.k`, and the recipe's as `sae.recipe.lr` ..."""
    columns = {}
    for key, value in (cfg.get("sae") or {}).items():
        if isinstance(value, dict):
            columns |= {f"sae.{key}.{inner}": v for inner, v in value.items()}
        else:
            columns[f"sae.{key}"] = value
    return columns


def _run_row(run: Run, comparison: Comparison, setting: dict, metrics: dict) -> SummaryRow:
    largest = comparison.largest_of(run.name)
    to_largest = None if largest is run else comparison.pairs[run.name, largest.name]
    up = comparison.up_the_sizes.get(run.name)
    partner = comparison.seed_partners.get(run.name)
    by_seed = comparison.pairs[run.name, partner] if partner else None
    return SummaryRow(
        run.name, "ok", None, run.overrides, setting,
        comparison_group=run.comparison_group,
        largest_in_group=largest.name,
        dead_features=run.dead_features,
        mean_mcs_to_largest=to_largest and to_largest.trained.mean_mcs,
        found_in_largest=to_largest and to_largest.found_again,
        baseline_found_in_largest=to_largest and to_largest.baseline_found_again,
        matched_with_largest=to_largest and to_largest.matched,
        baseline_matched_with_largest=to_largest and to_largest.baseline_matched,
        next_larger_run=up and up.next_larger,
        found_in_next_larger=up and up.in_next_larger,
        baseline_found_in_next_larger=up and up.baseline_in_next_larger,
        matched_with_next_larger=up and up.matched_in_next_larger,
        found_in_any_larger=up and up.in_any_larger,
        baseline_found_in_any_larger=up and up.baseline_in_any_larger,
        other_seed_run=partner or None,
        found_by_other_seed=by_seed and by_seed.found_again,
        baseline_found_by_other_seed=by_seed and by_seed.baseline_found_again,
        matched_with_other_seed=by_seed and by_seed.matched,
        metrics=metrics,
    )


def console_table(rows: list[SummaryRow], found_threshold: float) -> str:
    """The evaluation as a short table for the console: per run its fidelity (± standard error) and how
    many of its features are found again, beside chance: in the next larger dictionary of the same
    settings and seed when the sweep has a size axis (else in the largest of its group), and by the
    other seed when it has one; then the sweep's total found again in a larger dictionary."""

    def number(row: SummaryRow, key: str, digits: int) -> str:
        value, se = row.metrics.get(key), row.metrics.get(f"{key}_se")
        if value is None:
            return "-"
        return f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")

    def share(found: int, d_sae: int, matched: int | None) -> str:
        return f"{found} of {d_sae} ({found / d_sae:.1%}" + (f", matched {matched / d_sae:.1%})" if matched is not None else ")")

    seeds = any(row.other_seed_run for row in rows)
    sizes = any(row.next_larger_run for row in rows)
    where = "in the next larger, same seed" if sizes else "in the largest"
    extra_sets = extra_eval_sets(rows)
    header = ["run", "architecture", "d_sae", "L0", "FVU", "ce_recovered",
              *(f"{column} ({name})" for name in extra_sets for column in ("FVU", "ce_recovered")),
              f"found again {where} (MCS ≥ {found_threshold:g})"]
    if seeds:
        header.append("by the other seed")
    table = [header]
    for row in rows:
        if row.status != "ok":
            table.append([row.run, "failed", "", "", "", "", *[""] * (2 * len(extra_sets)), str(row.failure)[:60]]
                         + [""] * seeds)
            continue
        d_sae = row.setting["d_sae"]
        if sizes:
            found = row.found_in_next_larger
            again = "-" if found is None else (
                f"{share(found, d_sae, row.matched_with_next_larger)}; chance "
                f"{row.baseline_found_in_next_larger} in {row.next_larger_run}")
        elif (found := row.found_in_largest) is None:
            again = "(the largest)" if row.largest_in_group == row.run else "-"
        else:
            again = (f"{share(found, d_sae, row.matched_with_largest)}; chance "
                     f"{row.baseline_found_in_largest} in {row.largest_in_group}")
        line = [row.run, str(row.setting["architecture"]), str(d_sae), number(row, "l0", 1),
                number(row, "fvu", 4), number(row, "ce_recovered", 4),
                *(number(row, f"{name}/{key}", 4) for name in extra_sets for key in ("fvu", "ce_recovered")), again]
        if seeds:
            found = row.found_by_other_seed
            line.append("-" if found is None else (
                f"{share(found, d_sae, row.matched_with_other_seed)}; chance {row.baseline_found_by_other_seed}"))
        table.append(line)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
    if sizes:
        total = sum(row.found_in_any_larger or 0 for row in rows)
        chance = sum(row.baseline_found_in_any_larger or 0 for row in rows)
        lines.append(f"features found again in a larger dictionary of the same seed (MCS ≥ {found_threshold:g}), "
                     f"all runs: {total} (chance {chance})")
    return "\n".join(lines)


def extra_eval_sets(rows: list[SummaryRow]) -> list[str]:
    """The names of the extra held-out sets (eval.sets) the runs were measured on, from their `<set>/fvu` metrics."""
    return list(dict.fromkeys(key.split("/")[0] for row in rows for key in row.metrics if key.endswith("/fvu")))


def write_summary_csv(path: Path, rows: list[SummaryRow]) -> None:
    columns = [row.columns() for row in rows]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(columns)
    atomic_write_bytes(path, buffer.getvalue().encode())
