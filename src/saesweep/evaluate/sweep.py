"""`evaluate_sweep`: every run of a sweep loaded, compared and written up under <sweep_dir>/evaluation/."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from saesweep.errors import ConfigError
from saesweep.io import atomic_write_json
from saesweep.rundir import recorded_wandb_group

from .compare import Comparison, EvalSettings, compare_runs
from .figures import write_plots
from .layers import LayerEvaluation, LayerSettings, evaluate_layers
from .outputs import SummaryRow, mcs_json, summary_rows, write_summary_csv
from .runs import FailedRun, Run, discover_runs, load_released
from .stability import stability, write_stability
from .truth import GROUND_TRUTH_FILE, evaluate_truth, ground_truth_json
from .wandb_log import WandbSettings, log_to_wandb

log = logging.getLogger(__name__)

EVALUATION_DIR = "evaluation"
MCS_FILE = "mcs.json"
SUMMARY_FILE = "summary.csv"


@dataclass(frozen=True)
class SweepEvaluation:
    runs: list[Run]
    failed: list[FailedRun]
    comparison: Comparison
    report: dict  # the content of mcs.json
    summary: list[SummaryRow]  # the rows of summary.csv
    out_dir: Path
    layers: LayerEvaluation | None = None  # across layers and on held-out tokens, when there was anything to do


def evaluation_dir(sweep_dir: str | Path) -> Path:
    """Where the evaluation of a sweep goes; checks first that the sweep directory exists."""
    if not Path(sweep_dir).is_dir():
        raise ConfigError(
            f"sweep_dir={str(sweep_dir)!r} is not a directory (expected multirun/<date>/<time>)"
        )
    return Path(sweep_dir) / EVALUATION_DIR


def evaluate_sweep(
    sweep_dir: str | Path,
    settings: EvalSettings | None = None,
    wandb_settings: WandbSettings | None = None,
    out_dir: Path | None = None,
    compare_with: list[Path] | None = None,
    layer_settings: LayerSettings | None = None,
) -> SweepEvaluation:
    """Evaluate every run of a sweep and write mcs.json, summary.csv, the plots and the W&B run;
    `compare_with`: released dictionaries (SAELens, sparsify, dictionary_learning or saesweep
    directories) added to the comparison, named `released:<directory name>`; `layer_settings`: the
    comparison across residual hook points and the opt-in one on held-out tokens (saesweep.evaluate.layers)."""
    settings = settings or EvalSettings()
    wandb_settings = wandb_settings or WandbSettings()
    sweep_dir = Path(sweep_dir)
    default_out_dir = evaluation_dir(sweep_dir)  # checks sweep_dir
    out_dir = Path(out_dir) if out_dir else default_out_dir
    runs, failed = discover_runs(sweep_dir, exclude=out_dir)
    layer_settings = layer_settings or LayerSettings()
    if compare_with:
        released = load_released([Path(d) for d in compare_with], runs)
        other_model = next((r for r in released if r.model not in {run.model for run in runs}), None)
        if other_model is not None and not layer_settings.activation_similarity:
            raise ConfigError(
                f"compare_with={str(other_model.path)!r} is from model {other_model.model!r}, not the sweep's: "
                "decoder directions of two models share no basis; add activation_similarity=true to compare them "
                "by their activations on the same tokens"
            )
        runs = runs + released
    log.info("%d runs to compare, %d failed", len(runs), len(failed))
    comparison = compare_runs(runs, settings)
    if runs and not comparison.pairs:
        log.warning(
            "no two runs of %s can be compared: MCS needs two dictionaries of the same hook point, d_in and model, "
            "and these runs are %s; fidelity is still summarised",
            sweep_dir, "; ".join(f"{g.label}: {', '.join(r.name for r in g.runs)}" for g in comparison.groups),
        )
    report = mcs_json(sweep_dir, runs, failed, comparison, settings)
    summary = summary_rows(runs, failed, comparison)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / MCS_FILE, report)
    write_summary_csv(out_dir / SUMMARY_FILE, summary)
    plot_paths = write_plots(out_dir, runs, comparison, settings)
    if truth := evaluate_truth(runs, comparison, settings.found_threshold):  # runs on synthetic activations
        atomic_write_json(out_dir / GROUND_TRUTH_FILE, ground_truth_json(truth))
    if frontier := stability(runs, comparison, truth):  # settings trained with two or more seeds
        write_stability(out_dir, frontier)
        for s in frontier:
            log.info("stability: %s (%s, d_sae %d): %.1f %% ± %.1f found again by another seed, fidelity %.4f%s",
                     s.setting, s.architecture, s.d_sae, 100 * s.found_by_other_seed, 100 * s.found_by_other_seed_sd,
                     s.fidelity, " (on the frontier)" if s.on_frontier else "")
    layers = evaluate_layers(runs, comparison.seed_partners, settings, layer_settings, out_dir)
    if wandb_settings.mode != "disabled":
        group = recorded_wandb_group([r.path for r in [*runs, *failed]], sweep_dir)
        config = {"sweep_dir": str(sweep_dir), **asdict(settings)}
        log_to_wandb(wandb_settings, out_dir, group, summary, plot_paths, report["headline"], config)
    log.info("wrote the evaluation of %s to %s", sweep_dir, out_dir)
    return SweepEvaluation(runs, failed, comparison, report, summary, out_dir, layers)
