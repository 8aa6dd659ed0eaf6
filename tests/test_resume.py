"""Resume after a kill: a job killed with SIGKILL and started again with the same command continues
from checkpoints/last.ckpt and ends where an uninterrupted job of the same seed ends."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from saesweep.errors import CheckpointError
from saesweep.train import train
from test_train import tiny_cfg

# The real Hydra app, with each training step slowed down so that the test can kill it mid-training.
_SLOW_TRAIN_PY = """
import os, runpy, sys, time
from saesweep.training import SaeTrainingModule
step, pause = SaeTrainingModule.training_step, float(os.environ["STEP_SLEEP_S"])
SaeTrainingModule.training_step = lambda self, *a: (time.sleep(pause), step(self, *a))[1]
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""
_STEPS = 32  # ceil(n_tokens 8000 / batch_size 256)


def _overrides(tiny_model_dir, corpus_path, store_dir):
    return [
        f"model.path={tiny_model_dir}", "data=jsonl", f"data.path={corpus_path}", "layer=1",
        "ctx_len=16", "n_tokens=8000", "eval.n_tokens=800", "train.batch_size=256",
        "eval.every_n_steps=10", "train.checkpoint_every_n_steps=4", "dict_ratio=2",
        "trainer.enable_progress_bar=false", f"store.dir={store_dir}", "store.shard_tokens=1000",
        "store.buffer_tokens=2048", "logger=none",
    ]


def _start(overrides, run_dir, step_sleep_s, dir_key="hydra.run.dir"):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "STEP_SLEEP_S": str(step_sleep_s)}
    return subprocess.Popen(
        [sys.executable, "-c", _SLOW_TRAIN_PY, *overrides, f"{dir_key}={run_dir}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _kill_after_checkpoint(job, last, step: int) -> int:
    """SIGKILL `job` once `last` holds a checkpoint at `step` or later; the step it holds then."""
    deadline = time.monotonic() + 240
    while _checkpoint_step(last) < step:
        assert job.poll() is None, job.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"no checkpoint at step ≥ {step} in time"
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    return _checkpoint_step(last)


def _checkpoint_step(path) -> int:
    try:  # written atomically, so a file that exists is complete
        return torch.load(path, weights_only=True)["global_step"]
    except FileNotFoundError:
        return -1


def test_sigkilled_job_resumes_to_the_same_result_as_an_uninterrupted_one(tmp_path, tiny_model_dir, corpus_path):
    assert_resume_is_bit_identical(tmp_path, _overrides(tiny_model_dir, corpus_path, tmp_path / "store"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "architecture", [["sae=topk", "sae.k=8"], ["sae=batchtopk", "sae.k=8"], ["sae=jumprelu"],
                     ["sae=matryoshka_batchtopk", "sae.k=8"], ["sae=gated"]],
)
def test_every_architecture_resumes_bit_identically(tmp_path, tiny_model_dir, corpus_path, architecture):
    assert_resume_is_bit_identical(tmp_path, [*_overrides(tiny_model_dir, corpus_path, tmp_path / "store"), *architecture])


@pytest.mark.slow
def test_a_target_l0_run_resumes_bit_identically(tmp_path, tiny_model_dir, corpus_path):
    """The controller's coefficient, last L0 and slope come back from the checkpoint: killed after step 12,
    past its adjustment at step 10, the run ends with the uninterrupted one's coefficient and bits."""
    overrides = [*_overrides(tiny_model_dir, corpus_path, tmp_path / "store"), "sae=jumprelu", "sae.target_l0=6",
                 "sae.recipe.lr_warmup_steps=1"]
    assert_resume_is_bit_identical(tmp_path, overrides, kill_after_step=12)


@pytest.mark.slow
def test_a_synthetic_run_resumes_bit_identically(tmp_path):
    """data=synthetic: the generated store is reused by the killed job's rerun, and the resumed run ends
    with the uninterrupted one's bits."""
    overrides = [
        "data=synthetic", "data.d_in=16", "data.n_features=48", "data.mean_active=4", "n_tokens=8000",
        "eval.n_tokens=800", "ctx_len=25", "train.batch_size=256", "eval.every_n_steps=10",
        "train.checkpoint_every_n_steps=4", "dict_ratio=2", "trainer.enable_progress_bar=false",
        f"store.dir={tmp_path / 'store'}", "store.shard_tokens=1000", "store.buffer_tokens=2048", "logger=none",
    ]
    assert_resume_is_bit_identical(tmp_path, overrides)


def assert_resume_is_bit_identical(tmp_path, overrides: list[str], kill_after_step: int = 8) -> None:
    """The job killed with SIGKILL after its checkpoint at `kill_after_step` and started again with the same
    command ends with the same bits as an uninterrupted one."""
    reference = tmp_path / "uninterrupted"
    done = _start(overrides, reference, step_sleep_s=0)
    output, _ = done.communicate(timeout=300)
    assert done.returncode == 0, output[-3000:]  # also harvests the store the killed job then reuses

    run_dir = tmp_path / "killed"
    last = run_dir / "checkpoints" / "last.ckpt"
    killed_at = _kill_after_checkpoint(_start(overrides, run_dir, step_sleep_s=0.15), last, kill_after_step)
    assert kill_after_step <= killed_at < _STEPS and not (run_dir / "metrics.json").exists()

    rerun = _start(overrides, run_dir, step_sleep_s=0)  # the same command again
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output[-3000:]
    assert "resuming from" in (run_dir / "train.log").read_text()
    assert _checkpoint_step(last) == _STEPS

    # Bit-identical: the stream replays the killed epoch from (seed, epoch) and skips the consumed
    # batches, the optimizer/scheduler/step and the dead-feature counts come from the checkpoint, and
    # CPU float ops of the same shapes in the same order give the same bits.
    resumed_weights, reference_weights = load_file(run_dir / "sae_weights.safetensors"), load_file(reference / "sae_weights.safetensors")
    assert resumed_weights.keys() == reference_weights.keys()
    for name, tensor in reference_weights.items():
        assert torch.equal(resumed_weights[name], tensor), name
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())
    resumed_cfg, reference_cfg = (json.loads((d / "cfg.json").read_text()) for d in (run_dir, reference))
    assert resumed_cfg["tokens_trained"] == 8000 and resumed_cfg["sae"] == reference_cfg["sae"]


@pytest.mark.slow
def test_sigkilled_ensemble_resumes_to_the_same_result_as_an_uninterrupted_one(tmp_path, tiny_model_dir, corpus_path):
    overrides = [
        *(o for o in _overrides(tiny_model_dir, corpus_path, tmp_path / "store") if not o.startswith("dict_ratio=")),
        "dict_ratio=1,2", "train.ensemble=true",
    ]
    reference = tmp_path / "uninterrupted"
    done = _start(overrides, reference, step_sleep_s=0, dir_key="hydra.sweep.dir")
    output, _ = done.communicate(timeout=300)
    assert done.returncode == 0, output[-3000:]

    sweep = tmp_path / "killed"
    last = sweep / ".ensemble" / "checkpoints" / "last.ckpt"
    killed_at = _kill_after_checkpoint(_start(overrides, sweep, 0.15, "hydra.sweep.dir"), last, 8)
    assert 8 <= killed_at < _STEPS and not (sweep / "0" / "metrics.json").exists()
    rerun = _start(overrides, sweep, step_sleep_s=0, dir_key="hydra.sweep.dir")  # the same command again
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output[-3000:]
    assert "resuming from" in (sweep / "0" / "train.log").read_text()

    for job in ("0", "1"):  # bit-identical, as for a lone job
        resumed, uninterrupted = load_file(sweep / job / "sae_weights.safetensors"), load_file(reference / job / "sae_weights.safetensors")
        assert resumed.keys() == uninterrupted.keys()
        for name, tensor in uninterrupted.items():
            assert torch.equal(resumed[name], tensor), (job, name)
        assert _checkpoint_step(sweep / job / "checkpoints" / "last.ckpt") == _STEPS


def test_a_checkpoint_write_that_fails_leaves_the_previous_checkpoint_intact(tmp_path):
    from saesweep.checkpoints import AtomicCheckpointIO

    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint_io = AtomicCheckpointIO()
    checkpoint_io.save_checkpoint({"global_step": 4, "w": torch.ones(3)}, path)
    with pytest.raises((AttributeError, pickle.PicklingError), match="lambda"):
        checkpoint_io.save_checkpoint({"global_step": 8, "w": lambda: None}, path)  # a lambda cannot be pickled
    assert torch.load(path, weights_only=True)["global_step"] == 4
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_resuming_with_other_settings_is_a_clear_error(tmp_path, tiny_model_dir, corpus_path):
    store = tmp_path / "store"
    train(tiny_cfg(tiny_model_dir, corpus_path, store, "logger=none"), tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"other settings \(seed: 0 then, 1 now\); rerun with the original"):
        train(tiny_cfg(tiny_model_dir, corpus_path, store, "logger=none", "seed=1"), tmp_path / "run")
