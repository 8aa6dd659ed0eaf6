"""Features across layers (saesweep.evaluate.layers) and the opt-in comparison on held-out tokens
(saesweep.evaluate.heldout): constructed run directories, and the tiny random model for activations."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from saesweep.errors import ConfigError
from saesweep.evaluate import LAYERS_FILE, EvalSettings, LayerSettings, evaluate_sweep
from saesweep.evaluate.layers import LAYER_FEATURES_FILE, PERSISTENCE_PLOT, residual_order
from test_evaluate import NO_WANDB, make_run, true_features

CPU = EvalSettings(device="cpu")


def hook(layer: int, position: str = "post") -> str:
    return f"blocks.{layer}.hook_resid_{position}"


def set_cfg(run_dir: Path, **keys) -> None:
    path = run_dir / "cfg.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | keys))


def permuted(decoder: torch.Tensor, seed: int) -> torch.Tensor:
    return decoder[torch.randperm(len(decoder), generator=torch.Generator().manual_seed(seed))]


def test_residual_hook_points_are_ordered_by_layer_then_pre_mid_post():
    hooks = [hook(1, "pre"), hook(0, "post"), hook(0, "mid"), hook(0, "pre"), hook(10, "post"), hook(2)]
    assert sorted(hooks, key=residual_order) == [
        hook(0, "pre"), hook(0, "mid"), hook(0, "post"), hook(1, "pre"), hook(2), hook(10, "post")]
    assert residual_order("blocks.0.hook_mlp_out") is None and residual_order(None) is None


def test_the_same_dictionary_at_two_layers_is_found_entirely_and_a_random_one_at_chance(tmp_path):
    features = true_features(64)
    make_run(tmp_path / "0", features, hook_point=hook(0))
    make_run(tmp_path / "1", permuted(features, 1), hook_point=hook(1))
    make_run(tmp_path / "2", true_features(64, seed=9), hook_point=hook(2), dead=64)  # unrelated, never fire
    evaluation = evaluate_sweep(tmp_path, CPU, NO_WANDB)
    out = evaluation.out_dir
    assert {p.name for p in evaluation.layers.files} == {LAYERS_FILE, LAYER_FEATURES_FILE, PERSISTENCE_PLOT}
    assert (out / PERSISTENCE_PLOT).stat().st_size > 0
    (model,) = json.loads((out / LAYERS_FILE).read_text())["models"]
    assert model["hook_points"] == [hook(0), hook(1), hook(2)]
    table = model["persistence"]
    assert table["n_features"] == [64, 64, 64]
    assert [[len(row) for row in table[key]] for key in ("count", "fraction")] == [[3, 3, 3], [3, 3, 3]]
    assert [table["fraction"][i][i] for i in range(3)] == [1.0, 1.0, 1.0]
    assert [table["chance_count"][i][i] for i in range(3)] == [None, None, None]
    assert table["count"][0][1] == table["count"][1][0] == 64  # found again entirely
    assert table["count"][0][2] == table["chance_count"][0][2] == 0  # the random one: at chance
    assert table["count"][2][1] <= 1 and table["chance_count"][1][0] == 0
    # layer 0's features and layer 1's (found at layer 0) first appear at layer 0; the unrelated ones at layer 2
    assert model["first_appearance"] == {hook(0): 128, hook(1): 0, hook(2): 64}
    top = model["top_features"]
    assert len(top) == 20 and all(len(f["found_at"]) == 1 and f["mean_matched_cosine"] > 0.4 for f in top)
    assert {f["run"] for f in model["top_features"]} <= {"0", "1"}  # dead features are never top features
    assert top[0]["frequency"] == pytest.approx(0.05)
    rows = (out / LAYER_FEATURES_FILE).read_text().splitlines()
    assert rows[0] == "run,feature,hook_point,found_at,first_hook_point,mean_matched_cosine,frequency"
    assert len(rows) == 1 + 3 * 64
    assert f"1,0,{hook(1)},{hook(0)},{hook(0)}," in "\n".join(rows)
    assert "across layers: 3 hook points of /models/fake" in evaluation.layers.console_line()


def test_a_sweep_at_one_hook_point_writes_nothing_new(tmp_path):
    features = true_features(64)
    make_run(tmp_path / "0", features[:32])
    make_run(tmp_path / "1", features)
    evaluation = evaluate_sweep(tmp_path, CPU, NO_WANDB)
    assert evaluation.layers is None
    assert not {LAYERS_FILE, LAYER_FEATURES_FILE, PERSISTENCE_PLOT} & {p.name for p in evaluation.out_dir.iterdir()}


def test_runs_of_other_hooks_or_models_stay_out_of_the_layer_comparison(tmp_path):
    features = true_features(64)
    make_run(tmp_path / "0", features, hook_point=hook(0))
    make_run(tmp_path / "1", features, hook_point="blocks.1.hook_mlp_out")
    make_run(tmp_path / "2", features, hook_point=hook(1))
    set_cfg(tmp_path / "2", model_path="/models/other")
    assert evaluate_sweep(tmp_path, CPU, NO_WANDB).layers is None


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, tiny_model_dir, corpus_path) -> Path:
    """Dictionaries on the tiny model: layers 0 and 1, and at layer 1 a second seed that is a permuted copy."""
    sweep = tmp_path_factory.mktemp("tiny_sweep")
    dataset = {"path": str(corpus_path), "name": None, "split": "train", "text_field": "text", "prepend_bos": True,
               "seed": 0, "heldout_fraction": 0.1, "contexts_per_document": None, "mix_pool_contexts": 65536}
    decoders = {"0": true_features(64, seed=3), "1": true_features(64, seed=4)}
    decoders["2"] = permuted(decoders["1"], 5)
    for name, layer, seed in (("0", 0, 0), ("1", 1, 0), ("2", 1, 1)):
        make_run(sweep / name, decoders[name], hook_point=hook(layer))
        set_cfg(sweep / name, model_path=str(tiny_model_dir), dataset=dataset, ctx_len=16, seed=seed)
    return sweep


def test_activation_similarity_and_outliers_through_the_evaluator(tiny_sweep):
    settings = LayerSettings(activation_similarity=True, similarity_tokens=800)
    evaluation = evaluate_sweep(tiny_sweep, CPU, NO_WANDB, layer_settings=settings)
    report = json.loads((evaluation.out_dir / LAYERS_FILE).read_text())
    assert report["n_tokens"] == 800
    pairs = {(p["a"], p["b"]): p for p in report["activation_similarity"]["pairs"]}
    assert {k: p["relation"] for k, p in pairs.items()} == {("0", "1"): "layers", ("0", "2"): "layers", ("1", "2"): "seeds"}
    seeds = pairs["1", "2"]  # a permuted copy: every feature matched, by activation as by decoder
    assert seeds["share"] == 1.0 and seeds["chance_share"] < 0.2 and seeds["agreement"] == 1.0
    assert pairs["0", "1"]["share"] < seeds["share"]
    outliers = report["outlier_dimensions"]
    assert [h["hook_point"] for h in outliers["hook_points"]] == [hook(0), hook(1)]
    assert set(outliers["runs"]) == {"0", "1", "2"}
    assert all(0 <= r["share"] <= 1 for r in outliers["runs"].values())
    assert all("basis_direction" in f for f in report["models"][0]["top_features"])
    assert "activation similarity of 3 pairs" in evaluation.layers.console_line()
    # benchmarks/layers.py reads the figures of #28 from it
    figures = subprocess.run([sys.executable, str(REPO / "benchmarks" / "layers.py"), str(tiny_sweep)],
                             capture_output=True, text=True, check=True).stdout
    assert "seed_pairs_agreement=1.0000 seed_pairs_similarity_share=1.0000" in figures.splitlines()[-1]


def test_models_with_different_tokenizers_are_refused_in_one_line(tiny_sweep, tiny_model_dir, tmp_path):
    other_model = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other_model)
    tokenizer = json.loads((other_model / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # the same tokens, two ids swapped
    (other_model / "tokenizer.json").write_text(json.dumps(tokenizer))
    sweep = tmp_path / "sweep"
    for name in ("0", "1"):
        shutil.copytree(tiny_sweep / name, sweep / name)
    set_cfg(sweep / "1", model_path=str(other_model))
    with pytest.raises(ConfigError, match=r"^model \S+ and model \S+ have different tokenizers \([^\n]*\)[^\n]*$"):
        evaluate_sweep(sweep, CPU, NO_WANDB, layer_settings=LayerSettings(activation_similarity=True))


def test_a_dictionary_of_another_model_is_compared_by_activation_not_by_decoder(tiny_sweep, tiny_model_dir, tmp_path):
    """compare_with= a dictionary whose files name another model (here: the same weights under another
    path, so that its features are run 1's, permuted): it forms no decoder comparison with the sweep, is
    matched by activation with every run of the sweep, and without activation_similarity is refused."""
    other_model = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other_model)
    sweep = tmp_path / "sweep"
    for name in ("0", "1"):
        shutil.copytree(tiny_sweep / name, sweep / name)
    released = tmp_path / "theirs"
    shutil.copytree(tiny_sweep / "2", released)  # run 1's features, permuted
    set_cfg(released, model_path=str(other_model))

    with pytest.raises(ConfigError, match=r"compare_with=.*theirs.* is from model .*other_model.*activation_similarity=true"):
        evaluate_sweep(sweep, CPU, NO_WANDB, compare_with=[released])
    settings = LayerSettings(activation_similarity=True, similarity_tokens=800)
    evaluation = evaluate_sweep(sweep, CPU, NO_WANDB, compare_with=[released], layer_settings=settings)
    assert not any("released:theirs" in pair for pair in evaluation.comparison.pairs)  # no shared basis
    report = json.loads((evaluation.out_dir / LAYERS_FILE).read_text())
    pairs = {(p["a"], p["b"]): p for p in report["activation_similarity"]["pairs"]}
    assert pairs["0", "released:theirs"]["relation"] == pairs["1", "released:theirs"]["relation"] == "models"
    same = pairs["1", "released:theirs"]
    assert same["share"] == 1.0 and same["chance_share"] < 0.2 and same["agreement"] is None
    assert pairs["0", "released:theirs"]["share"] < same["share"]


def test_bad_layer_settings_are_config_errors():
    with pytest.raises(ConfigError, match="similarity_threshold=2"):
        LayerSettings(similarity_threshold=2.0)
    with pytest.raises(ConfigError, match="similarity_tokens=1"):
        LayerSettings(similarity_tokens=1)
