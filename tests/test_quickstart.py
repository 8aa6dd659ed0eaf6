"""The quick start (`make sweep`, saesweep.quickstart): the reference folder offline when there is one, the
Hugging Face hub without one, one line saying both ways with neither; its table has the README's shape."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO
from saesweep import quickstart
from saesweep.quickstart import HUB_DATA, HUB_MODEL, NoSourceError, choose_source, format_table, train_command
from saesweep.reproduction import RunRow


def reference_folder(root, model_dir, corpus):
    """A reference folder as the README describes it: model/ and corpus/train.jsonl.gz."""
    shutil.copytree(model_dir, root / "model")
    (root / "corpus").mkdir(parents=True)
    with gzip.open(root / "corpus" / "train.jsonl.gz", "wb") as f:
        f.write(corpus.read_bytes())
    return root


def unreachable_hub():
    raise AssertionError("the hub must not be asked when a reference folder is there")


def test_a_reference_folder_is_used_offline(tmp_path, tiny_model_dir, corpus_path):
    ref = reference_folder(tmp_path / "ref", tiny_model_dir, corpus_path)
    source = choose_source(ref, offline=False, reachable=unreachable_hub)
    assert source.name == "reference" and source.env == {"HF_HUB_OFFLINE": "1"}
    assert source.overrides == (f"model.path={ref / 'model'}", "data=jsonl", f"data.path={ref / 'corpus' / 'train.jsonl.gz'}")
    command = train_command(source, ["seed=1"], python="python")
    assert command[:3] == ["python", "train.py", "experiment=quickstart"] and command[-2:] == ["seed=1", "-m"]


def test_without_a_reference_folder_the_hub_runs_the_seed_experiments_setup(tmp_path):
    from hydra import compose, initialize_config_dir

    source = choose_source(tmp_path / "none", offline=False, reachable=lambda: True)
    assert source.name == "hub" and source.overrides == () and source.env == {}
    assert HUB_MODEL in source.description and HUB_DATA in source.description
    # what train.py gets: the quick start's recipe on the config's defaults, Pythia-70M-deduped and Pile-10k
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=train_command(source, [])[2:-1], return_hydra_config=True)
    assert (cfg.model.name, cfg.model.path, cfg.data.name, cfg.data.path) == (HUB_MODEL, None, HUB_DATA, None)
    assert dict(cfg.hydra.sweeper.params) == {"dict_ratio": "1,2,4,8"}
    assert cfg.hydra.launcher._target_.endswith("EnsembleLauncher")
    assert (cfg.sae.architecture, cfg.l1_coef, cfg.n_tokens, cfg.trainer.max_epochs) == ("relu_l1", 2.0, 200_000, 3)
    assert (cfg.layer, cfg.hook, cfg.ctx_len) == (2, "resid_post", 25)


@pytest.mark.parametrize(("offline", "reachable", "why"), [
    (True, lambda: True, "HF_HUB_OFFLINE=1 is set"),
    (False, lambda: False, "the Hugging Face hub is not reachable"),
])
def test_with_neither_it_stops_with_one_line_saying_both_ways(tmp_path, offline, reachable, why):
    with pytest.raises(NoSourceError) as error:
        choose_source(tmp_path / "none", offline=offline, reachable=reachable)
    message = str(error.value)
    assert "\n" not in message and why in message
    assert "REFERENCE=DIR" in message and "model/" in message and "corpus/train.jsonl.gz" in message
    assert HUB_MODEL in message and HUB_DATA in message


def test_a_named_folder_that_is_not_a_reference_folder_is_an_error_not_a_download(tmp_path):
    (tmp_path / "half" / "model").mkdir(parents=True)  # no config.json, no corpus
    with pytest.raises(NoSourceError, match=r"REFERENCE=.*half is not a reference folder: it needs model/"):
        choose_source(tmp_path / "half", explicit=True, offline=False, reachable=lambda: True)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_clone_in_an_empty_folder_gets_one_line_at_once(tmp_path):
    """`make sweep` where no ../shared/reference sits beside the clone, offline: the one line, in seconds."""
    clone = tmp_path / "empty" / "saesweep"
    clone.mkdir(parents=True)
    shutil.copy(REPO / "Makefile", clone / "Makefile")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    started = time.monotonic()
    done = subprocess.run(["make", "-s", "sweep", f"PYTHON={sys.executable}"], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode != 0 and done.stdout == "" and "Traceback" not in done.stderr
    ours = [line for line in done.stderr.splitlines() if not line.startswith("make")]
    assert len(ours) == 1 and ours[0].startswith("error: no reference folder at ../shared/reference and HF_HUB_OFFLINE=1")
    assert elapsed < 30, f"took {elapsed:.0f} s"


def rows(*runs, seed=0):
    return [RunRow(str(i), seed, ratio, d_sae, {"architecture": "relu_l1", "l1_coef": "2.0", "k": ""} | {k: str(v) for k, v in values.items()})
            for i, (ratio, d_sae, values) in enumerate(runs)]


def test_the_table_says_whether_found_again_and_fidelity_rise_with_size():
    def run(ratio, found, fvu, ce):
        values = {"l0": 20.0, "l0_se": 0.1, "fvu": fvu, "fvu_se": 0.001, "ce_recovered": ce, "ce_recovered_se": 0.002}
        if found is not None:
            values |= {"found_in_next_larger": found, "baseline_found_in_next_larger": 0}
        return ratio, int(256 * ratio), values

    table = format_table(rows(run(1, 96, 0.22, 0.93), run(2, 183, 0.18, 0.95), run(4, 298, 0.15, 0.96), run(8, None, 0.13, 0.97)))
    lines = table.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == list(quickstart.HEADER)
    assert re.split(r"\s{2,}", lines[1]) == ["1", "256", "20.0 ± 0.1", "0.2200 ± 0.0010", "0.9300 ± 0.0020", "96 (37.5%)", "0"]
    assert re.split(r"\s{2,}", lines[4])[-2:] == ["–", "–"]
    assert lines[5] == "features found again rise with size: yes (96 → 183 → 298; chance 0 → 0 → 0)"
    assert lines[6] == "fidelity rises with size: yes (FVU 0.220 → 0.180 → 0.150 → 0.130; ce_recovered 0.930 → 0.950 → 0.960 → 0.970)"
    falling = format_table(rows(run(1, 96, 0.22, 0.93), run(2, 50, 0.18, 0.95), run(4, None, 0.19, 0.96)))
    assert "rise with size: no (96 → 50;" in falling and "fidelity rises with size: no" in falling
    # a sweep of two RNG seeds (make sweep ARGS='seed=0,1'): a setting column, each seed's sizes judged alone
    two = format_table(rows(run(1, 96, 0.22, 0.93), run(2, None, 0.18, 0.95))
                       + rows(run(1, 90, 0.23, 0.92), run(2, None, 0.19, 0.94), seed=1))
    lines = two.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["setting", *quickstart.HEADER]
    assert [re.split(r"\s{2,}", line)[:2] for line in lines[1:5]] == [
        ["relu_l1 l1=2.0 s0", "1"], ["relu_l1 l1=2.0 s0", "2"], ["relu_l1 l1=2.0 s1", "1"], ["relu_l1 l1=2.0 s1", "2"]]
    assert lines[5] == ("features found again rise with size: no (relu_l1 l1=2.0 s0: 96; chance 0 | "
                        "relu_l1 l1=2.0 s1: 90; chance 0)")  # one size pair per seed: nothing to rise
    assert lines[6].startswith("fidelity rises with size: yes (relu_l1 l1=2.0 s0: FVU 0.220 → 0.180;")

def test_the_quick_start_on_a_small_reference_folder_prints_the_readme_table(tmp_path, tiny_model_dir, corpus_path):
    """The whole quick start, small: train.py, evaluate.py, then the table whose shape the README shows;
    the console carries none of the known third-party noise (periodic checkpoints included); the W&B runs
    are named after their setting and log the learning rate."""
    from test_docs import readme_quickstart_block

    ref = reference_folder(tmp_path / "ref", tiny_model_dir, corpus_path)
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "saesweep.quickstart", "--reference", str(ref), "layer=1", "ctx_len=16",
               "n_tokens=8000", "eval.n_tokens=800", "train.batch_size=256", "trainer.max_epochs=2", "dict_ratio=1,2,4",
               "trainer.enable_progress_bar=false", "train.checkpoint_every_n_steps=20", f"store.dir={tmp_path / 'store'}",
               "store.shard_tokens=1000", f"hydra.sweep.dir={sweep}"]
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "HYDRA_FULL_ERROR", "SAESWEEP_VERBOSE")}
    done = subprocess.run(command, cwd=REPO, env=env | {"PYTHONPATH": str(REPO / "src")}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.splitlines()
    table = out[next(i for i, line in enumerate(out) if line.startswith("dict_ratio  d_sae")):]
    readme = readme_quickstart_block().splitlines()
    readme_header = next(line for line in readme if line.startswith("dict_ratio"))
    assert re.split(r"\s{2,}", table[0]) == re.split(r"\s{2,}", readme_header)
    assert [re.split(r"\s{2,}", line)[:2] for line in table[1:4]] == [["1", "32"], ["2", "64"], ["4", "128"]]
    assert table[4].startswith("features found again rise with size: ") and table[5].startswith("fidelity rises with size: ")
    assert table[6].startswith(f"plots and tables: {sweep}/evaluation/") and "quick start took" in table[6]
    console = done.stdout + done.stderr
    for noise in ("💡 Tip", "LeafSpec", "IterableDataset", "`weights_only` was not set", "anonymous setting",
                  "TPU available", "wandb: Run history", "ModelCheckpoint with manual optimization"):
        assert noise not in console, noise
    # each W&B run is named after its setting and logs the learning rate
    for job, ratio in (("0", 1), ("2", 4)):
        (record,) = (sweep / job / "wandb").glob("offline-run-*/run-*.wandb")
        data = record.read_bytes()
        assert f"relu_l1-l1=2-x{ratio}-s0 #{job}".encode() in data and b"train/lr" in data
