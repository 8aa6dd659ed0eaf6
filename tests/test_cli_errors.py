"""Bad input on the real command line (`python train.py ...`): one readable block naming the key and
the value, no Python traceback, a non-zero exit; bugs keep their traceback, HYDRA_FULL_ERROR=1 shows all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO

_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": ""}


def run_train(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env or _ENV, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_model_dir, corpus_path):
    """(arguments, what the message must say) for each bad input, and the results of running them all."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    empty = tmp / "empty.jsonl"
    empty.write_text('{"text": "  "}\n')
    latin1 = tmp / "latin1.txt"
    latin1.write_bytes(b"first line\nsecond\nbad \xff here\n")
    weightless = tmp / "weightless_model"
    weightless.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, weightless / name)
    base = [f"model.path={tiny_model_dir}", "data=jsonl", f"data.path={corpus_path}", "layer=1", "ctx_len=16",
            "n_tokens=4000", "eval.n_tokens=800", "train.batch_size=256", "logger=none", f"store.dir={tmp / 'store'}"]
    cases = {
        "hook": (["hook=resid_psot"], "hook point 'blocks.1.hook_resid_psot' is not a hook of this model"),
        "layer": (["layer=9"], "layer 9"),
        "ratio": (["dict_ratio=0"], "dict_ratio=0 must be > 0"),
        "l1": (["l1_coef=-1"], "l1_coef=-1 must be ≥ 0"),
        "ctx_len": (["ctx_len=1"], "ctx_len=1 must be ≥ 2"),
        "n_tokens": (["n_tokens=10"], "n_tokens=10 is less than one batch"),
        "data_path": ([f"data.path={tmp / 'missing.jsonl'}"], f"data.path='{tmp / 'missing.jsonl'}' does not exist"),
        "empty_data": ([f"data.path={empty}"], f"dataset {empty} has no non-empty 'text' documents"),
        "no_weights": ([f"model.path={weightless}"], str(weightless)),
        "non_numeric": (["dict_ratio=four"], "dict_ratio='four' is not a finite number"),
        "heldout": (["data.heldout_fraction=1.5"], "data.heldout_fraction=1.5 must be in (0, 1)"),
        "per_document": (["data.contexts_per_document=0"], "data.contexts_per_document=0 must be a positive integer"),
        "architecture": (["sae.architecture=relu_l2"], "sae.architecture='relu_l2' is unknown"),
        "eval_every": (["eval.every_n_steps=0"], "eval.every_n_steps=0 must be a positive integer"),
        "k_zero": (["sae=topk", "sae.k=0"], "sae.k=0 must be ≥ 1"),
        "k_too_large": (["sae=topk", "sae.k=1000"], "sae.k=1000 exceeds d_sae=64"),
        "foreign_key": (["+sae.k=3"], "sae.k=3 is not a key of sae=relu_l1; its keys: encoder_init_norm, l1_coef, resample_every_tokens"),
        "encoder_init": (["sae.encoder_init_norm=0"], "sae.encoder_init_norm=0 must be > 0"),
        "grad_clip": (["sae.recipe.grad_clip_norm=0"], "sae.recipe.grad_clip_norm=0 is not allowed: the dictionary's gradient clipped to this norm before Adam (> 0), or null for none"),
        "txt_bytes": ([f"data.path={latin1}"], f"{latin1}: line 3, byte offset 22: b'\\xff he' is not UTF-8 text"),
        "seed_fraction": (["seed=1.5"], "seed=1.5 is not an integer"),
        "groups": (["sae=matryoshka_batchtopk", "sae.group_sizes=[8,8,8]"],
                   "sae.group_sizes=[8, 8, 8] sum to 24, but d_sae=64"),
    }

    def run(name: str) -> subprocess.CompletedProcess:
        overrides, _ = cases[name]
        return run_train(*base, *overrides, f"hydra.run.dir={tmp / name}")

    base.append("dict_ratio=2")
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(cases, pool.map(run, cases)))
    return tmp, cases, results


@pytest.mark.parametrize("name", [
    "hook", "layer", "ratio", "l1", "ctx_len", "n_tokens", "data_path", "empty_data", "no_weights", "non_numeric",
    "heldout", "per_document", "architecture", "eval_every", "k_zero", "k_too_large", "foreign_key", "groups",
    "encoder_init", "grad_clip", "seed_fraction", "txt_bytes",
])
def test_bad_input_is_one_readable_message_without_a_traceback(bad_inputs, name):
    tmp, cases, results = bad_inputs
    proc, (_, message) = results[name], cases[name]
    console = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in console, console[-3000:]
    assert message in console, console[-3000:]
    assert f"run directory {tmp / name}" in console
    error = json.loads((tmp / name / "error.json").read_text())
    assert message in error["message"] and "Traceback" in error["traceback"]
    assert "Traceback" in (tmp / name / "train.log").read_text()  # kept where the console points


def test_a_sweep_with_a_bad_job_runs_the_others_and_lists_the_failed_one(tmp_path, tiny_model_dir, corpus_path):
    proc = run_train(
        f"model.path={tiny_model_dir}", "data=jsonl", f"data.path={corpus_path}", "layer=1", "ctx_len=16",
        "n_tokens=2000", "eval.n_tokens=800", "train.batch_size=256", "logger=none", f"store.dir={tmp_path / 'store'}",
        "dict_ratio=0,1", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    console = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in console, console[-3000:]
    assert "1 job(s) failed" in console and f"{tmp_path / 'sweep' / '0'}: ConfigError: dict_ratio=0" in console
    assert (tmp_path / "sweep" / "1" / "metrics.json").is_file()


def test_full_error_and_bugs_keep_their_traceback(tmp_path, tiny_model_dir, corpus_path):
    args = [f"model.path={tiny_model_dir}", "data=jsonl", f"data.path={corpus_path}", "layer=1", "dict_ratio=0"]
    full = run_train(*args, f"hydra.run.dir={tmp_path / 'full'}", env={**_ENV, "HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr and "dict_ratio=0 must be > 0" in full.stderr
    # an exception that is not a saesweep error is a bug: the console shows its traceback
    (tmp_path / "sitecustomize.py").write_text(
        "import saesweep.train\n"
        "def broken(*args, **kwargs):\n    raise RuntimeError('a bug in the training code')\n"
        "saesweep.train.train_ensemble = broken\n"
    )
    env = {**_ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    bug = run_train(*args[:-1], f"hydra.run.dir={tmp_path / 'bug'}", env=env)
    assert bug.returncode != 0 and "Traceback" in bug.stderr and "RuntimeError: a bug in the training code" in bug.stderr


def test_an_unknown_architecture_lists_those_there_are(tmp_path):
    proc = run_train("sae=topkk", f"hydra.run.dir={tmp_path}")
    console = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in console, console[-3000:]
    assert "Could not find 'sae/topkk'" in console and "topk" in console
