"""`python report.py run_dir=RUN ...`: the command-line side of the report (config, sweep, W&B)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from saesweep.data import dataset_description
from saesweep.errors import ConfigError
from saesweep.rundir import (
    CFG_FILE,
    load_run_config,
    load_sae,
    recorded_wandb_group,
    run_dirs_in,
    sweep_dir_of,
)

from .build import BuiltReport, build_report
from .settings import ReportSettings

log = logging.getLogger(__name__)


def report_from_config(cfg: DictConfig) -> BuiltReport:
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise ConfigError("run_dir is required: python report.py run_dir=PATH/TO/RUN")
    section = OmegaConf.to_container(cfg.report, resolve=True)
    sweep_dir = Path(section["sweep_dir"]) if section.get("sweep_dir") else None
    run_dir = Path(cfg.run_dir)
    released = released_run_config(run_dir, cfg)
    if sweep_dir is None and released is None and (sweep_dir := sweep_dir_of(run_dir)) is not None:
        # a job of a sweep: its features are compared with the sweep's other runs
        log.info("run_dir belongs to the sweep %s: MCS against its other runs", sweep_dir)
    return report_runs([run_dir], section, sweep_dir, run_cfg=released, trust_pickle=bool(cfg.trust_pickle))[0]


def released_run_config(run_dir: Path, cfg: DictConfig) -> dict | None:
    """For a dictionary that is not a saesweep run (SAELens, sparsify, dictionary_learning): the run
    configuration a report needs, from the command line's model, data, hook_point and ctx_len and what
    the dictionary's own files say. None for a saesweep run, which has its own."""
    if (run_dir / CFG_FILE).is_file() and "dataset" in load_run_config(run_dir):
        return None
    if not (cfg.model.path or cfg.model.name):
        raise ConfigError(f"run_dir={str(run_dir)!r} is a released dictionary: give its model (model.path=DIR or model.name=NAME)")
    saved = load_sae(run_dir, trust_pickle=bool(cfg.trust_pickle)).run_cfg
    metadata = saved.get("metadata") or {}
    hook_point = cfg.hook_point or saved.get("hook_name") or metadata.get("hook_name") or saved.get("hook_point")
    if saved.get("source_format") == "sparsify" and not cfg.hook_point:
        hook_point = None  # sparsify names the directory after its own module path, not a TransformerLens hook
    if not hook_point:
        raise ConfigError(f"run_dir={str(run_dir)!r} does not say its hook point: give hook_point=blocks.N.hook_...")
    ctx_len = cfg.ctx_len or saved.get("context_size") or metadata.get("context_size") or 25
    return {
        **saved,
        "model_name": None if cfg.model.path else cfg.model.name,
        "model_path": str(Path(cfg.model.path).resolve()) if cfg.model.path else None,
        "hook_point": hook_point,
        "dataset": dataset_description(cfg),
        "ctx_len": int(ctx_len),
        "eval_n_tokens": int(ctx_len),  # a released dictionary has no evaluation set of ours
    }


def reports_wanted(section: DictConfig) -> bool:
    """Whether a `report:` section asks for any feature (the evaluator's switch)."""
    return bool(section.get("features")) or (section.get("top_n") or 0) > 0


def report_runs(
    run_dirs: list[Path], section: dict, sweep_dir: Path | None, run_cfg: dict | None = None,
    trust_pickle: bool = False,
) -> list[BuiltReport]:
    """The report of each run (RUN/report/), with MCS against the sweep's runs when `sweep_dir` is given;
    `run_cfg`: the configuration of a released dictionary (see released_run_config)."""
    settings = ReportSettings.from_config(section)
    sweep_runs = run_dirs_in(sweep_dir) if sweep_dir else None
    wandb_cfg = section.get("wandb") or {}
    reports = []
    for run_dir in run_dirs:
        built = build_report(run_dir, settings, sweep_run_dirs=sweep_runs, run_cfg=run_cfg, trust_pickle=trust_pickle)
        if wandb_cfg.get("enabled"):
            log_to_new_wandb_run(built, run_dir, sweep_dir, settings, wandb_cfg)
        log.info("report of %d features: %s", len(built.features), built.index_html)
        reports.append(built)
    return reports


def log_to_new_wandb_run(
    built: BuiltReport, run_dir: Path, sweep_dir: Path | None, settings: ReportSettings, wandb_cfg: dict
) -> None:
    """A W&B run of job_type "report" next to the training run (in RUN/wandb/) and in its group.

    The group is the training run's (rundir.recorded_wandb_group).
    """
    import wandb

    from .wandb_log import log_report

    run = wandb.init(
        project=wandb_cfg.get("project"),
        entity=wandb_cfg.get("entity"),
        mode=wandb_cfg.get("mode", "offline"),
        dir=str(run_dir),
        group=recorded_wandb_group([run_dir], sweep_dir),
        job_type="report",
        name=f"{run_dir.name}-report",
        config={"run_dir": str(run_dir.resolve()), "report": asdict(settings)},
    )
    try:
        log_report(run, built.data)
    finally:
        run.finish()
