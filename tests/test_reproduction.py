"""REPRODUCTION.md is generated from an evaluated sweep: its tables hold the evaluation's numbers, its
figures are copied beside it, and a sweep that was not evaluated is one clear error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from saesweep import reproduction
from saesweep.evaluate import evaluate_sweep
from saesweep.reproduction import by_size, read_evaluation, setup_lines, targets, write_reproduction
from test_evaluate import NO_WANDB, seed_size_sweep


def test_reproduction_holds_the_evaluations_numbers_and_figures(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    seed_size_sweep(sweep)  # sizes 16, 32, 64 (dict_ratio 1, 2, 4), seeds 0 and 1, all nested
    evaluate_sweep(sweep, wandb_settings=NO_WANDB)
    out = write_reproduction(sweep, tmp_path / "REPRODUCTION.md", "make reproduce")
    text = out.read_text()
    assert "make reproduce" in text and "(the seed experiment's total): **96** (chance 0)" in text
    # the by-size table: every feature of the 16- and 32-feature dictionaries is found again
    assert "| 1 | 16 | 16.0 (100.0%) | 100.0% | 16.0 (100.0%) | 100.0% |" in text
    assert "| 4 | 64 | – (–) | – | 64.0 (100.0%) | 100.0% |" in text
    # by frequency band: every feature fires on 5 % of tokens (the top band), both seeds summed
    assert "| 1 | – | – | 100.0% of 32 |" in text and "| 4 | – | – | 100.0% of 128 |" in text
    for name in ("found_by_size.png", "mcs_vs_frequency.png", "features_found.png", "pareto.png"):
        assert f"(docs/reproduction/{name})" in text and (tmp_path / "docs" / "reproduction" / name).stat().st_size > 1000
    _, runs = read_evaluation(sweep)
    rises_up, rises_across, next_size, other_seed = targets(by_size(runs))
    assert rises_up[1:] == ("1×: 16.0, 2×: 32.0", True) and rises_across[1:] == ("1×: 16.0, 2×: 32.0, 4×: 64.0", True)
    assert next_size[1:] == ("–", None)  # no 8× dictionary in this sweep: not measurable
    assert other_seed[1:] == ("100.0%", True)
    # nothing missed: no "what it would take"; a missed target brings it
    assert "## What it would take" not in text
    monkeypatch.setattr(reproduction, "targets", lambda sizes: [("a target", "measured", False)])
    assert "## What it would take" in write_reproduction(sweep, tmp_path / "MISSED.md", "make reproduce").read_text()


def test_the_setup_names_the_recipes_schedule(tmp_path):
    """The learning rate and its schedule live in the architecture's recipe (sae.recipe), not under train."""
    sweep = tmp_path / "sweep"
    seed_size_sweep(sweep)
    evaluate_sweep(sweep, wandb_settings=NO_WANDB)
    _, runs = read_evaluation(sweep)
    cfg_path = sweep / runs[0].name / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    recipe = {"lr": 0.003, "lr_warmup_steps": 500, "lr_decay_fraction": 0.2, "grad_clip_norm": 1.0, "dead_window_tokens": None}
    cfg["sae"] = {"architecture": "relu_l1", "l1_coef": 2.0, "recipe": recipe}
    cfg_path.write_text(json.dumps(cfg))
    _, architecture, training, _ = setup_lines(sweep, runs)
    assert architecture == "- architecture: `relu_l1` `l1_coef=2.0`"
    assert "lr 0.003, 500 warm-up steps, decay over the last 20% of steps, gradient norm clipped at 1.0;" in training


def test_an_unevaluated_sweep_is_one_clear_error(tmp_path):
    seed_size_sweep(tmp_path / "sweep")
    done = subprocess.run([sys.executable, "-m", "saesweep.reproduction", str(tmp_path / "sweep"), "--out",
                           str(tmp_path / "R.md")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "run `python evaluate.py sweep_dir=" in done.stderr and not (tmp_path / "R.md").exists()


@pytest.mark.parametrize("experiment", ["seed_reference", "seed"])
def test_the_experiment_configs_sweep_sizes_and_seeds_as_ensembles(experiment):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert dict(cfg.hydra.sweeper.params) == {"dict_ratio": "1,2,4,8", "seed": "0,1"}
    assert cfg.hydra.launcher._target_.endswith("EnsembleLauncher")
    assert (cfg.layer, cfg.hook, cfg.ctx_len) == (2, "resid_post", 25)
    if experiment == "seed":
        assert cfg.model.name == "EleutherAI/pythia-70m-deduped" and cfg.data.name == "NeelNanda/pile-10k"
    else:
        assert cfg.model.path.endswith("shared/reference/model") and cfg.data.path.endswith("train.jsonl.gz")
