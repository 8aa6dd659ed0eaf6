"""Steering: strength 0 changes nothing, a direction that promotes a token makes it likelier and the
greedy continuation starts with it, clamping sets the feature's coefficient, the feature page shows it,
and bad input is one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from saesweep.errors import CheckpointError, ConfigError
from saesweep.io import atomic_write_safetensors
from saesweep.report import build_report, views
from saesweep.rundir import FEATURE_STATS_FILE
from saesweep.steering import SteeringSettings, _steering_hook, steer
from test_report import LAST_HOOK, fast_settings, make_sae, single_token, write_run

PROMPTS = ["the dog", "a house and"]


@pytest.fixture(scope="module")
def promoting_run(tmp_path_factory, tiny_model, tiny_model_dir, corpus_path):
    """A run at the last block whose feature 1 decodes to the effective unembedding of " dog" (so adding it
    raises that token's logit) and whose max activation is 1."""
    t = single_token(tiny_model, " dog")
    sae = make_sae(tiny_model.cfg.d_model, 4)
    with torch.no_grad():
        column = views.effective_unembedding(tiny_model, True)[:, t]
        sae.W_dec[1] = column / column.norm()
    run = write_run(tmp_path_factory.mktemp("steer") / "run", sae, tiny_model_dir, corpus_path, LAST_HOOK)
    atomic_write_safetensors(run / FEATURE_STATS_FILE, {"frequency": torch.full((4,), 0.1), "mean_activation": torch.ones(4),
                                                       "max_activation": torch.ones(4)})
    return run, t


def test_strength_zero_reproduces_the_unsteered_text_exactly(promoting_run, tiny_model):
    run, _ = promoting_run
    result = steer(run, 1, 0.0, PROMPTS, max_new_tokens=8, temperature=1.5, seed=3, model=tiny_model, device="cpu")
    assert [c.decoding for c in result.continuations] == ["greedy", "sampled"] * 2
    for c in result.continuations:
        assert c.steered == c.unsteered and len(c.unsteered) == 8
    assert all(s.delta_logprob == 0 for shift in result.logit_shift for s in shift["rises"] + shift["falls"])
    # the sampled continuation is not the greedy one (the seed matters), and is the same on a rerun
    again = steer(run, 1, 0.0, PROMPTS, max_new_tokens=8, temperature=1.5, seed=3, model=tiny_model, device="cpu")
    assert [c.unsteered for c in again.continuations] == [c.unsteered for c in result.continuations]


def test_a_strong_token_promoting_direction_raises_that_token(promoting_run, tiny_model):
    run, t = promoting_run
    result = steer(run, 1, 50.0, PROMPTS, max_new_tokens=4, model=tiny_model, device="cpu")
    # the random tiny model's logits span about ±0.5, so no token's log-prob can move much more than that
    for shift in result.logit_shift:
        dog = next(s for s in shift["rises"] if s.id == t)
        assert dog.delta_logprob > 0.3 and t not in [s.id for s in shift["falls"]]
    greedy = [c for c in result.continuations if c.decoding == "greedy"]
    assert all(c.steered[0] == " dog" for c in greedy)
    assert all(c.unsteered[0] != " dog" for c in greedy)  # the unsteered model did not say it anyway


def test_clamp_sets_the_features_coefficient_along_its_direction(tiny_model):
    sae = make_sae(tiny_model.cfg.d_model, 4)
    x = torch.randn(2, 5, tiny_model.cfg.d_model)
    hook = _steering_hook(sae, SteeringSettings(feature=2, strength=3.0, prompts=("x",), mode="clamp"), 0.5)
    current = sae.encode_features(x, torch.tensor([2]))[..., 0]
    expected = x + (1.5 - current)[..., None] * sae.W_dec[2].detach()
    assert torch.allclose(hook(x, None), expected, atol=1e-6)


def test_a_feature_page_shows_steering_when_prompts_are_given(promoting_run, tiny_model, tmp_path):
    run, _ = promoting_run
    settings = fast_settings(features=(1,), steering={"prompts": ["the dog"], "strength": 50.0, "max_new_tokens": 3})
    built = build_report(run, settings, model=tiny_model)
    steering = built.data["features"][0]["steering"]
    assert steering["feature"] == 1 and len(steering["continuations"]) == 2
    assert " dog" in [s["token"] for s in steering["logit_shift"][0]["rises"]]
    page = (built.report_dir / "features" / "1.html").read_text()
    assert "<h2>Steering</h2>" in page and "rises:" in page


def test_bad_steering_input_names_the_value(promoting_run, tiny_model, tmp_path):
    run, _ = promoting_run
    with pytest.raises(ConfigError, match=r"feature=4 is out of range: this dictionary has features 0\.\.3"):
        steer(run, 4, 1.0, PROMPTS, model=tiny_model)
    with pytest.raises(ConfigError, match="strength=nan must be a finite number"):
        steer(run, 1, float("nan"), PROMPTS, model=tiny_model)
    with pytest.raises(ConfigError, match=r"prompts=\[\] must be a non-empty list"):
        steer(run, 1, 1.0, [], model=tiny_model)
    with pytest.raises(ConfigError, match="mode='boost' is unknown; allowed: add, clamp"):
        steer(run, 1, 1.0, PROMPTS, mode="boost", model=tiny_model)
    with pytest.raises(CheckpointError, match="is not a saesweep run directory"):
        steer(tmp_path, 1, 1.0, PROMPTS, model=tiny_model)
    with pytest.raises(ConfigError, match="report.steering: strength=inf"):
        fast_settings(steering={"prompts": ["a"], "strength": float("inf")})


def test_steer_command_writes_json_html_and_a_wandb_run_and_refuses_bad_input_in_one_line(promoting_run, tmp_path):
    run, _ = promoting_run
    env = os.environ | {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    base = [sys.executable, "steer.py", f"run_dir={run}", "feature=1", "prompts=[the dog]", "max_new_tokens=3",
            f"hydra.run.dir={tmp_path / 'out'}"]
    done = subprocess.run([*base, "strength=50"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "steered:   ' dog" in done.stdout
    assert any(line.startswith("  rises:") and "' dog' +" in line for line in done.stdout.splitlines())
    data = json.loads((run / "steering" / "feature_1_add_50.json").read_text())
    assert data["continuations"][0]["prompt"] == "the dog"
    assert "<h2>Steering</h2>" in (run / "steering" / "feature_1_add_50.html").read_text()
    assert list(run.glob("wandb/offline-run-*/run-*.wandb"))
    bad = subprocess.run([*base, "strength=nan"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "error: strength=nan must be a finite number" in bad.stderr


def test_a_prompt_longer_than_the_context_is_refused_before_generating(promoting_run, tiny_model):
    run, _ = promoting_run
    n_ctx = tiny_model.cfg.n_ctx
    with pytest.raises(ConfigError, match=rf"with max_new_tokens=4 it needs \d+ positions, more than the model's context "
                                          rf"n_ctx={n_ctx}; allowed: prompts of at most {n_ctx - 4} tokens"):
        steer(run, 1, 1.0, ["the dog " * n_ctx], max_new_tokens=4, model=tiny_model, device="cpu")


def _can_mount_read_only() -> bool:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        try:
            probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind {folder} {folder} && "
                                    f"mount -o remount,bind,ro {folder} {folder}"], capture_output=True)
        except FileNotFoundError:
            return False
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_read_only(), reason="needs unshare to mount a folder read-only (root ignores modes)")
def test_steer_on_a_read_only_run_directory_stops_before_generating(promoting_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(promoting_run[0], run, ignore=shutil.ignore_patterns("steering", "wandb"))
    env = os.environ | {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    steer_cmd = (f"{sys.executable} steer.py run_dir={run} feature=1 'prompts=[the dog]' strength=5 max_new_tokens=3 "
                 f"hydra.run.dir={tmp_path / 'out'}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind {run} {run} && mount -o remount,bind,ro {run} {run} "
                           f"&& exec {steer_cmd}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in console, console[-3000:]
    assert f"run_dir (its steering/ folder)='{run / 'steering'}' is not writable" in console
    assert "Loading weights" not in console, "it stopped before loading the model"
