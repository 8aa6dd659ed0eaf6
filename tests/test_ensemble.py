"""Ensemble training (train.ensemble=true): several dictionaries fed by the same batches in one
process give the run directories that separate jobs would give."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from saesweep.config import check_ensemble, ensemble_groups
from saesweep.errors import ConfigError
from saesweep.train import train, train_ensemble
from test_train import tiny_cfg

RUN_FILES = {"sae_weights.safetensors", "cfg.json", "metrics.json", "feature_stats.safetensors"}


def test_an_ensemble_trains_each_dictionary_as_a_lone_job_would(tmp_path, tiny_model_dir, corpus_path):
    store = tmp_path / "store"
    cfgs = [
        tiny_cfg(tiny_model_dir, corpus_path, store, "dict_ratio=1", "l1_coef=1", "logger=none"),
        tiny_cfg(tiny_model_dir, corpus_path, store, "dict_ratio=2", "l1_coef=3", "logger=none"),
    ]
    together = train_ensemble(cfgs, [tmp_path / "ensemble" / "0", tmp_path / "ensemble" / "1"], tmp_path / "ensemble")
    alone = [train(cfg, tmp_path / "alone" / str(i)) for i, cfg in enumerate(cfgs)]

    for i, (ensemble_result, lone_result) in enumerate(zip(together, alone)):
        run = tmp_path / "ensemble" / str(i)
        assert {p.name for p in run.iterdir()} >= RUN_FILES
        ensemble_weights = load_file(run / "sae_weights.safetensors")
        lone_weights = load_file(tmp_path / "alone" / str(i) / "sae_weights.safetensors")
        assert ensemble_weights["W_dec"].shape == (32 * (i + 1), 32)
        for name, tensor in lone_weights.items():
            # the same gradients and Adam steps; only the summation order of float ops may differ
            torch.testing.assert_close(ensemble_weights[name], tensor, rtol=1e-4, atol=1e-5)
        assert ensemble_result.metrics == pytest.approx(lone_result.metrics, rel=1e-4, abs=1e-6)
        cfg_json = json.loads((run / "cfg.json").read_text())
        assert (cfg_json["d_sae"], cfg_json["l1_coef"], cfg_json["tokens_trained"]) == (32 * (i + 1), [1, 3][i], 8000)

    # each run directory's checkpoint is its own SAE's part: resuming it as a lone job finds training
    # done and re-evaluates to the same metrics
    resumed = train(cfgs[1], tmp_path / "ensemble" / "1")
    assert resumed.metrics == pytest.approx(together[1].metrics, rel=1e-6)


def test_ensemble_members_may_differ_only_in_their_dictionary(tmp_path, tiny_model_dir, corpus_path):
    base = tiny_cfg(tiny_model_dir, corpus_path, tmp_path, "dict_ratio=1")
    check_ensemble([base, tiny_cfg(tiny_model_dir, corpus_path, tmp_path, "dict_ratio=4", "l1_coef=0.5")])
    # the recipe is the dictionary's own (sae.recipe): members may train at their own learning rates
    check_ensemble([base, tiny_cfg(tiny_model_dir, corpus_path, tmp_path, "sae.recipe.lr=0.01")])
    other_batch = tiny_cfg(tiny_model_dir, corpus_path, tmp_path, "dict_ratio=2", "train.batch_size=128")
    with pytest.raises(ConfigError, match=r"also differ in: train\.batch_size\b"):
        check_ensemble([base, other_batch])
    # a sweep's jobs go into one ensemble per setting of the other keys, in order of first appearance
    other_seed = tiny_cfg(tiny_model_dir, corpus_path, tmp_path, "dict_ratio=2", "seed=1")
    assert ensemble_groups([base, other_batch, other_seed, base, other_seed]) == [[0, 3], [1], [2, 4]]


def test_train_ensemble_true_on_the_command_line_trains_the_sweep_in_one_pass(tmp_path, tiny_model_dir, corpus_path):
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, "train.py", f"model.path={tiny_model_dir}", "data=jsonl", f"data.path={corpus_path}",
        "layer=1", "ctx_len=16", "n_tokens=8000", "eval.n_tokens=800", "train.batch_size=256",
        "trainer.enable_progress_bar=false", f"store.dir={tmp_path / 'store'}", "store.shard_tokens=1000",
        "dict_ratio=1,2", "seed=0,1", "train.ensemble=true", f"hydra.sweep.dir={sweep}",
    ]
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    runs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1", "2", "3"]
    logs = [(run / "train.log").read_text() for run in runs]
    # one harvest, by the first ensemble (seed 0: jobs 0 and 2); the second reuses it
    assert ["activation store harvested" in text for text in logs] == [True, False, True, False]
    assert ["activation store reused" in text for text in logs] == [False, True, False, True]
    assert all("Training 4 jobs" not in text for text in logs)  # the launcher's lines stay out
    # seed=0,1 splits the sweep into two ensembles (jobs 0, 2 and 1, 3), each with its own checkpoint
    assert sorted(p.name for p in sweep.glob(".ensemble*")) == [".ensemble-0", ".ensemble-1"]
    assert "ensemble .ensemble-1: jobs 1, 3" in logs[1] and "jobs 1, 3" not in logs[0]
    shapes = []
    for run in runs:
        assert {p.name for p in run.iterdir()} >= RUN_FILES and (run / "checkpoints" / "last.ckpt").is_file()
        assert (run / ".hydra" / "overrides.yaml").is_file()
        wandb_runs = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(wandb_runs) == 1 and wandb_runs[0].stat().st_size > 0
        cfg_json = json.loads((run / "cfg.json").read_text())
        shapes.append((cfg_json["dict_ratio"], cfg_json["seed"], cfg_json["d_sae"]))
    assert shapes == [(1, 0, 32), (1, 1, 32), (2, 0, 64), (2, 1, 64)]
    first = json.loads((runs[2] / "metrics.json").read_text())

    # rerunning the same command resumes the finished ensemble: nothing is trained again
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in (runs[0] / "train.log").read_text()
    assert json.loads((runs[2] / "metrics.json").read_text()) == pytest.approx(first, rel=1e-6)


def test_ensemble_flag_with_another_launcher_is_refused(tmp_path):
    done = subprocess.run(
        [sys.executable, "train.py", "train.ensemble=true", "hydra/launcher=submitit_local"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0 and "cannot run under hydra/launcher=submitit_local" in done.stderr


def test_a_member_that_diverges_leaves_the_ensemble_and_the_others_finish(tmp_path, tiny_model_dir, corpus_path):
    """l1_coef=1e39 is inf in float32: that dictionary's loss is never finite, so after
    train.max_bad_steps steps it leaves the ensemble; its job fails alone."""
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, "train.py", f"model.path={tiny_model_dir}", "data=jsonl", f"data.path={corpus_path}",
        "layer=1", "ctx_len=16", "n_tokens=8000", "eval.n_tokens=800", "train.batch_size=256", "logger=none",
        "trainer.enable_progress_bar=false", f"store.dir={tmp_path / 'store'}", "train.max_bad_steps=3",
        "train.checkpoint_every_n_steps=2", "l1_coef=1,1e39", "train.ensemble=true", f"hydra.sweep.dir={sweep}",
    ]
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": ""}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    console = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in console, console[-3000:]
    assert f"1 job(s) failed:\n  {sweep / '1'}: TrainingDivergedError: 3 consecutive steps" in console
    good, bad = sweep / "0", sweep / "1"
    assert {p.name for p in good.iterdir()} >= RUN_FILES
    assert json.loads((good / "cfg.json").read_text())["tokens_trained"] == 8000
    error = json.loads((bad / "error.json").read_text())
    assert error["type"] == "TrainingDivergedError" and "had NaN/Inf loss" in error["message"]
    assert not (bad / "sae_weights.safetensors").exists()
    # its last good checkpoint stays: its own part of the ensemble's, weights untouched by the bad steps
    state = torch.load(bad / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for k, v in state.items() if k.startswith("saes.0."))


def test_an_ensemble_of_different_architectures_and_recipes_trains_each_as_a_lone_job_would(
    tmp_path, tiny_model_dir, corpus_path
):
    store = tmp_path / "store"
    cfgs = [
        # a clip small enough to act on every step: it must act on each member alone; each member has its
        # own learning rate, schedule and clip (its sae.recipe)
        tiny_cfg(tiny_model_dir, corpus_path, store, "logger=none", "sae=topk", "sae.k=8", "sae.recipe.grad_clip_norm=0.1",
                 "sae.recipe.lr=0.01", "sae.recipe.lr_warmup_steps=0"),
        tiny_cfg(tiny_model_dir, corpus_path, store, "logger=none", "sae=jumprelu", "dict_ratio=1",
                 "sae.recipe.grad_clip_norm=null", "sae.recipe.lr_decay_fraction=0.5"),
        tiny_cfg(tiny_model_dir, corpus_path, store, "logger=none", "sae=batchtopk", "sae.k=4",
                 "sae.recipe.grad_clip_norm=0.1"),
    ]
    together = train_ensemble(cfgs, [tmp_path / "ensemble" / str(i) for i in range(3)], tmp_path / "ensemble")
    for i, cfg in enumerate(cfgs):
        alone = train(cfg, tmp_path / "alone" / str(i))
        ensemble_weights = load_file(tmp_path / "ensemble" / str(i) / "sae_weights.safetensors")
        for name, tensor in load_file(tmp_path / "alone" / str(i) / "sae_weights.safetensors").items():
            torch.testing.assert_close(ensemble_weights[name], tensor, rtol=1e-4, atol=1e-5)
        assert together[i].metrics == pytest.approx(alone.metrics, rel=1e-4, abs=1e-6)
    # each member's checkpoint (cut by its own parameter count: jumprelu has five) resumes as a lone job
    resumed = train(cfgs[1], tmp_path / "ensemble" / "1")
    assert resumed.metrics == pytest.approx(together[1].metrics, rel=1e-6)
