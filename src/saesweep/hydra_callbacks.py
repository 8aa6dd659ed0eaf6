"""Hydra callbacks of the command-line apps (conf/*.yaml, `hydra.callbacks`): what must be checked
before Hydra creates the job's output directory and writes its .hydra/ files and log there."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from saesweep.config import check_writable_dir
from saesweep.errors import SaesweepError
from saesweep.rundir import lock_run_dir


class OutputDirGuard(Callback):
    """The output folder can be written (one line naming it if not, instead of Hydra's traceback);
    with `lock`, a single run's folder is locked at once (rundir.lock_run_dir), so a second job into
    it stops before Hydra writes its config over the first job's."""

    def __init__(self, lock: bool = False):
        self.lock = lock

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check("hydra.run.dir", Path(config.hydra.run.dir), self.lock)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check("hydra.sweep.dir", Path(config.hydra.sweep.dir), lock=False)  # each job locks its own

    @staticmethod
    def _check(key: str, path: Path, lock: bool) -> None:
        try:
            check_writable_dir(key, path)
            if lock:
                lock_run_dir(path)
        except SaesweepError as error:
            # Hydra turns a callback's exception into a warning and goes on: the process stops here
            sys.exit(f"error: {error}\n  ({type(error).__name__}; nothing was written)")
