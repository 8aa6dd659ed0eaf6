"""A Hydra launcher that trains all jobs of a sweep in one process, in one pass over the activations:
`python train.py dict_ratio=1,2,4,8 l1_coef=1,2 train.ensemble=true` (or `hydra/launcher=ensemble -m`).

Each job still gets its own run directory, with Hydra's .hydra/ files and train.log, to the same
contract as a job of the basic launcher; only the training is shared (saesweep.train.train_ensemble).
Hydra finds launchers only in the `hydra_plugins` namespace package, hence this module's place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


def _job_directory(cfg: DictConfig) -> Path:
    """The task run for each job by Hydra's run_job: it makes the job's directory, .hydra/ and
    train.log; the training itself happens later, for all jobs together."""
    return Path(HydraConfig.get().runtime.output_dir)


class EnsembleLauncher(Launcher):
    def __init__(self) -> None:
        super().__init__()
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # train.py's task function trains one job; this launcher calls saesweep's job runner instead
        self.config = config
        self.hydra_context = hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from saesweep import job  # imported late: Hydra imports every plugin module at start-up

        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Training %d jobs as one ensemble", len(job_overrides))
        prepared: list[JobReturn] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            ret = run_job(
                hydra_context=self.hydra_context,
                task_function=_job_directory,
                config=sweep_config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
            prepared.append(ret)
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)  # run_job switched it
        run_dirs = [ret.return_value for ret in prepared]

        # the ensemble's log goes to every job's train.log
        configure_log(prepared[0].hydra_cfg.hydra.job_logging, self.config.hydra.verbose)
        root = logging.getLogger()
        first_file = next(h for h in root.handlers if isinstance(h, logging.FileHandler))
        extra = [logging.FileHandler(run_dir / Path(first_file.baseFilename).name) for run_dir in run_dirs[1:]]
        for handler in extra:
            handler.setFormatter(first_file.formatter)
            root.addHandler(handler)
        try:
            results = job.run_jobs([ret.cfg for ret in prepared], run_dirs, sweep_dir)
            outcomes = [
                (JobStatus.FAILED, result) if isinstance(result, Exception) else (JobStatus.COMPLETED, result.metrics["fvu"])
                for result in results
            ]
        except Exception as error:  # every job of the ensemble failed with it; Hydra raises it at the end
            outcomes = [(JobStatus.FAILED, error)] * len(prepared)
        finally:
            for handler in extra:
                root.removeHandler(handler)
                handler.close()
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        for ret, (status, value) in zip(prepared, outcomes):
            ret.status, ret.return_value = status, value
        return prepared
