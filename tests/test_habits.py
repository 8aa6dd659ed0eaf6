"""The habits a new user meets in the first hour: make install keeps their torch, make clean keeps their
results, make reproduce leaves the tracked REPRODUCTION.md alone unless asked, W&B runs say their setting
and log the learning rate, the console carries no known third-party noise, and the documented
`+hparams_search=l1_optuna` works."""

from __future__ import annotations

import csv
import logging
import shutil
import subprocess
import sys
import warnings

import pytest
from omegaconf import OmegaConf

from conftest import REPO
from saesweep import console
from saesweep.run_description import run_name
from saesweep.train import train
from test_train import tiny_cfg

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def make_dry_run(*args: str) -> str:
    done = subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@needs_make
def test_make_install_with_torch_skip_keeps_the_users_torch():
    pinned = make_dry_run("install", "PYTHON=python")
    assert "-c constraints.txt torch" in pinned
    kept = make_dry_run("install", "TORCH=skip", "PYTHON=python")
    assert "constraints.txt" not in kept and "install -q -c" not in kept
    assert "import torch" in kept and 'pip install -q -e ".[dev,slurm,optuna]"' in kept


@needs_make
def test_make_clean_removes_caches_and_keeps_results(tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy(REPO / "Makefile", clone / "Makefile")
    results = [clone / "multirun" / "quickstart" / "2026-01-01_00-00-00" / "0" / "metrics.json",
               clone / "outputs" / "2026-01-01" / "00-00-00" / "cfg.json"]
    caches = [clone / ".pytest_cache" / "v" / "x", clone / "src" / "pkg" / "__pycache__" / "m.pyc",
              clone / "src" / "saesweep.egg-info" / "PKG-INFO", clone / ".ruff_cache" / "x"]
    for path in results + caches:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    done = subprocess.run(["make", "-s", "clean"], cwd=clone, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert all(path.is_file() for path in results), "results are the user's"
    assert not any(path.exists() for path in caches)


@needs_make
def test_make_reproduce_updates_the_tracked_reproduction_only_when_asked():
    def reproduction_outputs(text: str) -> list[str]:
        return [line for line in text.splitlines() if "saesweep.reproduction" in line]

    (into_sweep,) = reproduction_outputs(make_dry_run("reproduce", "PYTHON=python"))
    assert "--out multirun/seed_reference/" in into_sweep and into_sweep.split("--out ")[1].split()[0].endswith("/REPRODUCTION.md")
    both = reproduction_outputs(make_dry_run("reproduce", "PYTHON=python", "UPDATE_DOCS=1"))
    assert len(both) == 2 and "--out" not in both[1]  # the second writes the tracked REPRODUCTION.md


@pytest.mark.parametrize(("overrides", "name"), [
    ({"sae": {"architecture": "topk", "k": 32}, "dict_ratio": 4, "seed": 0}, "topk-k32-x4-s0"),
    ({"sae": {"architecture": "relu_l1", "l1_coef": 2.0}, "dict_ratio": 8, "seed": 1}, "relu_l1-l1=2-x8-s1"),
    ({"sae": {"architecture": "jumprelu", "l0_coef": 0.7}, "dict_ratio": 0.5, "seed": 0}, "jumprelu-l0=0.7-x0.5-s0"),
    ({"sae": {"architecture": "matryoshka_batchtopk", "k": 16}, "dict_ratio": 2, "seed": 3},
     "matryoshka_batchtopk-k16-x2-s3"),
])
def test_wandb_run_names_say_the_setting(overrides, name):
    assert run_name(OmegaConf.create(overrides)) == name


def test_the_learning_rate_is_logged_every_logged_step(tmp_path, tiny_model_dir, corpus_path):
    cfg = tiny_cfg(tiny_model_dir, corpus_path, tmp_path / "store", "logger=csv", "trainer.log_every_n_steps=1",
                   "sae.recipe.lr=0.001", "sae.recipe.lr_warmup_steps=4")
    train(cfg, tmp_path / "run")
    (metrics_csv,) = (tmp_path / "run").glob("**/metrics.csv")
    lrs = [float(row["train/lr"]) for row in csv.DictReader(metrics_csv.open()) if row.get("train/lr")]
    assert len(lrs) == 32  # every step: 8000 tokens in batches of 256
    assert lrs[:4] == pytest.approx([0.00025, 0.0005, 0.00075, 0.001])  # the warm-up
    assert max(lrs) == pytest.approx(0.001) and lrs[-1] < lrs[len(lrs) // 2]  # then the decay


def test_known_third_party_noise_is_filtered_unless_verbose(monkeypatch):
    monkeypatch.delenv("SAESWEEP_VERBOSE", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    tip = logging.LogRecord("lightning.pytorch.utilities.rank_zero", logging.INFO, __file__, 1,
                            "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]", None, None)
    gpu = logging.LogRecord("lightning.pytorch.utilities.rank_zero", logging.INFO, __file__, 1,
                            "GPU available: False, used: False", None, None)
    assert console.is_noise(tip) and not console.is_noise(gpu)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_third_party()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", DeprecationWarning, stacklevel=1)
        warnings.warn("Your `IterableDataset` has `__len__` defined. In combination with ...", UserWarning, stacklevel=1)
        warnings.warn("something saesweep should hear about", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something saesweep should hear about"]
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert not logger.filter(tip) and logger.filter(gpu)

    monkeypatch.setenv("SAESWEEP_VERBOSE", "1")
    assert console.verbose()
    monkeypatch.setenv("SAESWEEP_VERBOSE", "0")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    assert console.verbose()


def test_plus_hparams_search_as_documented_is_the_optuna_search():
    """`python train.py +hparams_search=l1_optuna -m` (the form the config's comment and the Optuna docs
    use) collides with the `hparams_search: null` default in Hydra; train.py takes it as the override."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the optuna extra is not installed")
    for form in ("+hparams_search=l1_optuna", "hparams_search=l1_optuna"):
        shown = subprocess.run([sys.executable, "train.py", form, "--cfg", "hydra", "-p", "hydra.sweeper"], cwd=REPO,
                               capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, shown.stderr[-2000:]
        assert "OptunaSweeper" in shown.stdout and "n_trials: 20" in shown.stdout, form
