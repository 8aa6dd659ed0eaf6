"""Post-hoc evaluation across the runs of a sweep: which features are real, in the sense that
dictionaries of different sizes find them again (max cosine similarity, MCS; docs/METHODS.md).

`evaluate_sweep(sweep_dir, ...)` reads every run directory of a sweep and writes, under
<sweep_dir>/evaluation/: mcs.json (MCS between every ordered pair of comparable runs, against a
random Gaussian baseline), summary.csv (one row per run: hyperparameters and metrics), the plots of
saesweep.plots and, unless disabled, one W&B evaluation run in the sweep's group.

The modules, bottom up: `cosines` (MCS maths: decoder cosines, their matching, overlap statistics),
`runs` (loading runs and released dictionaries; seed partners and larger dictionaries), `compare`
(the comparison of a sweep), `outputs` (mcs.json, its headline, summary.csv rows and the console
table), `figures` (the plots' inputs), `layers` (features across residual hook points of one model:
layers.json, layer_features.csv, persistence.png), `heldout` (the opt-in comparison on held-out tokens:
activation similarity and outlier dimensions), `wandb_log` (the W&B run) and `sweep` (evaluate_sweep).
"""

from saesweep.evaluate.compare import EvalSettings
from saesweep.evaluate.cosines import DEFAULT_CHUNK_SIZE, matched_cosines, mcs, mcs_both_ways
from saesweep.evaluate.figures import PLOT_FILES
from saesweep.evaluate.layers import LAYERS_FILE, LayerEvaluation, LayerSettings
from saesweep.evaluate.outputs import SummaryRow, console_table
from saesweep.evaluate.runs import RELEASED_PREFIX, FailedRun, Run, discover_runs, load_run, seed_partners
from saesweep.evaluate.sweep import MCS_FILE, SUMMARY_FILE, SweepEvaluation, evaluate_sweep, evaluation_dir
from saesweep.evaluate.wandb_log import WandbSettings

__all__ = [
    "DEFAULT_CHUNK_SIZE", "LAYERS_FILE", "MCS_FILE", "PLOT_FILES", "RELEASED_PREFIX", "SUMMARY_FILE", "EvalSettings",
    "FailedRun", "LayerEvaluation", "LayerSettings", "Run", "SummaryRow", "SweepEvaluation", "WandbSettings",
    "console_table", "discover_runs", "evaluate_sweep", "evaluation_dir", "load_run", "matched_cosines", "mcs",
    "mcs_both_ways", "seed_partners",
]
