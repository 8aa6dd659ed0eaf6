"""REPRODUCTION.md from an evaluated seed experiment: `python -m saesweep.reproduction SWEEP_DIR`
(`make reproduce` trains `experiment=seed_reference`, evaluates it and runs this).

Everything in the file comes from the sweep's evaluation (mcs.json, summary.csv and the plots, which are
copied beside it), so the figures are never typed by hand. The targets are the seed experiment's
(issue #13); each is printed with what was measured and whether it is met.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from saesweep.errors import ConfigError
from saesweep.evaluate import MCS_FILE, PLOT_FILES, RELEASED_PREFIX, SUMMARY_FILE, evaluation_dir
from saesweep.io import atomic_write_bytes
from saesweep.rundir import load_run_config

FIGURES = ("found_by_size", "mcs_vs_frequency", "features_found", "pareto")
WHAT_IT_TAKES = """\
How many features are found again is set by how far the dictionaries converge. Before relu_l1's 0.1
encoder start and gradient clipping (benchmarks/RESULTS.md, "Seed experiment: choosing the setup" and
"Why SAELens's ReLU/L1 beat saesweep's"), one pass over 1M tokens found 4.8 % of the 4× dictionary's
features again in the 8× and 6.6 % by the other seed, and three passes 20.8 % and 26.5 %; with them,
three passes found 56.2 % and 53.2 % (58.8 % and 55.7 % with the earlier 20-step warm-up). The largest dictionaries are the least converged (the rare
features keep directions at chance longest). Train longer where a target is missed:
`make reproduce ARGS='n_tokens=2000000 trainer.max_epochs=5'` (on a GPU, or given a few hours here)."""
PYTHIA_EXPECTATIONS = """\
`python train.py experiment=seed -m` runs the same recipe on Pythia-70M-deduped's
`blocks.2.hook_resid_post` with NeelNanda/pile-10k (it needs the Hugging Face hub, which the machines
this file was generated on cannot reach, so it has not been run here). What the seed experiment reports for that
setup, and what to compare with: larger dictionaries learn progressively more features by MCS (thousands
of features found again across the 1×–8× dictionaries at MCS ≥ 0.9), the features found again are the
more frequent and more interpretable ones, and a ReLU/L1 dictionary keeps the perplexity increase small.
Pythia-70M's d_model is 512 (the reference model's is 256): dictionaries have twice the features, and
the recipe doubles the tokens. Expect the same shape as the tables above (found again rising with
size, far above chance); the exact fractions depend on how long the dictionaries train, which the
measurements in benchmarks/RESULTS.md show matters more than anything else here."""
NEXT_SIZE_TARGET = 0.40  # of the 4× dictionary's features found again in the 8× (same seed), MCS ≥ 0.9
OTHER_SEED_TARGET = 0.50  # of the 4× dictionary's features found again by a second seed, MCS ≥ 0.9


@dataclass(frozen=True)
class RunRow:
    """One finished run of the sweep, as summary.csv gives it."""

    name: str
    seed: int
    dict_ratio: float
    d_sae: int
    values: dict[str, str]

    def number(self, key: str) -> float | None:
        text = self.values.get(key, "")
        return float(text) if text not in ("", "None") else None

    def fraction(self, key: str) -> float | None:
        found = self.number(key)
        return None if found is None else found / self.d_sae


def read_evaluation(sweep_dir: Path) -> tuple[dict, list[RunRow]]:
    out = evaluation_dir(sweep_dir)
    try:
        report = json.loads((out / MCS_FILE).read_text())
        with open(out / SUMMARY_FILE, newline="") as f:
            rows = [row for row in csv.DictReader(f) if row["status"] == "ok" and not row["run"].startswith(RELEASED_PREFIX)]
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{out} has no readable evaluation ({e}); run `python evaluate.py sweep_dir={sweep_dir}` first") from None
    runs = []
    for row in rows:
        cfg = load_run_config(sweep_dir / row["run"])
        runs.append(RunRow(row["run"], int(cfg.get("seed", 0)), float(row["dict_ratio"]), int(row["d_sae"]), row))
    if not runs:
        raise ConfigError(f"the evaluation of {sweep_dir} has no finished run")
    return report, sorted(runs, key=lambda r: (r.dict_ratio, r.seed))


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _with_se(row: RunRow, key: str, digits: int) -> str:
    value, se = row.number(key), row.number(f"{key}_se")
    if value is None:
        return "–"
    return f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def run_table(runs: list[RunRow]) -> list[str]:
    lines = [
        "| run | seed | dict_ratio | d_sae | L0 | FVU | ce_recovered | dead | in the next larger, same seed (matched; chance) | by the other seed (matched; chance) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        up = "–" if r.number("found_in_next_larger") is None else (
            f"{int(r.number('found_in_next_larger'))} = {_percent(r.fraction('found_in_next_larger'))} "
            f"({_percent(r.fraction('matched_with_next_larger'))}; {int(r.number('baseline_found_in_next_larger'))})")
        across = "–" if r.number("found_by_other_seed") is None else (
            f"{int(r.number('found_by_other_seed'))} = {_percent(r.fraction('found_by_other_seed'))} "
            f"({_percent(r.fraction('matched_with_other_seed'))}; {int(r.number('baseline_found_by_other_seed'))})")
        lines.append(
            f"| {r.name} | {r.seed} | {r.dict_ratio:g} | {r.d_sae} | {_with_se(r, 'l0', 1)} | {_with_se(r, 'fvu', 4)} "
            f"| {_with_se(r, 'ce_recovered', 4)} | {r.values.get('dead_features', '–')} | {up} | {across} |"
        )
    return lines


def by_size(runs: list[RunRow]) -> dict[float, dict[str, float | None]]:
    """Per dict_ratio, means over the seeds: counts and fractions found again."""
    sizes: dict[float, list[RunRow]] = {}
    for r in runs:
        sizes.setdefault(r.dict_ratio, []).append(r)
    return {
        ratio: {
            "d_sae": members[0].d_sae,
            "next_count": _mean([m.number("found_in_next_larger") for m in members]),
            "next_fraction": _mean([m.fraction("found_in_next_larger") for m in members]),
            "next_matched": _mean([m.fraction("matched_with_next_larger") for m in members]),
            "seed_count": _mean([m.number("found_by_other_seed") for m in members]),
            "seed_fraction": _mean([m.fraction("found_by_other_seed") for m in members]),
            "seed_matched": _mean([m.fraction("matched_with_other_seed") for m in members]),
        }
        for ratio, members in sorted(sizes.items())
    }


def _thousands(value: float | None) -> str:
    return "?" if value is None else f"{int(value):,}"


def _count(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def targets(sizes: dict[float, dict[str, float | None]]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for the seed experiment's targets; met None when not measurable here."""
    def rise(key: str) -> tuple[str, bool | None]:
        counts = [(ratio, s[key]) for ratio, s in sizes.items() if s[key] is not None]
        measured = ", ".join(f"{ratio:g}×: {_count(count)}" for ratio, count in counts) or "not measured"
        rises = None if len(counts) < 2 else all(b[1] > a[1] for a, b in zip(counts, counts[1:], strict=False))
        return measured, rises

    four = sizes.get(4.0, {})
    next_fraction, seed_fraction = four.get("next_fraction"), four.get("seed_fraction")
    return [
        ("features found again in the next larger dictionary rise with dictionary size", *rise("next_count")),
        ("features found again by the other seed rise with dictionary size", *rise("seed_count")),
        (f"≥ {NEXT_SIZE_TARGET:.0%} of the 4× dictionary's features found again in the 8× (same seed, MCS ≥ 0.9)",
         _percent(next_fraction), None if next_fraction is None else next_fraction >= NEXT_SIZE_TARGET),
        (f"≥ {OTHER_SEED_TARGET:.0%} of the 4× dictionary's features found again by a second seed (MCS ≥ 0.9)",
         _percent(seed_fraction), None if seed_fraction is None else seed_fraction >= OTHER_SEED_TARGET),
    ]


FREQUENCY_BANDS = ((0.0, 1e-3), (1e-3, 1e-2), (1e-2, 1.0))  # fraction of held-out tokens a feature fires on


def by_frequency(sweep_dir: Path, runs: list[RunRow], threshold: float) -> list[str]:
    """Table rows: per size, the features found again by the other seed within each frequency band (the
    seed experiment's thread: frequent features are found first). Dead features are left out."""
    from saesweep.evaluate import Run, load_run, mcs, seed_partners

    loaded = {r.name: load_run(sweep_dir / r.name, r.name) for r in runs}
    loaded = {name: run for name, run in loaded.items() if isinstance(run, Run)}
    partners = seed_partners(list(loaded.values()))
    lines = []
    for ratio in sorted({r.dict_ratio for r in runs}):
        pairs = [(loaded[r.name], loaded[partners[r.name]]) for r in runs if r.dict_ratio == ratio and r.name in partners]
        if not pairs:
            continue
        found_again = [(run, mcs(run.decoder, other.decoder).numpy() >= threshold) for run, other in pairs]
        cells = []
        for low, high in FREQUENCY_BANDS:
            found = total = 0
            for run, found_mask in found_again:
                band = (run.frequency > 0) & (run.frequency >= low) & (run.frequency < high)
                found += int(found_mask[band].sum())
                total += int(band.sum())
            cells.append(f"{found / total:.1%} of {total}" if total else "–")
        lines.append(f"| {ratio:g} | " + " | ".join(cells) + " |")
    return lines


def setup_lines(sweep_dir: Path, runs: list[RunRow]) -> list[str]:
    cfg = load_run_config(sweep_dir / runs[0].name)
    train = cfg.get("train") or {}
    sae = {k: v for k, v in (cfg.get("sae") or {}).items() if k not in ("architecture", "recipe")}
    recipe = (cfg.get("sae") or {}).get("recipe") or {}
    schedule = (
        f"lr {recipe.get('lr', train.get('lr'))}, {recipe.get('lr_warmup_steps')} warm-up steps, decay over the last "
        f"{recipe.get('lr_decay_fraction'):.0%} of steps, gradient norm clipped at {recipe.get('grad_clip_norm')}"
        if recipe else f"lr {train.get('lr')}"
    )
    return [
        f"- model: `{cfg.get('model_name') or '/'.join(Path(str(cfg.get('model_path'))).parts[-2:])}`, "
        f"hook `{cfg.get('hook_point')}`, "
        f"d_in {cfg.get('d_in')}, {cfg.get('ctx_len')}-token contexts",
        f"- architecture: `{(cfg.get('sae') or {}).get('architecture', cfg.get('architecture'))}` "
        + ", ".join(f"`{k}={v}`" for k, v in sae.items()),
        f"- training: {_thousands(cfg.get('n_tokens'))} tokens × {cfg.get('epochs', 1)} epoch(s), batch {train.get('batch_size')}, "
        f"{schedule}; seeds {sorted({r.seed for r in runs})}; dict_ratio "
        f"{sorted({r.dict_ratio for r in runs})}",
        f"- judged on {_thousands(runs[0].number('n_eval_tokens'))} held-out tokens (documents never trained on)",
    ]


def found_by_size(sizes: dict, total: dict, threshold: float) -> list[str]:
    """The section of features found again, by dictionary size: in the next larger and by the other seed."""
    return [
        f"## Found again (MCS ≥ {threshold:g}), by size",
        "",
        "Means over the seeds. *Next larger*: the dictionary of the next size with the same settings and seed; "
        "*other seed*: the dictionary of the same size and settings trained with the other seed. Matched: "
        "one-to-one (Hungarian) matching, which cannot count one feature of the other dictionary twice.",
        "",
        "| dict_ratio | d_sae | in the next larger | matched | by the other seed | matched |",
        "|---|---|---|---|---|---|",
        *[
            f"| {ratio:g} | {s['d_sae']} | {_count(s['next_count'])} ({_percent(s['next_fraction'])}) | "
            f"{_percent(s['next_matched'])} | {_count(s['seed_count'])} ({_percent(s['seed_fraction'])}) | "
            f"{_percent(s['seed_matched'])} |"
            for ratio, s in sizes.items()
        ],
        "",
        f"Features found again in a larger dictionary of the same seed, all runs (the seed experiment's total): "
        f"**{total.get('features', '–')}** (chance {total.get('baseline', '–')}).",
        "",
    ]


def write_reproduction(sweep_dir: Path, out: Path, command: str) -> Path:
    """REPRODUCTION.md at `out`, its figures copied into `<out's folder>/docs/reproduction/`."""
    sweep_dir = Path(sweep_dir)
    report, runs = read_evaluation(sweep_dir)
    figures_dir = out.parent / "docs" / "reproduction"
    figures_dir.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:
        shutil.copyfile(evaluation_dir(sweep_dir) / PLOT_FILES[name], figures_dir / PLOT_FILES[name])
    sizes = by_size(runs)
    target_rows = targets(sizes)  # "What it would take" only where one is missed
    threshold = report.get("found_threshold", 0.9)
    total = report.get("found_in_a_larger_dictionary") or {}
    rel = figures_dir.relative_to(out.parent).as_posix()
    lines = [
        "# Reproducing the seed experiment's result",
        "",
        "Generated by `python -m saesweep.reproduction` from the evaluation of "
        f"`{sweep_dir.as_posix()}` on {datetime.now(timezone.utc):%Y-%m-%d}; do not edit by hand.",
        "",
        "## Command",
        "",
        "```",
        command,
        "```",
        "",
        "## Setup",
        "",
        *setup_lines(sweep_dir, runs),
        "",
        *found_by_size(sizes, total, threshold),
        f"## Found again by the other seed, by how often a feature fires (MCS ≥ {threshold:g})",
        "",
        "Features firing on a fraction of the held-out tokens in each band (dead ones left out), summed over "
        "the seeds: the share the other seed's dictionary of the same size finds again. Rare features see few "
        "tokens in training and are the last to settle (mcs_vs_frequency.png shows each feature).",
        "",
        "| dict_ratio | " + " | ".join(f"{low:g} ≤ f < {high:g}" for low, high in FREQUENCY_BANDS) + " |",
        "|---|" + "---|" * len(FREQUENCY_BANDS),
        *by_frequency(sweep_dir, runs, threshold),
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *[f"| {t} | {m} | {'–' if met is None else ('yes' if met else '**no**')} |" for t, m, met in target_rows],
        "",
        "## Every run",
        "",
        "Fidelity on the held-out tokens (± one standard error over contexts); found again as count = fraction "
        "of the dictionary (matched fraction; count a random dictionary of the same shape reaches).",
        "",
        *run_table(runs),
        "",
        "## Figures",
        "",
        *[f"![{name}]({rel}/{PLOT_FILES[name]})" for name in FIGURES],
        "",
        *(["## What it would take", "", WHAT_IT_TAKES, ""] if any(met is False for _, _, met in target_rows) else []),
        "## On Pythia-70M",
        "",
        PYTHIA_EXPECTATIONS,
        "",
    ]
    atomic_write_bytes(out, "\n".join(lines).encode())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="an evaluated sweep (python evaluate.py sweep_dir=...)")
    parser.add_argument("--out", type=Path, default=Path("REPRODUCTION.md"))
    parser.add_argument("--command", default="make reproduce", help="the command the file names")
    args = parser.parse_args(argv)
    try:
        path = write_reproduction(args.sweep_dir, args.out, args.command)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
