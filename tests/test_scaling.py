"""Scale-out: sweeps run by Hydra launcher plugins in separate processes, sharing one activation store."""

import fcntl
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime

import pytest
from hydra import compose, initialize_config_dir

from conftest import REPO
from saesweep.lm import hook_point_for
from saesweep.store import ActivationStore
from saesweep.train import store_spec

WAITING = "is being harvested by another process; waiting"
_TIMESTAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def tiny_overrides(tiny_model_dir, corpus_path, store_dir):
    return [
        f"model.path={tiny_model_dir}", "data=jsonl", f"data.path={corpus_path}", "layer=1", "ctx_len=16",
        "n_tokens=8000", "eval.n_tokens=800", "train.batch_size=256", "dict_ratio=2", "logger=none",
        "trainer.enable_progress_bar=false", f"store.dir={store_dir}", "store.shard_tokens=1000",
    ]


def logged_at(log: str, needle: str) -> datetime:
    """When the line of a Hydra job log (train.log) containing `needle` was written."""
    (line,) = [line for line in log.splitlines() if needle in line]
    return datetime.strptime(_TIMESTAMP.match(line).group(1), "%Y-%m-%d %H:%M:%S,%f")


def test_submitit_sweep_jobs_share_the_store_under_its_lock(tmp_path, tiny_model, tiny_model_dir, corpus_path):
    """Two jobs in two processes reach the store while a third process holds its lock: both wait,
    then exactly one harvests and the other reuses what it wrote."""
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher (the `slurm` extra) is not installed"
    )
    overrides = tiny_overrides(tiny_model_dir, corpus_path, tmp_path / "store")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    spec = store_spec(cfg, tiny_model, hook_point_for(cfg.layer, cfg.hook, None))
    store = ActivationStore(cfg.store.dir, spec, shard_tokens=cfg.store.shard_tokens)
    store.path.mkdir(parents=True)
    sweep = tmp_path / "sweep"
    logs = [sweep / job / "train.log" for job in ("0", "1")]

    # Hold the store's lock until both jobs are blocked on it, so that they certainly race for it.
    with open(store.path / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen(
            [sys.executable, "train.py", *overrides, "dict_ratio=1,2", "hydra/launcher=submitit_local",
             f"hydra.sweep.dir={sweep}", "-m"],
            cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.monotonic() + 120
        while not all(log.is_file() and WAITING in log.read_text() for log in logs):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the jobs never waited on the store's lock"
            time.sleep(0.2)
        fcntl.flock(lock, fcntl.LOCK_UN)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]

    # each job ran in its own submitit process (a local job's id is its pid; `%j` is the submission folder)
    assert len([path for path in (sweep / ".submitit").iterdir() if path.name.isdigit()]) == 2
    for job, ratio in (("0", 1), ("1", 2)):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["n_eval_tokens"] == 800 and 0 < metrics["fvu"] < 1
        assert json.loads((sweep / job / "cfg.json").read_text())["d_sae"] == 32 * ratio
    texts = [log.read_text() for log in logs]
    harvested = [text for text in texts if "activation store harvested" in text]
    reused = [text for text in texts if "activation store reused" in text]
    assert len(harvested) == 1 and len(reused) == 1 and harvested != reused
    (harvester,), (reuser,) = harvested, reused
    # both were waiting before the harvest finished; the reuser went on only after it
    finished = logged_at(harvester, "activation store harvested")
    assert logged_at(reuser, WAITING) < finished <= logged_at(reuser, "activation store reused")
    assert store.is_complete() and store.manifest()["n_rows"] == 8000
