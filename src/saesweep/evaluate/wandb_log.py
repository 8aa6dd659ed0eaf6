"""The evaluation's W&B run: one run of job_type "evaluation" in the sweep's group, with the summary
table, the plots and the headline numbers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from saesweep.errors import ConfigError

from .outputs import SummaryRow

_WANDB_MODES = ("online", "offline", "disabled")


@dataclass(frozen=True)
class WandbSettings:
    mode: str = "offline"  # offline: a local run under <sweep_dir>/evaluation/wandb, `wandb sync` later
    project: str = "saesweep"
    entity: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in _WANDB_MODES:
            raise ConfigError(f"logger.mode={self.mode!r} is not a W&B mode; allowed: {list(_WANDB_MODES)}")

    @classmethod
    def from_config(cls, cfg: DictConfig) -> WandbSettings:
        return cls(mode=cfg.mode, project=cfg.project, entity=cfg.entity)


def log_to_wandb(
    settings: WandbSettings,
    out_dir: Path,
    group: str,
    summary: list[SummaryRow],
    plot_paths: dict[str, Path],
    numbers: dict[str, float],
    config: dict,
) -> None:
    """One evaluation run in the sweep's group: the summary table, the plots and the headline numbers."""
    import wandb  # slow to import; only when a run is wanted

    run = wandb.init(
        mode=settings.mode,
        dir=str(out_dir),
        project=settings.project,
        entity=settings.entity,
        group=group,
        job_type="evaluation",
        name="evaluation",
        config=config,
    )
    try:
        rows = [row.columns() for row in summary]
        columns = list(rows[0])
        table = wandb.Table(columns=columns, data=[[_table_cell(row[c]) for c in columns] for row in rows])
        run.log({"summary": table, **{name: wandb.Image(str(path)) for name, path in plot_paths.items()}})
        run.summary.update(numbers)
    finally:
        run.finish()


def _table_cell(value):
    # A W&B table column holds one type: text cells for everything but numbers and empties.
    return value if value is None or isinstance(value, (int, float)) else str(value)
