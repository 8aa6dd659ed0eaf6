"""Faults a user hits, through the real entry points: scheduler signals, corrupt checkpoints and
shards, two jobs in one run directory, unwritable folders. Each case asserts the exit status, one
message without a traceback, and that nothing finished is lost. The cases that race a slowed-down
training process are `slow` (make test-slow, which CI runs too); bad config values and corpus bytes are
in test_cli_errors.py and test_train.py, steering's in test_steering.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO

# The real Hydra app, each training step slowed down and its number written to STEP_FILE, so that the
# test can signal the job mid-training and know how far it got.
_SLOW_TRAIN_PY = """
import os, runpy, sys, time
from saesweep.training import SaeTrainingModule
step, pause, step_file = SaeTrainingModule.training_step, float(os.environ["STEP_SLEEP_S"]), os.environ["STEP_FILE"]
def slow_step(self, *a):
    time.sleep(pause)
    with open(step_file, "w") as f:
        f.write(str(self.global_step))
    return step(self, *a)
SaeTrainingModule.training_step = slow_step
if "REQUEUE_MARK" in os.environ:  # stands in for submitit's preemption handler: it requeues, then exits
    import signal
    def requeue(signum, frame):
        open(os.environ["REQUEUE_MARK"], "w").write(str(signum))
        sys.exit(0)
    signal.signal(signal.SIGUSR2, requeue)
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""
_STEPS = 32  # ceil(n_tokens 8000 / batch_size 256)
_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "", "PYTHONPATH": str(REPO / "src")}


def _overrides(tiny_model_dir, corpus_path, store_dir, *extra):
    return [
        f"model.path={tiny_model_dir}", "data=jsonl", f"data.path={corpus_path}", "layer=1",
        "ctx_len=16", "n_tokens=8000", "eval.n_tokens=800", "train.batch_size=256",
        "eval.every_n_steps=10", "train.checkpoint_every_n_steps=100", "dict_ratio=2",
        "trainer.enable_progress_bar=false", f"store.dir={store_dir}", "store.shard_tokens=1000",
        "store.buffer_tokens=2048", "logger=none", *extra,
    ]


def _start_slow(args, tmp_path, env=None, step_sleep_s=0.15) -> tuple[subprocess.Popen, Path]:
    step_file = tmp_path / f"step-{time.monotonic_ns()}"
    env = {**(env or _ENV), "STEP_SLEEP_S": str(step_sleep_s), "STEP_FILE": str(step_file)}
    job = subprocess.Popen([sys.executable, "-c", _SLOW_TRAIN_PY, *args], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return job, step_file


def _signal_at_step(job: subprocess.Popen, step_file: Path, step: int, signum: int) -> tuple[int, str]:
    """Send `signum` once the job has begun training step `step`; the step it had begun then, and the console."""
    deadline = time.monotonic() + 240
    while not step_file.is_file() or int(step_file.read_text() or -1) < step:
        assert job.poll() is None, job.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"step {step} not reached in time"
        time.sleep(0.02)
    seen = int(step_file.read_text())
    job.send_signal(signum)
    out, err = job.communicate(timeout=120)
    return seen, out + err


def _train(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env or _ENV, capture_output=True,
                          text=True, timeout=300)


def _checkpoint_step(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


@pytest.mark.slow  # a real process signalled or raced mid-training: make test-slow
def test_sigterm_checkpoints_at_the_step_records_the_resume_command_and_exits_143(tmp_path, tiny_model_dir, corpus_path):
    run_dir = tmp_path / "run"
    args = [*_overrides(tiny_model_dir, corpus_path, tmp_path / "store"), f"hydra.run.dir={run_dir}"]
    job, step_file = _start_slow(args, tmp_path)
    seen, console = _signal_at_step(job, step_file, 5, signal.SIGTERM)

    assert job.returncode == 143, console[-3000:]
    assert "Traceback" not in console, console[-3000:]
    assert "stopped by SIGTERM at step" in console and "to resume: python train.py" in console
    stopped_at = _checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
    assert seen < stopped_at < _STEPS, "the checkpoint is the signal's, not a periodic one (every 100 steps)"
    error = json.loads((run_dir / "error.json").read_text())
    assert error["type"] == "JobStopped" and f"step {stopped_at}" in error["message"]
    assert f"hydra.run.dir={run_dir}" in error["message"]
    assert not (run_dir / "metrics.json").exists()

    resumed = _train(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in resumed.stdout + resumed.stderr
    assert json.loads((run_dir / "cfg.json").read_text())["tokens_trained"] == 8000
    assert not (run_dir / "error.json").exists()


@pytest.mark.slow  # a real process signalled or raced mid-training: make test-slow
def test_sigterm_stops_the_whole_sweep(tmp_path, tiny_model_dir, corpus_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in _overrides(tiny_model_dir, corpus_path, tmp_path / "store") if not o.startswith("dict_ratio")]
    job, step_file = _start_slow([*overrides, "dict_ratio=1,2", "-m", f"hydra.sweep.dir={sweep}"], tmp_path)
    _, console = _signal_at_step(job, step_file, 3, signal.SIGTERM)
    assert job.returncode == 143 and "Traceback" not in console, console[-3000:]
    assert (sweep / "0" / "checkpoints" / "last.ckpt").is_file() and (sweep / "0" / "error.json").is_file()
    assert not (sweep / "1").exists(), "the next job of the sweep did not start"


@pytest.mark.slow  # a real process signalled or raced mid-training: make test-slow
def test_sigusr1_on_slurm_checkpoints_requeues_and_the_requeued_job_resumes(tmp_path, tiny_model_dir, corpus_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {**_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    run_dir = tmp_path / "run"
    args = [*_overrides(tiny_model_dir, corpus_path, tmp_path / "store"), f"hydra.run.dir={run_dir}"]
    job, step_file = _start_slow(args, tmp_path, env=env)
    _, console = _signal_at_step(job, step_file, 4, signal.SIGUSR1)

    assert job.returncode == 128 + signal.SIGUSR1 and "Traceback" not in console, console[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    assert "requeued Slurm job 4242" in (run_dir / "train.log").read_text()
    stopped_at = _checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
    requeued = _train(*args, env=env)  # Slurm reruns the job's command
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in requeued.stdout + requeued.stderr
    assert stopped_at > 4 and json.loads((run_dir / "cfg.json").read_text())["tokens_trained"] == 8000


@pytest.mark.slow  # a real process signalled or raced mid-training: make test-slow
def test_submitits_preemption_signal_checkpoints_first_then_submitit_requeues(tmp_path, tiny_model_dir, corpus_path):
    run_dir, mark = tmp_path / "run", tmp_path / "requeued"
    args = [*_overrides(tiny_model_dir, corpus_path, tmp_path / "store"), f"hydra.run.dir={run_dir}"]
    job, step_file = _start_slow(args, tmp_path, env={**_ENV, "REQUEUE_MARK": str(mark)})
    seen, console = _signal_at_step(job, step_file, 4, signal.SIGUSR2)
    assert mark.read_text() == str(int(signal.SIGUSR2)), console[-3000:]
    assert seen < _checkpoint_step(run_dir / "checkpoints" / "last.ckpt") < _STEPS, "written before the requeue"
    requeued = _train(*args)
    assert requeued.returncode == 0 and "resuming from" in requeued.stdout + requeued.stderr, requeued.stderr[-3000:]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, corpus_path):
    """A run trained to the end, its arguments, and its metrics."""
    tmp = tmp_path_factory.mktemp("finished")
    run_dir = tmp / "run"
    args = [*_overrides(tiny_model_dir, corpus_path, tmp / "store", "train.checkpoint_every_n_steps=8"),
            f"hydra.run.dir={run_dir}"]
    done = _train(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, args, json.loads((run_dir / "metrics.json").read_text())


def _copy_run(finished_run, tmp_path) -> tuple[Path, list[str]]:
    import shutil

    run_dir, args, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy, [a if not a.startswith("hydra.run.dir=") else f"hydra.run.dir={copy}" for a in args]


def test_a_truncated_last_checkpoint_is_moved_aside_and_the_previous_one_resumed(finished_run, tmp_path):
    run_dir, args = _copy_run(finished_run, tmp_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert (run_dir / "checkpoints" / "last.previous.ckpt").is_file(), "the checkpoint last.ckpt replaced is kept"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])

    rerun = _train(*args)
    console = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0 and "Traceback" not in console, console[-3000:]
    assert f"checkpoint {last} cannot be read" in console and "weights_only=False" not in console
    assert f"resuming from {run_dir / 'checkpoints' / 'last.previous.ckpt'}" in console
    assert [p.name.split("-")[0] for p in (run_dir / "checkpoints").glob("last.ckpt.unreadable-*")] == ["last.ckpt.unreadable"]
    assert json.loads((run_dir / "metrics.json").read_text()) == pytest.approx(finished_run[2], rel=1e-5)
    assert not (run_dir / "error.json").exists()


def test_checkpoints_of_random_bytes_are_moved_aside_and_training_starts_over(finished_run, tmp_path):
    run_dir, args = _copy_run(finished_run, tmp_path)
    for name in ("last.ckpt", "last.previous.ckpt"):
        (run_dir / "checkpoints" / name).write_bytes(os.urandom(4096))

    rerun = _train(*args)
    console = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0 and "Traceback" not in console, console[-3000:]
    assert "weights_only=False" not in console and "training starts over" in console
    assert len(list((run_dir / "checkpoints").glob("*.unreadable-*"))) == 2
    assert json.loads((run_dir / "cfg.json").read_text())["tokens_trained"] == 8000


def test_a_refused_rerun_of_a_finished_run_leaves_it_to_the_evaluator(finished_run, tmp_path):
    from saesweep.evaluate import discover_runs

    run_dir, args = _copy_run(finished_run, tmp_path)
    refused = _train(*[a for a in args if not a.startswith("train.batch_size")], "train.batch_size=128")
    console = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "Traceback" not in console, console[-3000:]
    assert "belongs to a job with other settings" in console and "the finished run is kept" in console
    assert not (run_dir / "error.json").exists()
    runs, failed = discover_runs(tmp_path)
    assert [r.name for r in runs] == ["run"] and not failed


@pytest.mark.slow  # a real process signalled or raced mid-training: make test-slow
def test_a_truncated_first_shard_of_a_complete_store_is_reharvested_on_the_next_run(finished_run, tmp_path):
    import shutil

    from saesweep.store import MANIFEST

    run_dir, args, _ = finished_run
    store_dir = tmp_path / "store"
    shutil.copytree(run_dir.parent / "store", store_dir)
    args = [a if not a.startswith("store.dir=") else f"store.dir={store_dir}" for a in args]
    args = [a if not a.startswith("hydra.run.dir=") else f"hydra.run.dir={tmp_path / 'run'}" for a in args]
    (store,) = store_dir.iterdir()
    manifest = json.loads((store / MANIFEST).read_text())
    first, last = store / manifest["shards"][0]["file"], store / manifest["shards"][-1]["file"]
    first.write_bytes(first.read_bytes()[:100])
    untouched = last.stat().st_ino

    failed = _train(*args)
    console = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "Traceback" not in console, console[-3000:]
    assert f"activation shard {first} is corrupt or truncated" in console and "rerun the job to re-harvest it" in console
    rerun = _train(*args)
    console = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, console[-3000:]
    assert f"re-harvesting {first.name}" in console
    assert json.loads((store / MANIFEST).read_text())["shards"] == manifest["shards"]
    assert last.stat().st_ino == untouched, "nothing else of the store was thrown away"


@pytest.mark.slow  # a real process signalled or raced mid-training: make test-slow
def test_a_second_job_into_a_running_jobs_directory_is_refused_naming_the_holder(tmp_path, tiny_model_dir, corpus_path):
    run_dir = tmp_path / "run"
    args = [*_overrides(tiny_model_dir, corpus_path, tmp_path / "store"), f"hydra.run.dir={run_dir}"]
    first, step_file = _start_slow(args, tmp_path, step_sleep_s=0.6)  # 32 steps: far longer than a start-up
    deadline = time.monotonic() + 240
    while not step_file.is_file():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    hydra_config = (run_dir / ".hydra" / "config.yaml").read_text()

    second = _train(*[a for a in args if not a.startswith("dict_ratio")], "dict_ratio=4")
    console = second.stdout + second.stderr
    assert first.poll() is None, "the first job was still running"
    assert second.returncode != 0 and "Traceback" not in console, console[-3000:]
    assert f"run directory {run_dir} is in use by another job (host " in console, console
    assert f"pid {first.pid}, started " in console
    assert (run_dir / ".hydra" / "config.yaml").read_text() == hydra_config, "the second job wrote nothing there"

    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, (out + err)[-3000:]
    assert json.loads((run_dir / "cfg.json").read_text())["dict_ratio"] == 2
    assert not list((run_dir / "checkpoints").glob("last-v*.ckpt")) and not (run_dir / "error.json").exists()


def test_a_lock_left_by_a_dead_job_is_taken_over(finished_run, tmp_path):
    from saesweep.rundir import LOCK_FILE

    run_dir, args = _copy_run(finished_run, tmp_path)
    (run_dir / LOCK_FILE).write_text(json.dumps({"host": "gone", "pid": 999999, "started": "2026-01-01T00:00:00+00:00"}))
    rerun = _train(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((run_dir / LOCK_FILE).read_text())["host"] != "gone", "the new job wrote its name"


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "steer.py"])
def test_an_output_folder_that_cannot_be_written_is_one_line_before_any_work(script, tmp_path):
    args = {"train.py": ["logger=none"], "evaluate.py": [f"sweep_dir={tmp_path}"],
            "steer.py": [f"run_dir={tmp_path}", "feature=0", "prompts=[a]"]}[script]
    proc = subprocess.run([sys.executable, script, *args, "hydra.run.dir=/proc/saesweep-out"], cwd=REPO, env=_ENV,
                          capture_output=True, text=True, timeout=120)
    console = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in console, console[-3000:]
    assert "hydra.run.dir='/proc/saesweep-out' is not writable" in console
    assert len(console.strip().splitlines()) <= 2, console
