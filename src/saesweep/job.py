"""What every training job does around `train_ensemble`, whichever Hydra launcher runs it: log the
command that resumes it, record a failure in each of its run directories, and stop cleanly on a
scheduler's signal (a checkpoint, error.json with the resume command, Slurm's requeue on SIGUSR1).

The Hydra app (train.py) runs one job per call; the ensemble launcher runs all jobs of a sweep in one
call. Both leave here what train.py prints when the process ends.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from saesweep.config import check_distributed, check_jobs
from saesweep.errors import JobStopped, SaesweepError
from saesweep.metrics import EvalResult
from saesweep.rundir import (
    ENSEMBLE_DIR,
    ERROR_FILE,
    RunDirBusyError,
    is_finished,
    locked_run_dirs,
    write_job_error,
)

log = logging.getLogger("saesweep.train")
failed_jobs: list[str] = []  # "<run dir>: <error>" of this process's failed jobs (Hydra runs them in-process)
resume_command: str = ""  # this command with its output directory pinned; set when the first job starts


def pinned_command(output_dir_override: str) -> str:
    """The command line that reruns this process into the same output directory, so that every job
    resumes from its checkpoints/last.ckpt (the default directories are named after the start time)."""
    args = [a for a in sys.argv[1:] if not a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    return " ".join(["python", "train.py", *args, output_dir_override])


class JobError(CompactHydraException):
    """A job stopped by a saesweep error, whose message says everything: Hydra prints only this text
    (no traceback, which is in error.json and train.log; HYDRA_FULL_ERROR=1 shows it as well)."""

    @classmethod
    def of(cls, error: SaesweepError, run_dirs: Sequence[Path], recorded: bool = True) -> JobError:
        where = f"run directory {', '.join(str(d) for d in run_dirs)}"
        if recorded:
            where += f"; traceback in {', '.join(str(Path(d) / ERROR_FILE) for d in run_dirs)} and train.log"
        return cls(f"error: {error}\n  ({type(error).__name__}; {where})")


def _traceback_to_log_files(error: BaseException) -> None:
    """The traceback of `error` into the job's log files only (train.log), not onto the console."""
    record = log.makeRecord(
        log.name, logging.ERROR, __file__, 0, "traceback:", None, (type(error), error, error.__traceback__)
    )
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def run_jobs(
    cfgs: Sequence[DictConfig], run_dirs: Sequence[Path], sweep_dir: Path | None, ensemble_name: str = ENSEMBLE_DIR
) -> list[EvalResult | JobError]:
    """Train the jobs' SAEs (one, or an ensemble checkpointing into `<sweep_dir>/<ensemble_name>`). A failure of all is written to every run
    directory's error.json and raised; a member of an ensemble that failed alone gets its error.json
    and a JobError in its place of the result."""
    global resume_command
    resume_command = pinned_command(
        f"hydra.sweep.dir={sweep_dir}" if sweep_dir is not None else f"hydra.run.dir={run_dirs[0]}"
    )
    try:
        with locked_run_dirs(run_dirs):
            return _run_locked(cfgs, run_dirs, sweep_dir, ensemble_name)
    except RunDirBusyError as busy:  # the directory is the other job's: nothing is written into it
        failed_jobs.extend(f"{run_dir}: {type(busy).__name__}: {busy}" for run_dir in run_dirs)
        raise JobError.of(busy, run_dirs, recorded=False) from None


def _run_locked(
    cfgs: Sequence[DictConfig], run_dirs: Sequence[Path], sweep_dir: Path | None, ensemble_name: str
) -> list[EvalResult | JobError]:
    """The jobs under their run directories' locks: trained, and each failure recorded."""
    log.info("to resume this job after a crash or a kill: %s", resume_command)
    try:
        with _scheduler_signals_stop_the_job():
            check_distributed(cfgs[0], multirun=sweep_dir is not None)
            check_jobs(cfgs)  # first: a bad value is reported in a second or two, not after the imports below
            # Lightning and the LM stack: 4-5 s to import on 2 cores, so imported once the config is known good
            from saesweep.train import train_ensemble

            outcomes = train_ensemble(cfgs, run_dirs, sweep_dir, ensemble_name)
    except JobStopped as stop:
        _stopped(stop, run_dirs)
        raise
    except Exception as error:
        failure = _failed(error, run_dirs)
        if failure is error:
            raise
        raise failure from error
    return [
        outcome if isinstance(outcome, EvalResult) else _failed(outcome, [run_dir])
        for outcome, run_dir in zip(outcomes, run_dirs, strict=True)
    ]


def _record(error: BaseException, run_dirs: Sequence[Path]) -> list[Path]:
    """`error` into error.json of each run directory that holds no finished run (a finished run
    stays the evaluator's); the directories it went to."""
    recorded = [Path(d) for d in run_dirs if not is_finished(Path(d))]
    for run_dir in recorded:
        write_job_error(run_dir, error)
    return recorded


def _failed(error: Exception, run_dirs: Sequence[Path]) -> Exception:
    """Record `error` as the failure of these jobs; what to raise for it (or to return, for one member
    of an ensemble): a JobError for a saesweep error, whose message says everything, else the error.
    A run directory that holds a finished run (a rerun refused, say) keeps it: the failure goes to the
    console and the log only, and the evaluator still finds the run."""
    recorded = _record(error, run_dirs)
    for run_dir in run_dirs:
        failed_jobs.append(f"{run_dir}: {type(error).__name__}: {error}")
    where = ", ".join(str(d / ERROR_FILE) for d in recorded) or "the log only: the finished run is kept"
    if not isinstance(error, SaesweepError):  # a bug: its traceback belongs on the console
        log.error("job failed; error recorded in %s", where, exc_info=error)
        return error
    log.error("job failed with a %s (recorded in %s)", type(error).__name__, where)
    _traceback_to_log_files(error)
    return JobError.of(error, run_dirs, recorded=bool(recorded))


@contextmanager
def _scheduler_signals_stop_the_job() -> Iterator[None]:
    """SIGTERM and SIGUSR1 before or after training (loading, harvesting, the final evaluation) stop the
    job at once: the store keeps its finished shards and the run directory's files are written
    atomically. During training, training.StopOnSignal takes them over to stop at a step boundary."""

    def stop(signum, frame) -> None:
        raise JobStopped(signum, f"stopped by {signal.Signals(signum).name} outside training")

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)


def _stopped(stop: JobStopped, run_dirs: Sequence[Path]) -> None:
    """A job stopped by a signal: the resume command joins its message, which goes to error.json of
    every run directory that holds no finished run; on Slurm, SIGUSR1 also requeues the job."""
    stop.args = (f"{stop.args[0]}; to resume: {resume_command}",)
    _record(stop, run_dirs)
    log.error("%s", stop)
    if stop.signum == signal.SIGUSR1 and "SLURM_JOB_ID" in os.environ:
        _requeue_slurm_job()


def _requeue_slurm_job() -> None:
    """Put this Slurm job back in the queue (what Lightning's SLURMEnvironment does on its requeue
    signal); rerunning its command resumes from the checkpoint just written."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("could not requeue Slurm job %s: %s", job_id, e)
        return
    if done.returncode == 0:
        log.info("requeued Slurm job %s: it resumes from the checkpoint when it starts again", job_id)
    else:
        log.error("scontrol requeue %s failed (%d): %s", job_id, done.returncode, done.stderr.strip())
