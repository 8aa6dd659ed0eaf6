"""Evaluate a finished sweep: `python evaluate.py sweep_dir=multirun/<date>/<time>`.

Writes mcs.json, summary.csv, the plots and a W&B evaluation run to <sweep_dir>/evaluation/; with
report.top_n=N (or report.features=[...]) also the feature report of every finished run.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from saesweep.cli import errors_without_traceback
from saesweep.console import quiet_third_party
from saesweep.evaluate import (
    RELEASED_PREFIX,
    EvalSettings,
    LayerSettings,
    WandbSettings,
    console_table,
    evaluate_sweep,
    evaluation_dir,
)
from saesweep.report.app import report_runs, reports_wanted

quiet_third_party()  # known third-party console noise off (SAESWEEP_VERBOSE=1 shows it)

# hydra.run.dir is ${evaluation_dir:${sweep_dir}}: a mistyped sweep_dir fails here, naming the bad
# value, before Hydra creates its output directory inside it.
OmegaConf.register_new_resolver("evaluation_dir", lambda sweep_dir: str(evaluation_dir(sweep_dir)))


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@errors_without_traceback
def main(cfg: DictConfig) -> None:
    sweep_dir = Path(cfg.sweep_dir)
    evaluation = evaluate_sweep(
        sweep_dir,
        EvalSettings.from_config(cfg),
        WandbSettings.from_config(cfg.logger),
        out_dir=Path(HydraConfig.get().runtime.output_dir),
        compare_with=[Path(d) for d in cfg.compare_with or []],
        layer_settings=LayerSettings.from_config(cfg),
    )
    if reports_wanted(cfg.report):
        own_runs = [run.path for run in evaluation.runs if not run.name.startswith(RELEASED_PREFIX)]
        report_runs(own_runs, OmegaConf.to_container(cfg.report, resolve=True), sweep_dir)
    print(f"\n{sweep_dir}: held-out fidelity and features found again\n{console_table(evaluation.summary, cfg.found_threshold)}")
    if evaluation.layers:
        print(evaluation.layers.console_line())


if __name__ == "__main__":
    try:
        main()
    except OmegaConfBaseException as e:
        # Raised while Hydra resolves hydra.run.dir (no sweep_dir, or not a directory): before the app
        # runs, where Hydra's error report fails and would print a 100-line traceback instead.
        sys.exit(f"evaluate.py: {e}")
