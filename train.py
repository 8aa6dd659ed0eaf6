"""Train one SAE per Hydra job: `python train.py`, or a sweep: `python train.py dict_ratio=1,2,4,8 -m`.

A job that raises records the error in `<run dir>/error.json` and its train.log; Hydra's launcher then
runs the remaining jobs and exits non-zero at the end, after which the failed jobs are listed here.
Ctrl-C stops the sweep; the interrupted job leaves checkpoints/last.ckpt, and the command printed then
(this one with its output directory pinned, also in each job's train.log) resumes.
"""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from saesweep.rundir import ERROR_FILE, write_job_error
from saesweep.train import train

_MULTIRUN_FLAGS = ("-m", "--multirun")
_EXIT_INTERRUPTED = 130  # the shell's code for a SIGINT-terminated process
log = logging.getLogger("saesweep.train")
failed_jobs: list[str] = []  # "<run dir>: <error>" of this process's failed jobs (Hydra runs them in-process)
resume_command: str = ""  # this command with its output directory pinned; set when the first job starts


def pinned_command(output_dir_override: str) -> str:
    """The command line that reruns this process into the same output directory, so that every job
    resumes from its checkpoints/last.ckpt (the default directories are named after the start time)."""
    args = [a for a in sys.argv[1:] if not a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    return " ".join(["python", "train.py", *args, output_dir_override])


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    global resume_command
    resume_command = pinned_command(
        f"hydra.sweep.dir={hydra_cfg.sweep.dir}" if multirun else f"hydra.run.dir={run_dir}"
    )
    log.info("to resume this job after a crash or a kill: %s", resume_command)
    try:
        result = train(cfg, run_dir, Path(hydra_cfg.sweep.dir) if multirun else None)
    except Exception as error:
        log.exception("job failed; error recorded in %s", run_dir / ERROR_FILE)
        write_job_error(run_dir, error)
        failed_jobs.append(f"{run_dir}: {type(error).__name__}: {error}")
        raise  # Hydra marks the job failed and goes on with the next one
    return result.metrics["fvu"]


if __name__ == "__main__":
    # Hydra's argparse takes overrides only before `-m`; let users write it anywhere on the line.
    flags = [a for a in sys.argv[1:] if a in _MULTIRUN_FLAGS]
    sys.argv = sys.argv[:1] + flags + [a for a in sys.argv[1:] if a not in _MULTIRUN_FLAGS]
    try:
        main()
    except KeyboardInterrupt as interrupt:
        print(f"\nstopped by Ctrl-C: {interrupt}\nto resume, rerun: {resume_command}", file=sys.stderr)
        sys.exit(_EXIT_INTERRUPTED)
    finally:
        if failed_jobs:
            print(f"\n{len(failed_jobs)} job(s) failed:", *failed_jobs, sep="\n  ", file=sys.stderr)
