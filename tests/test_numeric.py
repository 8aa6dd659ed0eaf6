"""Numeric faults: a step with NaN/Inf activations is skipped and counted; K in a row stop the job."""

import csv
import json
import logging
import signal

import pytest
import torch
from safetensors.torch import load_file

from saesweep.errors import TrainingDivergedError
from saesweep.train import train
from saesweep.training import SaeTrainingModule
from test_train import tiny_cfg


def corrupt_batches_at(monkeypatch, bad_batches: set[int], value: float) -> None:
    step = SaeTrainingModule.training_step

    def corrupted(self, batch, batch_idx):
        if batch_idx in bad_batches:
            batch = batch.clone()
            batch[3, 5] = value
        return step(self, batch, batch_idx)

    monkeypatch.setattr(SaeTrainingModule, "training_step", corrupted)


def test_bad_steps_are_skipped_logged_and_training_finishes(tmp_path, tiny_model_dir, corpus_path, monkeypatch, caplog):
    corrupt_batches_at(monkeypatch, {3, 4, 20}, float("nan"))
    cfg = tiny_cfg(tiny_model_dir, corpus_path, tmp_path / "store", "logger=csv", "trainer.log_every_n_steps=1")
    with caplog.at_level(logging.WARNING, logger="saesweep.training"):
        train(cfg, tmp_path)
    weights = load_file(tmp_path / "sae_weights.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    (metrics_csv,) = tmp_path.glob("**/metrics.csv")
    skipped = [float(r["train/skipped_steps"]) for r in csv.DictReader(metrics_csv.open()) if r.get("train/skipped_steps")]
    assert max(skipped) == 3 and skipped[:3] == [0, 0, 0]
    assert "step 3 skipped: NaN/Inf in the activations (1 in a row)" in caplog.text
    assert "step 4 skipped: NaN/Inf in the activations (2 in a row)" in caplog.text
    assert json.loads((tmp_path / "cfg.json").read_text())["tokens_trained"] == 8000 - 3 * 256


def test_k_consecutive_bad_steps_stop_the_job_naming_step_and_checkpoint(tmp_path, tiny_model_dir, corpus_path, monkeypatch):
    corrupt_batches_at(monkeypatch, set(range(9, 100)), float("inf"))
    cfg = tiny_cfg(
        tiny_model_dir, corpus_path, tmp_path / "store", "logger=none", "train.max_bad_steps=3",
        "train.checkpoint_every_n_steps=4",
    )
    with pytest.raises(TrainingDivergedError, match=r"3 consecutive steps up to step 11 had NaN/Inf activations") as e:
        train(cfg, tmp_path)
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / 'last.ckpt'}" in str(e.value)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "a failed job gives Ctrl-C back"
