import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from saesweep.errors import ConfigError, ModelLoadError
from saesweep.lm import hook_point_for, load_model, stop_layer_after, validate_hook_point


def test_hook_point_from_layer_and_hook_or_explicit():
    assert hook_point_for(2, "resid_post", None) == "blocks.2.hook_resid_post"
    assert hook_point_for(2, "resid_post", "blocks.0.hook_mlp_out") == "blocks.0.hook_mlp_out"
    assert stop_layer_after("blocks.2.hook_resid_post") == 3
    assert stop_layer_after("hook_embed") is None


def test_unknown_hook_lists_close_matches(tiny_model):
    with pytest.raises(ConfigError, match=r"'blocks\.1\.hook_resid_pots'.*close matches: .*blocks\.1\.hook_resid_post"):
        validate_hook_point(tiny_model, "blocks.1.hook_resid_pots")


def test_layer_out_of_range_names_the_range(tiny_model):
    with pytest.raises(ConfigError, match=r"layer 5 .* layers 0\.\.1"):
        validate_hook_point(tiny_model, "blocks.5.hook_resid_post")
    validate_hook_point(tiny_model, "blocks.1.hook_resid_post")


def test_local_dir_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(None, str(tmp_path), torch.device("cpu"))


def test_hub_default_without_network_fails_fast_and_points_to_model_path(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens on the discard port: unreachable hub
        "HF_HOME": str(tmp_path / "hf"),
        "WANDB_MODE": "offline",
    }
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "train.py", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "EleutherAI/pythia-70m-deduped" in proc.stderr and "could not be downloaded" in proc.stderr
    assert "model.path=" in proc.stderr
    assert elapsed < 30, f"took {elapsed:.1f}s"
