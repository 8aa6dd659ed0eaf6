"""A Hydra launcher that trains all jobs of a sweep in one process, in one pass over the activations:
`python train.py dict_ratio=1,2,4,8 l1_coef=1,2 train.ensemble=true` (or `hydra/launcher=ensemble -m`).
Jobs that differ in more than the dictionary's keys (e.g. `seed=0,1`) train as one ensemble each.

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
        # imported late: Hydra imports every plugin module at start-up
        from saesweep.config import ensemble_groups
        from saesweep.rundir import ENSEMBLE_DIR

        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Training %d jobs in ensembles (jobs differing only in the dictionary's keys train together)", len(job_overrides))
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
        groups = ensemble_groups([ret.cfg for ret in prepared])
        for indices in groups:
            members = [prepared[i] for i in indices]
            # each ensemble its own shared checkpoint, named after its first job, so that each resumes
            name = ENSEMBLE_DIR if len(groups) == 1 else f"{ENSEMBLE_DIR}-{members[0].return_value.name}"
            self._train(members, sweep_dir, name)
        return prepared

    def _train(self, members: list[JobReturn], sweep_dir: Path, ensemble_name: str) -> None:
        """Train one ensemble, its log in each of its jobs' train.log; set each job's status and result
        (a failure of the whole ensemble is every member's)."""
        from saesweep import job
        from saesweep.rundir import ENSEMBLE_DIR

        assert self.config is not None
        run_dirs = [ret.return_value for ret in members]
        configure_log(members[0].hydra_cfg.hydra.job_logging, self.config.hydra.verbose)
        root = logging.getLogger()
        first_file = next(h for h in root.handlers if isinstance(h, logging.FileHandler))
        extra = [logging.FileHandler(run_dir / Path(first_file.baseFilename).name) for run_dir in run_dirs[1:]]
        for handler in extra:
            handler.setFormatter(first_file.formatter)
            root.addHandler(handler)
        if ensemble_name != ENSEMBLE_DIR:
            log.info("ensemble %s: jobs %s", ensemble_name, ", ".join(d.name for d in run_dirs))
        try:
            results = job.run_jobs([ret.cfg for ret in members], run_dirs, sweep_dir, ensemble_name)
            outcomes = [
                (JobStatus.FAILED, result) if isinstance(result, Exception) else (JobStatus.COMPLETED, result.metrics["fvu"])
                for result in results
            ]
        except Exception as error:  # every job of the ensemble failed with it; Hydra raises it at the end
            outcomes = [(JobStatus.FAILED, error)] * len(members)
        finally:
            for handler in extra:
                root.removeHandler(handler)
                handler.close()
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        for ret, (status, value) in zip(members, outcomes):
            ret.status, ret.return_value = status, value
