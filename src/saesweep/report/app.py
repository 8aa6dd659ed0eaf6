"""`python report.py run_dir=RUN ...`: the command-line side of the report (config, sweep, W&B)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from saesweep.errors import ConfigError
from saesweep.rundir import run_dirs_in

from .build import BuiltReport, build_report
from .settings import ReportSettings

log = logging.getLogger(__name__)


def report_from_config(cfg: DictConfig) -> BuiltReport:
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise ConfigError("run_dir is required: python report.py run_dir=PATH/TO/RUN")
    section = OmegaConf.to_container(cfg.report, resolve=True)
    sweep_dir = Path(section["sweep_dir"]) if section.get("sweep_dir") else None
    return report_runs([Path(cfg.run_dir)], section, sweep_dir)[0]


def reports_wanted(section: DictConfig) -> bool:
    """Whether a `report:` section asks for any feature (the evaluator's switch)."""
    return bool(section.get("features")) or (section.get("top_n") or 0) > 0


def report_runs(run_dirs: list[Path], section: dict, sweep_dir: Path | None) -> list[BuiltReport]:
    """The report of each run (RUN/report/), with MCS against the sweep's runs when `sweep_dir` is given."""
    settings = ReportSettings.from_config(section)
    sweep_runs = run_dirs_in(sweep_dir) if sweep_dir else None
    wandb_cfg = section.get("wandb") or {}
    reports = []
    for run_dir in run_dirs:
        built = build_report(run_dir, settings, sweep_run_dirs=sweep_runs)
        if wandb_cfg.get("enabled"):
            log_to_new_wandb_run(built, run_dir, sweep_dir, settings, wandb_cfg)
        log.info("report of %d features: %s", len(built.features), built.index_html)
        reports.append(built)
    return reports


def log_to_new_wandb_run(
    built: BuiltReport, run_dir: Path, sweep_dir: Path | None, settings: ReportSettings, wandb_cfg: dict
) -> None:
    """A W&B run of job_type "report" next to the training run (in RUN/wandb/) and in its group.

    The group follows the training rule: the sweep directory (the run's parent when it holds Hydra's
    multirun.yaml), else the run directory, as a path written the way it was given.
    """
    import wandb

    from .wandb_log import log_report

    if sweep_dir is None and (run_dir.parent / "multirun.yaml").is_file():
        sweep_dir = run_dir.parent
    run = wandb.init(
        project=wandb_cfg.get("project"),
        entity=wandb_cfg.get("entity"),
        mode=wandb_cfg.get("mode", "offline"),
        dir=str(run_dir),
        group=str(sweep_dir or run_dir),
        job_type="report",
        name=f"{run_dir.name}-report",
        config={"run_dir": str(run_dir.resolve()), "report": asdict(settings)},
    )
    try:
        log_report(run, built.data)
    finally:
        run.finish()
