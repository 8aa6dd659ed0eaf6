"""What a run prints: saesweep's own lines and the progress bars. Known third-party noise, printed on
every run and saying nothing about this one, is filtered out; `SAESWEEP_VERBOSE=1` (or
`HYDRA_FULL_ERROR=1`, which debugging sets anyway) shows everything.

Filtered: Lightning's litlogger/litmodels tips, its "TPU available" line and "`Trainer.fit` stopped"
line, its pytree deprecation and IterableDataset `__len__` warnings (the activation stream has a length
on purpose and is read in the main process), its "`weights_only` was not set" line, its "ModelCheckpoint
with manual optimization" warning at every periodic checkpoint (saesweep's checkpoint holds the state after
the step, as resuming needs), torch.load's `weights_only` FutureWarning, and wandb's console output (run
banners and history tables: `WANDB_SILENT=true` unless set; the runs are written as before, `wandb sync`
uploads them). wandb's "anonymous setting has no effect" warning is avoided where it starts (train.make_logger).
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_VARIABLES = ("SAESWEEP_VERBOSE", "HYDRA_FULL_ERROR")

NOISY_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Your `IterableDataset` has `__len__` defined",
    r"You are using `torch.load` with `weights_only=False`",
    # each periodic checkpoint under manual optimization; saesweep's hold the state after the step on purpose
    r"Using ModelCheckpoint with manual optimization",
)
NOISY_LINES = (
    "💡 Tip:",
    "TPU available:",
    "HPU available:",
    "`Trainer.fit` stopped:",
    "`weights_only` was not set",
)
# where Lightning's rank-zero messages and its checkpoint connector log from
NOISY_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
    "lightning.pytorch.trainer.connectors.checkpoint_connector",
    "lightning.pytorch.trainer.connectors.logger_connector.logger_connector",
    "lightning.pytorch.trainer.connectors.callback_connector",
    "lightning.pytorch.loops.fit_loop",
    "lightning.pytorch",
)


def verbose() -> bool:
    return any(os.environ.get(name, "").lower() not in ("", "0", "false", "no") for name in VERBOSE_VARIABLES)


def is_noise(record: logging.LogRecord) -> bool:
    return str(record.getMessage()).lstrip().startswith(NOISY_LINES)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not is_noise(record)


_DROP_NOISE = _DropNoise()


def quiet_third_party() -> None:
    """Filter the known third-party noise from this process's console (nothing when verbose())."""
    if verbose():
        return
    os.environ.setdefault("WANDB_SILENT", "true")
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if _DROP_NOISE not in logger.filters:
            logger.addFilter(_DROP_NOISE)
