"""Synthetic activations with known features, and dictionaries judged against them."""

import json
import logging
import math
import re

import pytest
import torch

from saesweep.errors import ConfigError
from saesweep.ground_truth import ABSORBED_COS, absorption, found_again_truth, recovery
from saesweep.synthetic import SyntheticSpec, TrueFeatures, activation_chunks, make_features, sample


def test_features_follow_the_spec_and_its_seed(tmp_path):
    spec = SyntheticSpec(d_in=32, n_features=200, mean_active=6, duplicate_fraction=0.1, duplicate_cos=0.9,
                         n_correlated_groups=3, group_size=4, n_hierarchies=5, children_per_parent=2)
    features = make_features(spec)
    assert torch.allclose(features.directions.norm(dim=-1), torch.ones(200), atol=1e-5)
    assert (features.group >= 0).sum() == 12 and len(features.hierarchy_pairs()) == 10
    # 20 near-duplicates: each has a partner at cos 0.9 (random pairs in 32 dimensions: |cos| ≈ 0.18)
    cos = features.directions @ features.directions.T - 2 * torch.eye(200)
    assert ((cos - 0.9).abs() < 1e-4).any(dim=1).sum() >= 20
    again = make_features(spec)
    assert all(torch.equal(getattr(features, f), getattr(again, f)) for f in ("directions", "firing_probability", "parent"))
    features.save(tmp_path / "truth.safetensors")
    loaded = TrueFeatures.load(tmp_path / "truth.safetensors")
    assert torch.equal(loaded.directions, features.directions) and loaded.hierarchy_pairs() == features.hierarchy_pairs()


def test_tokens_fire_as_specified():
    spec = SyntheticSpec(d_in=16, n_features=100, mean_active=5, n_correlated_groups=2, group_size=3,
                         n_hierarchies=4, children_per_parent=2, child_given_parent=0.4, firing_power=1.2)
    features = make_features(spec)
    x, coefficients = sample(spec, features, 40_000, torch.Generator().manual_seed(1))
    fires = torch.zeros(coefficients.shape, dtype=torch.bool)
    fires[tuple(coefficients.indices())] = True  # (a firing feature's magnitude may be clipped to 0)
    coefficients = coefficients.to_dense()
    assert torch.allclose(x, coefficients @ features.directions, atol=1e-4)
    # unstructured features fire at their probabilities; the expected count per token is mean_active
    free = (features.group < 0) & (features.parent < 0)
    assert fires[:, free].float().mean(0).sub(features.firing_probability[free]).abs().max() < 0.02
    assert fires.sum(1).float().mean() == pytest.approx(5, rel=0.05)
    for g in range(2):  # a group's members fire together
        members = fires[:, features.group == g]
        assert torch.equal(members.all(1), members.any(1)) and members.any()
    for parent, child in features.hierarchy_pairs():  # a child only with its parent, then at 0.4
        assert not (fires[:, child] & ~fires[:, parent]).any()
        assert fires[fires[:, parent], child].float().mean() == pytest.approx(0.4, abs=0.06)
    train = torch.cat(list(activation_chunks(spec, features, 1000)))
    held_out = torch.cat(list(activation_chunks(spec, features, 1000, held_out=True)))
    assert train.shape == (1000, 16) and not torch.equal(train, held_out)
    longer = torch.cat(list(activation_chunks(spec, features, 40_000)))  # a larger n_tokens extends a smaller one
    assert len(longer) == 40_000 and torch.equal(train, longer[:1000])
    threads = torch.get_num_threads()
    try:  # blocks drawn one at a time, not side by side: the same rows in the same order
        torch.set_num_threads(1)
        assert torch.equal(torch.cat(list(activation_chunks(spec, features, 40_000))), longer)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("n_features", 0, "data.n_features=0 must be a positive integer"),
    ("duplicate_fraction", 1.5, r"data.duplicate_fraction=1.5 must be in \[0, 1\]"),
    ("mean_active", 0, r"data.mean_active=0 must be in \(0, data.n_features=512\]"),
    ("n_hierarchies", 200, "more than data.n_features=512"),
])
def test_bad_generator_knobs_are_named(key, value, message):
    with pytest.raises(ConfigError, match=message):
        SyntheticSpec(**{key: value}).check()


def test_recovery_of_the_truth_itself_and_of_random_directions():
    features = make_features(SyntheticSpec(d_in=32, n_features=64))
    order = torch.randperm(64)
    exact = recovery(features.directions[order] * 3, features)  # row norms do not matter
    assert exact.recovered == 64 and exact.fraction == 1 and exact.mean_max_cos == pytest.approx(1)
    assert exact.learned_is_true.all() and torch.equal(order[exact.true_match], torch.arange(64))
    noise = recovery(torch.randn(128, 32), features)
    assert noise.recovered == 0 and not noise.learned_is_true.any() and noise.mean_max_cos < 0.7


def test_found_again_precision_and_recall_on_constructed_dictionaries():
    features = make_features(SyntheticSpec(d_in=32, n_features=40))
    learned = torch.cat([features.directions, torch.randn(20, 32)])  # 40 true latents, 20 false ones
    rec = recovery(learned, features)
    found = torch.zeros(60, dtype=torch.bool)
    found[:10] = True  # 10 true latents found again
    found[40:45] = True  # and 5 false ones
    result = found_again_truth(found, rec, features)
    assert result.found_again == 15 and result.precision == pytest.approx(10 / 15)
    assert result.recall == pytest.approx(10 / 40)
    assert sum(n for *_, n in result.recall_by_frequency) >= 40
    assert math.isnan(found_again_truth(torch.zeros(60, dtype=torch.bool), rec, features).precision)


def test_a_child_latent_leaning_on_its_parent_is_absorbed():
    spec = SyntheticSpec(d_in=64, n_features=30, n_hierarchies=2, children_per_parent=1)
    features = make_features(spec)
    (p1, c1), (p2, c2) = features.hierarchy_pairs()
    learned = features.directions.clone()
    learned[c1] = features.directions[c1] + features.directions[p1]  # absorbed: cos with the parent ≈ 0.7
    result = {a.child: a for a in absorption(learned, features, recovery(learned, features, threshold=0.5))}
    assert result[c1].absorbed and result[c1].cos_with_parent > ABSORBED_COS
    assert not result[c2].absorbed and abs(result[c2].cos_with_parent) < ABSORBED_COS


def synthetic_cfg(store_dir, *overrides):
    from hydra import compose, initialize_config_dir

    from test_train import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[
            "data=synthetic", "data.d_in=16", "data.n_features=48", "data.mean_active=4", "n_tokens=6000",
            "eval.n_tokens=1000", "ctx_len=25", "train.batch_size=256", f"store.dir={store_dir}",
            "store.shard_tokens=2000", "logger=none", "dict_ratio=4", "trainer.enable_progress_bar=false", *overrides,
        ])


def test_a_synthetic_store_is_generated_once_with_its_truth_and_a_held_out_set_without_losses(tmp_path):
    from saesweep.config import check_config
    from saesweep.metrics import MetricAccumulator
    from saesweep.synthetic import TRUE_FEATURES_FILE, synthetic_data

    cfg = synthetic_cfg(tmp_path)
    check_config(cfg)  # no document keys needed
    data = synthetic_data(cfg, tmp_path)
    assert data.manifest["complete"] and data.manifest["n_rows"] == 6000 and data.manifest["d_in"] == 16
    rows = torch.cat([data.store.read_shard(s) for s in data.manifest["shards"]])
    features = make_features(data.spec)
    assert torch.equal(rows, torch.cat(list(activation_chunks(data.spec, features, 6000))))
    assert torch.equal(TrueFeatures.load(data.store.path / TRUE_FEATURES_FILE).directions, features.directions)
    assert len(data.held_out) == 40 and data.held_out.tensors[1].shape == (40, 25, 16)
    again = synthetic_data(cfg, tmp_path)
    assert again.store.path == data.store.path and torch.equal(again.held_out.tensors[1], data.held_out.tensors[1])

    from saesweep.sae import ReluSae

    accumulator = MetricAccumulator(16, 64, torch.device("cpu"))
    accumulator.update(ReluSae(16, 64), None, "synthetic", data.held_out[:10])
    metrics = accumulator.compute().metrics
    assert math.isnan(metrics["ce_recovered"]) and math.isnan(metrics["ppl_delta"]) and metrics["fvu"] > 0


def test_training_on_synthetic_activations_recovers_the_true_features(tmp_path, caplog):
    """train() on data=synthetic: the run directory as for text, LM metrics NaN, and the dictionary finds
    most true features (a 4× ReLU/L1 dictionary of 48 true features in 16 dimensions). It trains on the
    rows the generator kept as it wrote the store, reading none back."""
    from saesweep.ground_truth import recovery
    from saesweep.rundir import load_sae
    from saesweep.train import train

    cfg = synthetic_cfg(tmp_path / "store", "n_tokens=60000", "l1_coef=1", "trainer.max_epochs=3",
                        "sae.recipe.lr_warmup_steps=20")
    with caplog.at_level(logging.INFO, logger="saesweep.store"):
        result = train(cfg, tmp_path / "run")
    assert re.search(r"training rows resident on cpu: 60000 rows \(.*\), \d+ shards kept from the harvest, 0 read", caplog.text)
    cfg_json = json.loads((tmp_path / "run" / "cfg.json").read_text())
    assert cfg_json["hook_point"] == "synthetic" and cfg_json["model_name"] is None
    assert cfg_json["dataset"]["n_features"] == 48
    assert math.isnan(result.metrics["ce_recovered"]) and result.metrics["fvu"] < 0.25  # seen: 0.18
    truth = make_features(SyntheticSpec.from_config(cfg.data))
    rec = recovery(load_sae(tmp_path / "run").W_dec, truth)
    assert rec.fraction > 0.5, rec  # seen: 33 of 48 at cos ≥ 0.9, mean max cosine 0.90


@pytest.mark.slow  # three trainings
def test_the_evaluator_judges_synthetic_runs_against_their_truth(tmp_path):
    """Two seeds at 4× and an 8×: ground_truth.json gives each its recovery, and how true the features
    found again by the other seed and in the larger dictionary are."""
    from saesweep.evaluate import WandbSettings, evaluate_sweep
    from saesweep.train import train

    sweep = tmp_path / "sweep"
    for job, (seed, ratio) in enumerate([(0, 4), (1, 4), (0, 8)]):
        cfg = synthetic_cfg(tmp_path / "store", "n_tokens=60000", "l1_coef=1", "trainer.max_epochs=3",
                            "sae.recipe.lr_warmup_steps=20", f"seed={seed}", f"dict_ratio={ratio}")
        train(cfg, sweep / str(job), sweep)
    evaluate_sweep(sweep, wandb_settings=WandbSettings(mode="disabled"))
    report = json.loads((sweep / "evaluation" / "ground_truth.json").read_text())
    runs = {r["run"]: r for r in report["runs"]}
    assert set(runs) == {"0", "1", "2"} and all(r["n_true"] == 48 for r in runs.values())
    assert all(0 < r["recovered"] <= 48 and 0 < r["mean_max_cos"] <= 1 for r in runs.values())
    by_seed, by_size = runs["0"]["by_seed"], runs["0"]["by_size"]
    assert by_seed["found_again"] > 0 and 0 <= by_seed["precision"] <= 1 and 0 <= by_seed["recall"] <= 1
    assert by_size["found_again"] > 0 and runs["2"]["by_size"] is None  # the largest has none larger
    # features two seeds both learn are mostly real ones (seen: precision 0.82, recall 0.67)
    assert by_seed["precision"] > 0.6
    # the stability–fidelity frontier: one setting with two seeds (the 4×)
    import csv

    (row,) = list(csv.DictReader((sweep / "evaluation" / "stability.csv").open()))
    assert row["setting"] == "0,1" and row["n_seeds"] == "2" and row["on_frontier"] == "True"
    assert 0 < float(row["found_by_other_seed"]) <= 1 and float(row["found_by_other_seed_sd"]) == 0
    assert math.isnan(float(row["ce_recovered"])) and 0 < float(row["true_recovered"]) <= 1
    assert (sweep / "evaluation" / "stability_frontier.png").stat().st_size > 1000


def test_a_setting_beaten_on_stability_and_fidelity_is_off_the_frontier():
    from saesweep.evaluate.stability import SettingStability, _on_frontier

    def setting(name, found, ce):
        return SettingStability(name, "relu_l1", 64, 2, found, 0.0, ce, 0.1, 10.0, math.nan)

    a, b, c = setting("a", 0.5, 0.95), setting("b", 0.3, 0.99), setting("c", 0.4, 0.94)
    assert _on_frontier(a, [a, b, c]) and _on_frontier(b, [a, b, c]) and not _on_frontier(c, [a, b, c])


def test_bernoulli_events_at_the_extremes_of_probability():
    """p = 1 fires on every token once, a vanishing p (whose gaps overflow an integer unclamped) never,
    p = 0.3 on about 30 % of the tokens, each token at most once per unit; draws past the block come back
    at token n, for the caller to drop."""
    from saesweep.synthetic import _bernoulli_events

    unit, token = _bernoulli_events(torch.tensor([1.0, 1e-30, 0.3], dtype=torch.float64), 5000,
                                    torch.Generator().manual_seed(0))
    assert token.max() == 5000 and token.min() >= 0
    unit, token = unit[token < 5000], token[token < 5000]
    assert torch.equal(token[unit == 0], torch.arange(5000)) and not (unit == 1).any()
    fired = token[unit == 2]
    assert len(fired.unique()) == len(fired) and len(fired) == pytest.approx(1500, abs=4 * math.sqrt(5000 * 0.21))
    assert fired.min() >= 0 and fired.max() < 5000
