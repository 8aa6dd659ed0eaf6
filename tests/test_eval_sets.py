"""Extra held-out sets (eval.sets): every metric per set, in metrics.json, the loggers and the evaluator."""

import csv
import gzip
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import synthetic_documents
from saesweep import load_sae
from saesweep.data import context_source, eval_set_description
from saesweep.errors import ConfigError
from saesweep.evaluate import WandbSettings, console_table, evaluate_sweep
from saesweep.lm import load_model
from saesweep.metrics import HeldOutSet, evaluate
from saesweep.train import train
from test_train import METRIC_KEYS, tiny_cfg


@pytest.fixture(scope="module")
def other_corpus(tmp_path_factory) -> Path:
    """Documents of other words than the training corpus's (another seed, sentences reversed)."""
    path = tmp_path_factory.mktemp("other") / "other.jsonl.gz"
    texts = [" ".join(reversed(t.split())).upper() for t in synthetic_documents(120, seed=7)]
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps({"body": t}) + "\n" for t in texts)
    return path


def test_every_metric_is_reported_per_set_and_matches_a_separate_evaluation(tmp_path, tiny_model_dir, corpus_path,
                                                                             other_corpus):
    cfg = tiny_cfg(tiny_model_dir, corpus_path, tmp_path / "store", "logger=csv", "trainer.log_every_n_steps=1",
                   f"+eval.sets.other.path={other_corpus}", "+eval.sets.other.text_field=body")
    result = train(cfg, tmp_path / "sweep" / "0")
    metrics = json.loads((tmp_path / "sweep" / "0" / "metrics.json").read_text())
    assert set(metrics) == METRIC_KEYS | {f"other/{k}" for k in METRIC_KEYS}
    assert metrics == pytest.approx(result.metrics)
    assert metrics["other/n_eval_tokens"] == metrics["n_eval_tokens"] == 800
    # other text: a worse reconstruction than on the training corpus's own held-out documents
    assert metrics["other/fvu"] > metrics["fvu"] and metrics["other/ce_clean"] != metrics["ce_clean"]

    # the same numbers from the saved SAE on contexts of that corpus built here, every document held out
    model = load_model(None, str(tiny_model_dir), torch.device("cpu"))
    contexts = context_source(eval_set_description(cfg, "other"), model.tokenizer, cfg.ctx_len).held_out_contexts(50)
    assert contexts.n_documents == 50  # one context from each of the first 50 documents
    held_out = HeldOutSet.build(model, contexts.tokens, "blocks.1.hook_resid_post", 16)
    again = evaluate(load_sae(tmp_path / "sweep" / "0"), model, "blocks.1.hook_resid_post", held_out, 16).metrics
    for key in ("fvu", "l0", "ce_recovered", "ce_delta", "fvu_se"):
        assert again[key] == pytest.approx(metrics[f"other/{key}"], rel=1e-4), key

    # both sets reach the logger during training and at the end
    (log_file,) = (tmp_path / "sweep" / "0").rglob("metrics.csv")
    rows = list(csv.DictReader(log_file.open()))
    assert sum(1 for r in rows if r.get("eval/other/fvu")) == sum(1 for r in rows if r.get("eval/fvu")) >= 2
    assert float(next(r for r in rows if r.get("final/other/fvu"))["final/other/fvu"]) == pytest.approx(metrics["other/fvu"])

    # the evaluator's summary.csv and console table carry the set
    evaluation = evaluate_sweep(tmp_path / "sweep", wandb_settings=WandbSettings(mode="disabled"))
    (row,) = csv.DictReader((tmp_path / "sweep" / "evaluation" / "summary.csv").open())
    assert float(row["other/fvu"]) == pytest.approx(metrics["other/fvu"]) and "other/ce_recovered_se" in row
    header, line = console_table(evaluation.summary, 0.9).splitlines()[:2]
    assert re.split(r"\s{2,}", header)[4:8] == ["FVU", "ce_recovered", "FVU (other)", "ce_recovered (other)"]
    assert f"{metrics['other/fvu']:.4f} ± {metrics['other/fvu_se']:.4f}" in line

    # a second job finds the set in the store instead of building it again
    entries = json.loads(next((tmp_path / "store").rglob("manifest.json")).read_text())["held_out"]
    assert sorted(k.split("-")[0] for k in entries) == ["50", "other"]


@pytest.mark.parametrize("override, message", [
    ("+eval.sets.corpus.path=x.jsonl", "not 'corpus'"),
    ("+eval.sets.other=x.jsonl", "must be a mapping with a path"),
    ("+eval.sets.other.file=x.jsonl", "unknown keys ['file']"),
    ("+eval.sets.other.split=test", "names no corpus"),
])
def test_bad_eval_sets_are_named(tmp_path, tiny_model_dir, corpus_path, override, message):
    from saesweep.config import check_config

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_config(tiny_cfg(tiny_model_dir, corpus_path, tmp_path, override))


def test_a_set_name_that_cannot_be_a_metric_prefix_is_refused(tmp_path, tiny_model_dir, corpus_path):
    from omegaconf import open_dict

    from saesweep.config import check_config

    cfg = tiny_cfg(tiny_model_dir, corpus_path, tmp_path)
    with open_dict(cfg):
        cfg.eval.sets["news/2024"] = {"path": "x.jsonl"}
    with pytest.raises(ConfigError, match="eval.sets.news/2024: the name must be letters"):
        check_config(cfg)


def test_synthetic_activations_refuse_text_sets(tmp_path):
    from hydra import compose, initialize_config_dir

    from conftest import REPO
    from saesweep.config import check_config

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["data=synthetic", "eval_sets=other_sources"])
    with pytest.raises(ConfigError, match="data=synthetic has no language model"):
        check_config(cfg)


def test_the_shipped_out_of_distribution_set_resolves_and_reads(tmp_path, tiny_model_dir, corpus_path):
    cfg = tiny_cfg(tiny_model_dir, corpus_path, tmp_path, "eval_sets=other_sources")
    description = eval_set_description(cfg, "other_sources")
    assert Path(description["path"]).name == "other_sources.jsonl.gz" and description["heldout_fraction"] == 1.0
    with gzip.open(description["path"], "rt") as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 998 and {d["meta"]["source"] for d in lines} == {"sotu", "kjv"}
