"""Sweep isolation: a failing job is recorded and the others run; Ctrl-C stops with a resumable checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from saesweep.evaluate import discover_runs
from saesweep.train import train
from saesweep.training import SaeTrainingModule
from test_resume import _SLOW_TRAIN_PY, _overrides
from test_train import tiny_cfg


def test_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_model_dir, corpus_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in _overrides(tiny_model_dir, corpus_path, tmp_path / "store") if not o.startswith("dict_ratio")]
    proc = subprocess.run(
        [sys.executable, "train.py", *overrides, "dict_ratio=1.01,2", "-m", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    error = json.loads((sweep / "0" / "error.json").read_text())
    assert error["type"] == "ConfigError" and "dict_ratio=1.01 gives a non-integer d_sae" in error["message"]
    assert "check_with_model" in error["traceback"]
    assert "job failed" in (sweep / "0" / "train.log").read_text()
    assert (sweep / "1" / "metrics.json").is_file(), "the job after the failed one ran to the end"
    assert f"1 job(s) failed:\n  {sweep / '0'}: ConfigError: dict_ratio=1.01" in proc.stderr

    runs, failed = discover_runs(sweep)
    assert [r.name for r in runs] == ["1"] and [f.name for f in failed] == ["0"]
    assert failed[0].reason.startswith("job failed: ConfigError: dict_ratio=1.01 gives a non-integer d_sae")


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_that_resumes(tmp_path, tiny_model_dir, corpus_path, monkeypatch):
    cfg = tiny_cfg(tiny_model_dir, corpus_path, tmp_path / "store", *_overrides(tiny_model_dir, corpus_path, tmp_path / "store"))
    step = SaeTrainingModule.training_step

    def step_then_ctrl_c_at_5(self, batch, batch_idx):
        if self.global_step == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(SaeTrainingModule, "training_step", step_then_ctrl_c_at_5)
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 6"):
        train(cfg, tmp_path / "run")
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the handler is given back"

    monkeypatch.setattr(SaeTrainingModule, "training_step", step)
    train(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "cfg.json").read_text())["tokens_trained"] == 8000


def test_sigint_stops_a_multirun_sweep_leaving_a_resumable_checkpoint(tmp_path, tiny_model_dir, corpus_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in _overrides(tiny_model_dir, corpus_path, tmp_path / "store") if not o.startswith("dict_ratio")]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "STEP_SLEEP_S": "0.2"}
    job = subprocess.Popen(
        [sys.executable, "-c", _SLOW_TRAIN_PY, *overrides, "dict_ratio=1,2", "-m", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    last = sweep / "0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.is_file():
        assert job.poll() is None and time.monotonic() < deadline, "job 0 wrote no checkpoint"
        time.sleep(0.05)
    job.send_signal(signal.SIGINT)
    _, stderr = job.communicate(timeout=120)

    assert job.returncode == 130, stderr[-3000:]
    assert "to resume, rerun: python train.py -m " in stderr and f"hydra.sweep.dir={sweep}\n" in stderr
    stopped_at = torch.load(last, weights_only=True)["global_step"]
    assert 4 <= stopped_at < 32 and not (sweep / "0" / "metrics.json").exists()
    assert not (sweep / "1").exists(), "the sweep stopped: job 1 never started"


def test_architectures_and_their_keys_sweep_on_the_command_line(tmp_path, tiny_model_dir, corpus_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in _overrides(tiny_model_dir, corpus_path, tmp_path / "store") if not o.startswith("dict_ratio")]
    proc = subprocess.run(
        [sys.executable, "train.py", *overrides, "sae=topk", "sae.k=4,8", "dict_ratio=1,2", "-m", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = sorted((c["sae"]["k"], c["dict_ratio"]) for c in (json.loads((sweep / j / "cfg.json").read_text()) for j in "0123"))
    assert got == [(4, 1), (4, 2), (8, 1), (8, 2)]
    for job in "0123":
        cfg = json.loads((sweep / job / "cfg.json").read_text())
        assert json.loads((sweep / job / "metrics.json").read_text())["l0"] == pytest.approx(cfg["k"])
    # architectures as a sweep axis
    proc = subprocess.run(
        [sys.executable, "train.py", *overrides, "sae=relu_l1,gated", "-m", f"hydra.sweep.dir={tmp_path / 'axis'}"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = [json.loads((tmp_path / "axis" / j / "cfg.json").read_text())["sae"]["architecture"] for j in "01"]
    assert trained == ["relu_l1", "gated"]
