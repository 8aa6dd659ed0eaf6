"""What every training job does around `train_ensemble`, whichever Hydra launcher runs it: log the
command that resumes it, and record a failure in each of its run directories.

The Hydra app (train.py) runs one job per call; the ensemble launcher runs all jobs of a sweep in one
call. Both leave here what train.py prints when the process ends.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from saesweep.config import check_distributed
from saesweep.metrics import EvalResult
from saesweep.rundir import ERROR_FILE, write_job_error
from saesweep.train import train_ensemble

log = logging.getLogger("saesweep.train")
failed_jobs: list[str] = []  # "<run dir>: <error>" of this process's failed jobs (Hydra runs them in-process)
resume_command: str = ""  # this command with its output directory pinned; set when the first job starts


def pinned_command(output_dir_override: str) -> str:
    """The command line that reruns this process into the same output directory, so that every job
    resumes from its checkpoints/last.ckpt (the default directories are named after the start time)."""
    args = [a for a in sys.argv[1:] if not a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    return " ".join(["python", "train.py", *args, output_dir_override])


def run_jobs(
    cfgs: Sequence[DictConfig], run_dirs: Sequence[Path], sweep_dir: Path | None
) -> list[EvalResult]:
    """Train the jobs' SAEs (one, or an ensemble); a failure is written to every run directory's
    error.json and re-raised."""
    global resume_command
    resume_command = pinned_command(
        f"hydra.sweep.dir={sweep_dir}" if sweep_dir is not None else f"hydra.run.dir={run_dirs[0]}"
    )
    log.info("to resume this job after a crash or a kill: %s", resume_command)
    try:
        check_distributed(cfgs[0], multirun=sweep_dir is not None)
        return train_ensemble(cfgs, run_dirs, sweep_dir)
    except Exception as error:
        log.exception("job failed; error recorded in %s", ", ".join(str(Path(d) / ERROR_FILE) for d in run_dirs))
        for run_dir in run_dirs:
            write_job_error(Path(run_dir), error)
            failed_jobs.append(f"{run_dir}: {type(error).__name__}: {error}")
        raise
