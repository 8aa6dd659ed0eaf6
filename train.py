"""Train one SAE per Hydra job: `python train.py`, or a sweep: `python train.py dict_ratio=1,2,4,8 -m`.

A job that raises records the error in `<run dir>/error.json` and its train.log; Hydra's launcher then
runs the remaining jobs and exits non-zero at the end, after which the failed jobs are listed here.
Ctrl-C, or a scheduler's SIGTERM or SIGUSR1, stops the sweep; the stopped job leaves checkpoints/last.ckpt
at the step it stopped, and the command printed then (this one with its output directory pinned, also in
each job's train.log and, for a signal, its error.json) resumes. The exit status is the shell's for
the signal: 130 for Ctrl-C, 143 for SIGTERM, 138 for SIGUSR1 (after which a Slurm job is requeued).
`train.ensemble=true` runs the sweep's jobs under the ensemble launcher
(src/hydra_plugins/saesweep_launcher/), which trains all their dictionaries in one pass.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from saesweep import job
from saesweep.console import quiet_third_party
from saesweep.errors import ConfigError, JobStopped

quiet_third_party()  # known third-party console noise off (SAESWEEP_VERBOSE=1 shows it)

_MULTIRUN_FLAGS = ("-m", "--multirun")
_ENSEMBLE_FLAG = "train.ensemble=true"
# config groups that config.yaml's defaults list holds as null: `+group=x` (Hydra's "append") would collide
# with that entry, so it is taken as `group=x`, the override that works
_NULL_DEFAULT_GROUPS = ("eval_sets", "hparams_search", "experiment")
_EXIT_INTERRUPTED = 130  # the shell's code for a SIGINT-terminated process


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if cfg.train.ensemble:
        raise job.JobError.of(ConfigError(
            f"train.ensemble=true needs the ensemble launcher, which only the command line turns on: "
            f"python train.py ... {_ENSEMBLE_FLAG} (this job ran under {hydra_cfg.runtime.choices.get('hydra/launcher')})"
        ), [run_dir], recorded=False)
    (result,) = job.run_jobs([cfg], [run_dir], Path(hydra_cfg.sweep.dir) if multirun else None)
    if isinstance(result, Exception):
        raise result
    return result.metrics["fvu"]


def command_line(args: list[str]) -> list[str]:
    """Hydra's arguments for what the user typed: `-m` anywhere on the line (Hydra's argparse takes
    overrides only before it), `train.ensemble=true` as a sweep under the ensemble launcher, and
    `+hparams_search=...`/`+experiment=...` as the overrides of their null defaults."""
    args = [a[1:] if a.startswith(tuple(f"+{group}=" for group in _NULL_DEFAULT_GROUPS)) else a for a in args]
    if any(a.lower() == _ENSEMBLE_FLAG for a in args):
        launchers = [a for a in args if a.startswith("hydra/launcher=")]
        if launchers and launchers != ["hydra/launcher=ensemble"]:
            sys.exit(f"error: {_ENSEMBLE_FLAG} trains every job of the sweep in this process; it cannot run "
                     f"under {launchers[0]} (drop one of the two)")
        args = [*args, "-m", *([] if launchers else ["hydra/launcher=ensemble"])]
    flags = [a for a in args if a in _MULTIRUN_FLAGS][:1]
    return flags + [a for a in args if a not in _MULTIRUN_FLAGS]


if __name__ == "__main__":
    sys.argv = sys.argv[:1] + command_line(sys.argv[1:])
    try:
        main()
    except KeyboardInterrupt as interrupt:
        print(f"\nstopped by Ctrl-C: {interrupt}\nto resume, rerun: {job.resume_command}", file=sys.stderr)
        sys.exit(_EXIT_INTERRUPTED)
    except JobStopped as stop:
        print(f"\n{stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    finally:
        if job.failed_jobs and set(_MULTIRUN_FLAGS) & set(sys.argv):  # a lone job's error was printed above
            print(f"\n{len(job.failed_jobs)} job(s) failed:", *job.failed_jobs, sep="\n  ", file=sys.stderr)
