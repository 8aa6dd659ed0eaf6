"""End to end: the Hydra config, a real LM forward pass, Lightning training, the run directory."""

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import REFERENCE_CORPUS, REFERENCE_MODEL, REPO, requires_reference
from saesweep import load_sae
from saesweep.errors import ConfigError
from saesweep.recipe import Recipe
from saesweep.train import train
from saesweep.training import SaeTrainingModule

METRIC_KEYS = {
    "mse", "fvu", "l0", "l1", "dead_fraction", "dense_fraction", "ce_clean", "ce_spliced",
    "ce_zero_ablation", "ce_delta", "ppl_clean", "ppl_spliced", "ppl_delta", "ce_recovered", "n_eval_tokens",
    "fvu_se", "l0_se", "ce_clean_se", "ce_delta_se", "ce_recovered_se", "n_eval_contexts", "dead_window_tokens",
}


def tiny_cfg(tiny_model_dir, corpus_path, store_dir, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                f"model.path={tiny_model_dir}", "data=jsonl", f"data.path={corpus_path}", "layer=1",
                "ctx_len=16", "n_tokens=8000", "eval.n_tokens=800", "train.batch_size=256",
                "eval.every_n_steps=10", "train.checkpoint_every_n_steps=10", "dict_ratio=2",
                "trainer.enable_progress_bar=false", f"store.dir={store_dir}", "store.shard_tokens=1000",
                *overrides,
            ],
        )


def test_tiny_run_writes_the_run_directory_contract(tmp_path, tiny_model_dir, corpus_path):
    cfg = tiny_cfg(tiny_model_dir, corpus_path, tmp_path / "store")
    result = train(cfg, tmp_path)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == METRIC_KEYS and metrics == pytest.approx(result.metrics)
    assert metrics["n_eval_tokens"] == 800
    cfg_json = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg_json["d_in"] == 32 and cfg_json["d_sae"] == 64 and cfg_json["hook_point"] == "blocks.1.hook_resid_post"
    assert cfg_json["tokens_trained"] == 8000 and cfg_json["model_name"] is None
    # whole shards of 62 contexts were read for 8000 tokens of 16-token contexts (500 contexts)
    assert cfg_json["train_contexts"] == 62 * 9
    weights = load_file(tmp_path / "sae_weights.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "W_enc": (32, 64), "b_enc": (64,), "W_dec": (64, 32), "b_dec": (32,)}
    assert all(v.dtype == torch.float32 for v in weights.values())
    torch.testing.assert_close(weights["W_dec"].norm(dim=1), torch.ones(64))
    stats = load_file(tmp_path / "feature_stats.safetensors")
    assert set(stats) == {"frequency", "mean_activation", "max_activation"} and stats["frequency"].shape == (64,)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    # the reloaded SAE is the one that was evaluated
    assert load_sae(tmp_path).run_cfg["d_sae"] == 64


def test_training_beats_the_initial_dictionary(tmp_path, tiny_model_dir, corpus_path):
    store = tmp_path / "store"
    trained = train(tiny_cfg(tiny_model_dir, corpus_path, store, "logger=none"), tmp_path / "trained").metrics
    barely = train(
        tiny_cfg(tiny_model_dir, corpus_path, store, "logger=none", "n_tokens=256", "sae.recipe.lr=1e-9"), tmp_path / "init"
    ).metrics
    # seen: 0.49 against 0.82 (relu_l1's 0.1 encoder start trains sparser on this random model: L0 16)
    assert trained["fvu"] < 0.65 * barely["fvu"]
    assert trained["mse"] < barely["mse"]


@pytest.mark.parametrize("speed_options", [["trainer.precision=bf16-mixed"], ["train.compile=true"]])
def test_speed_options_train_as_well_as_the_plain_step(tmp_path, tiny_model_dir, corpus_path, speed_options):
    store = tmp_path / "store"
    plain = train(tiny_cfg(tiny_model_dir, corpus_path, store, "logger=none"), tmp_path / "plain").metrics
    fast = train(tiny_cfg(tiny_model_dir, corpus_path, store, "logger=none", *speed_options), tmp_path / "fast").metrics
    # compiled float32 is the same arithmetic, fused (seen: equal to 1e-8); bf16 matmuls round to 8
    # mantissa bits (seen: fvu 0.25024 vs 0.25015)
    assert fast["fvu"] == pytest.approx(plain["fvu"], rel=0.01 if "bf16" in speed_options[0] else 1e-5)
    assert load_sae(tmp_path / "fast").W_dec.dtype == torch.float32  # weights stay float32 either way


def test_resident_and_streamed_activations_train_the_same_dictionary(tmp_path, tiny_model_dir, corpus_path, caplog):
    """The resident run harvests the store and trains from the rows its harvest kept, reading none back; the
    streamed run reads the store: the same dictionary."""
    store = tmp_path / "store"
    for buffer in ("true", "false"):
        with caplog.at_level(logging.INFO, logger="saesweep.store"):
            train(tiny_cfg(tiny_model_dir, corpus_path, store, "logger=none", f"store.device_buffer={buffer}"), tmp_path / buffer)
    assert "8000 rows (0.98 MiB), 9 shards kept from the harvest, 0 read from the store" in caplog.text
    resident, streamed = (load_file(tmp_path / buffer / "sae_weights.safetensors") for buffer in ("true", "false"))
    assert all(torch.equal(resident[name], streamed[name]) for name in resident)


@pytest.mark.parametrize(
    "override, message",
    [
        ("dict_ratio=0", "dict_ratio=0 must be > 0"),
        ("dict_ratio=1.01", "non-integer d_sae"),
        ("l1_coef=-1", "l1_coef=-1 must be ≥ 0"),
        ("ctx_len=1", "ctx_len=1 must be ≥ 2"),
        ("ctx_len=100", "ctx_len=100 exceeds the model's context length n_ctx=64"),
        ("n_tokens=10", "less than one batch"),
        ("hook=resid_mid_typo", "is not a hook of this model"),
        ("layer=7", "layer 7 .* out of range"),
        ("train.max_bad_steps=0", "train.max_bad_steps=0 must be a positive integer"),
        ("sae.recipe.lr=0", r"sae.recipe.lr=0 is not allowed: Adam's learning rate \(> 0\)"),
        ("sae.recipe.lr_warmup_steps=-1", r"sae.recipe.lr_warmup_steps=-1 is not allowed: linear warm-up steps \(integer ≥ 0"),
        ("train.lr_warmup_max_fraction=0", r"train.lr_warmup_max_fraction=0 must be in \(0, 1\]"),
        ("sae.recipe.lr_decay_fraction=1.5", r"sae.recipe.lr_decay_fraction=1.5 is not allowed: .*\(\[0, 1\]\)"),
        ("sae.recipe.grad_clip_norm=0", r"sae.recipe.grad_clip_norm=0 is not allowed: .* \(> 0\), or null for none"),
        ("+sae.recipe.momentum=0.9", r"sae.recipe has unknown keys \['momentum'\]; its keys: lr: "),
        ("train.lr_warmup_max_fraction=0.9", "train.lr_warmup_max_fraction=0.9 and sae.recipe.lr_decay_fraction=0.2 sum "
                                             "to more than 1"),
        ("store.dir=/proc/saesweep-store", r"store.dir='/proc/saesweep-store' is not writable"),
        ("seed=abc", "seed='abc' is not an integer"),
        ("data.seed=-1", r"data.seed=-1 must be an integer in \[0, 2\^32\)"),
        ("store.buffer_tokens=0", "store.buffer_tokens=0 must be a positive integer"),
        ("data.prepend_bos=maybe", "data.prepend_bos='maybe' is not allowed; allowed: true or false"),
        ("store.device_buffer=gpu", "store.device_buffer='gpu' is not allowed; allowed: auto, true or false"),
        ("train.adam_betas=[0.9]", r"train.adam_betas=\[0.9\] is not allowed; allowed: two numbers in \[0, 1\)"),
        ("layer=two", "layer='two' is not an integer"),
        ("target_l0=0", "target_l0=0 must be > 0, or null"),
        ("n_tokens=100000000000", r"store.dir=.* has .* free, but the activation store needs up to 11920.93 GiB more "
                                  r"\(n_tokens=100000000000 × d_in=32 × 4 bytes of float32\)"),
    ],
)
def test_bad_config_fails_before_training_with_a_clear_message(tmp_path, tiny_model_dir, corpus_path, override, message):
    cfg = tiny_cfg(tiny_model_dir, corpus_path, tmp_path / "store", "logger=none", override)
    with pytest.raises(ConfigError, match=message):
        train(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@requires_reference()
def test_reference_sweep_then_evaluation_and_reports(tmp_path):
    """The whole flow on the reference model, scaled down: a two-size multirun harvesting once, then
    `evaluate.py` with feature reports for both runs."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "train.py", f"model.path={REFERENCE_MODEL}", "data=jsonl", f"data.path={REFERENCE_CORPUS}",
         "dict_ratio=1,2", "n_tokens=100000", "eval.n_tokens=5000", "trainer.enable_progress_bar=false",
         f"store.dir={tmp_path / 'store'}",
         "-m", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, ratio in (("0", 1), ("1", 2)):
        run = sweep / job
        for name in ("sae_weights.safetensors", "cfg.json", "metrics.json", "feature_stats.safetensors", "checkpoints/last.ckpt"):
            assert (run / name).is_file(), name
        assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
        cfg = json.loads((run / "cfg.json").read_text())
        assert cfg["dict_ratio"] == ratio and cfg["d_sae"] == 256 * ratio
        m = json.loads((run / "metrics.json").read_text())
        assert m["ce_zero_ablation"] > m["ce_spliced"] > m["ce_clean"]
        assert m["fvu"] < 0.6
    assert json.loads((sweep / "1" / "metrics.json").read_text())["fvu"] < 0.5
    logs = [(sweep / job / "train.log").read_text() for job in ("0", "1")]
    assert "activation store harvested" in logs[0] and "activation store reused" in logs[1]

    proc = subprocess.run(
        [sys.executable, "evaluate.py", f"sweep_dir={sweep}", "report.top_n=3", "report.n_tokens=5000"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluation = sweep / "evaluation"
    for name in ("mcs.json", "summary.csv", "mcs_hist.png", "features_found.png", "mcs_matrix.png", "pareto.png"):
        assert (evaluation / name).stat().st_size > 0, name
    pairs = json.loads((evaluation / "mcs.json").read_text())["pairs"]
    assert {(p["a"], p["b"]) for p in pairs} == {("0", "1"), ("1", "0")}
    for job in ("0", "1"):
        features = json.loads((sweep / job / "report" / "features.json").read_text())
        # a run of a sweep: its features found again in the other run (up to 3), else a random alive sample
        selection = features["selection"]
        assert 1 <= selection["n_features"] == len(features["features"]) <= 3
        if selection["method"] == "found_again":
            assert all(f["found_again"] for f in features["features"])
        else:
            assert selection["method"] == "random"  # alive: 1e-4 ≤ frequency ≤ 0.1, few so early in training
            assert all(1e-4 <= f["frequency"] <= 0.1 for f in features["features"])
        assert (sweep / job / "report" / "index.html").stat().st_size > 0


def test_runs_of_a_sweep_start_from_unrelated_dictionaries(tiny_model_dir, corpus_path, tmp_path):
    """Shared initial rows would make a 2× and a 4× dictionary overlap before any training."""
    from saesweep.evaluate import mcs
    from saesweep.sae import ReluSae
    from saesweep.train import init_generator

    cfg = tiny_cfg(tiny_model_dir, corpus_path, tmp_path)
    small = ReluSae(32, 64, generator=init_generator(cfg, 64))
    large = ReluSae(32, 128, generator=init_generator(cfg, 128))
    again = ReluSae(32, 64, generator=init_generator(cfg, 64))
    assert torch.equal(small.W_dec, again.W_dec)  # reproducible from the seed
    assert mcs(small.W_dec, large.W_dec).max() < 0.99

def test_output_directory_under_a_file_is_a_clear_error(tmp_path, tiny_model_dir, corpus_path):
    (tmp_path / "file").write_text("")
    cfg = tiny_cfg(tiny_model_dir, corpus_path, tmp_path / "store", "logger=none")
    with pytest.raises(ConfigError, match=r"output directory .*'.*/file/run' cannot be a directory: .*/file is a file"):
        train(cfg, tmp_path / "file" / "run")


def test_unknown_model_name_lists_close_matches():
    from saesweep.lm import load_model

    with pytest.raises(ConfigError, match=r"model.name='EleutherAI/pythia-70m-dedupd' is not a model .*"
                                          r"close matches: EleutherAI/pythia-70m-deduped"):
        load_model("EleutherAI/pythia-70m-dedupd", None, torch.device("cpu"))


def test_train_dead_fraction_counts_features_silent_over_the_window(tmp_path):
    """train/dead_fraction: features that did not fire on the last dead_window_tokens training tokens
    (all tokens so far while fewer were seen). Constructed: feature 0 fires on every batch, feature 1
    on the first batch only, feature 2 never; batches of 4 tokens, a window of 8."""
    import csv

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from saesweep.sae import ReluSae
    from saesweep.training import SaeTrainingModule

    first = torch.tensor([[1.0, 1.0]] * 4)  # features 0 and 1 fire
    later = torch.tensor([[1.0, -1.0]] * 4)  # feature 0 only

    def dead_fractions(window: int) -> list[float]:
        sae = ReluSae(2, 3, l1_coef=0.0)
        with torch.no_grad():
            sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
            sae.b_enc.copy_(torch.tensor([0.0, 0.0, -1e6]))
            sae.b_dec.zero_()
        module = SaeTrainingModule(
            [sae], metric_prefixes=[""], act_scale=1.0, recipes=[Recipe(1e-12, 1, 0.0, None)],
            adam_betas=(0.9, 0.999), total_steps=5, max_bad_steps=1, model=None, hook_point="h",
            resume_key={}, dead_window_tokens=window,
        )
        logger = CSVLogger(tmp_path, name=f"window_{window}")
        trainer = L.Trainer(max_epochs=1, logger=logger, log_every_n_steps=1, limit_val_batches=0,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        batches = torch.stack([first, later, later, later, later])
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        rows = csv.DictReader((Path(logger.log_dir) / "metrics.csv").open())
        return [float(r["train/dead_fraction"]) for r in rows if r.get("train/dead_fraction")]

    # tokens since fired after steps 1..5: feature 1: 0, 4, 8, 12, 16; feature 2: 4, 8, 12, 16, 20
    assert dead_fractions(8) == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert dead_fractions(10**9) == pytest.approx([1 / 3] * 5)  # the whole run: feature 1 fired once, alive


def test_each_member_counts_dead_features_over_its_recipes_window():
    """sae.recipe.dead_window_tokens sets a member's own window; a recipe without one takes the shared
    train.dead_window_tokens. Both members' features went 0, 5, 50 and 500 tokens without firing."""
    from saesweep.sae import ReluSae
    from saesweep.training import SaeTrainingModule

    module = SaeTrainingModule(
        [ReluSae(2, 4), ReluSae(2, 4)], metric_prefixes=["a/", "b/"], act_scale=1.0,
        recipes=[Recipe(1e-3, 0, 0.0, None, dead_window_tokens=40), Recipe(1e-3, 0, 0.0, None)],
        adam_betas=(0.9, 0.999), total_steps=5, max_bad_steps=1, model=None, hook_point="h",
        resume_key={}, dead_window_tokens=400,
    )
    module.tokens_seen.fill_(1000)
    module.tokens_since_fired = [torch.tensor([0, 5, 50, 500])] * 2
    assert module.dead_features([0, 1]).tolist() == [[False, False, True, True], [False, False, False, True]]
    assert module.dead_features([1]).tolist() == [[False, False, False, True]]
    module.tokens_seen.fill_(30)  # fewer tokens seen than either window: silent on all of them is dead
    assert module.dead_features([0, 1]).tolist() == [[False, False, True, True]] * 2


def test_a_recipes_dead_window_must_be_a_positive_integer_or_null():
    from saesweep.recipe import recipe_problem

    recipe = {"lr": 1e-3, "lr_warmup_steps": 0, "lr_decay_fraction": 0.0, "grad_clip_norm": None}
    assert recipe_problem(recipe) is None and Recipe.from_config(recipe).dead_window_tokens is None  # absent: train's
    assert recipe_problem({**recipe, "dead_window_tokens": 200_000}) is None
    assert recipe_problem({**recipe, "dead_window_tokens": 0.5}) == (
        "sae.recipe.dead_window_tokens=0.5 is not allowed: a latent is dead once silent for this many training "
        "tokens, for AuxK, resampling and train/dead_fraction (integer > 0), or null (or absent) for "
        "train.dead_window_tokens")


@pytest.mark.parametrize(
    "architecture, extra",
    [("relu_l1", []), ("topk", ["sae.k=8"]), ("batchtopk", ["sae.k=8"]), ("jumprelu", []),
     ("matryoshka_batchtopk", ["sae.k=8"]), ("gated", [])],
)
def test_every_architecture_trains_saves_and_reloads(tmp_path, tiny_model_dir, corpus_path, architecture, extra):
    from saesweep.lm import load_model
    from saesweep.metrics import HeldOutSet, evaluate
    from saesweep.sae import ARCHITECTURES

    cfg = tiny_cfg(tiny_model_dir, corpus_path, tmp_path / "store", "logger=none", f"sae={architecture}", *extra)
    result = train(cfg, tmp_path / "run")
    cfg_json = json.loads((tmp_path / "run" / "cfg.json").read_text())
    assert cfg_json["sae"]["architecture"] == architecture
    assert cfg_json["sae"].keys() - {"architecture", "recipe"} == ARCHITECTURES[architecture].hyperparameters.keys()
    assert cfg_json["sae"]["recipe"] == OmegaConf.to_container(cfg.sae.recipe)  # the architecture's own recipe
    assert set(cfg_json["sae"]["recipe"]) == {"lr", "lr_warmup_steps", "lr_decay_fraction", "grad_clip_norm",
                                              "dead_window_tokens"}
    saved_as = "jumprelu" if "batchtopk" in architecture else architecture
    # cfg.json's "architecture" is SAELens's name of what the weights hold
    assert cfg_json["architecture"] == {"relu_l1": "standard"}.get(saved_as, saved_as)
    sae = load_sae(tmp_path / "run")
    assert sae.architecture == saved_as
    if architecture == "topk":
        assert result.metrics["l0"] == pytest.approx(8)
    elif "batchtopk" in architecture:
        # the saved threshold is a running mean over 32 steps of a changing SAE: near k, not at it
        assert 4 <= result.metrics["l0"] <= 16
    assert 0 < result.metrics["fvu"] < 1 and math.isfinite(result.metrics["ce_recovered"])
    # the reloaded SAE is the evaluated one: the same metrics from the same held-out set
    model = load_model(None, str(tiny_model_dir), torch.device("cpu"))
    from saesweep.data import context_source
    contexts = context_source(cfg_json["dataset"], model.tokenizer, 16).held_out_contexts(50).tokens
    again = evaluate(sae, model, cfg_json["hook_point"], HeldOutSet.build(model, contexts, cfg_json["hook_point"], 64), 64)
    assert again.metrics["fvu"] == pytest.approx(result.metrics["fvu"], rel=1e-4)
    assert again.metrics["l0"] == pytest.approx(result.metrics["l0"], rel=1e-4)
    # and a feature report of it: the activations shown are the SAE's (TopK: from the full encoding)
    from saesweep.report import ReportSettings, build_report
    settings = ReportSettings(n_tokens=800, n_top_examples=2, n_bins=2, per_bin=1, direction_contexts=4,
                              direction_min_count=1, batch_contexts=64, device="cpu", top_n=3)
    report = build_report(tmp_path / "run", settings, model=model)
    first = report.data["features"][0]
    # features.json keeps four significant digits: a relative error up to 5e-4
    assert first["max_activation"] == pytest.approx(float(again.feature_stats["max_activation"][first["id"]]), rel=5e-4)


def test_a_periodic_evaluation_on_the_last_step_is_not_repeated(tmp_path, tiny_model_dir, corpus_path, monkeypatch):
    """The final metrics are the last periodic evaluation's when it fell on the last step (32 of 8000 tokens
    at batch 256: every 8 steps), not a second pass over the held-out set; otherwise one more pass at the end."""
    steps = []
    evaluate = SaeTrainingModule.on_validation_epoch_end

    def recording(module):
        steps.append(module.global_step)
        evaluate(module)

    monkeypatch.setattr(SaeTrainingModule, "on_validation_epoch_end", recording)
    train(tiny_cfg(tiny_model_dir, corpus_path, tmp_path / "store", "eval.every_n_steps=8"), tmp_path / "a")
    assert steps == [8, 16, 24, 32]
    steps.clear()
    train(tiny_cfg(tiny_model_dir, corpus_path, tmp_path / "store", "eval.every_n_steps=10"), tmp_path / "b")
    assert steps == [10, 20, 30, 32]


def test_the_progress_bar_is_redrawn_at_most_every_interval_and_on_the_last_batch(tmp_path, tiny_model_dir, corpus_path, monkeypatch):
    """A run with the progress bar on: train.py's bar draws the first batch, then waits min_interval_s, and
    always draws an epoch's last batch (so the bar ends full)."""
    from lightning.pytorch.callbacks import RichProgressBar

    from saesweep import train as train_module

    drawn = []
    monkeypatch.setattr(RichProgressBar, "on_train_batch_end", lambda self, t, m, o, b, batch_idx: drawn.append(batch_idx))
    monkeypatch.setattr(train_module.ThrottledProgressBar, "min_interval_s", 3600.0)
    train(tiny_cfg(tiny_model_dir, corpus_path, tmp_path / "store", "logger=none", "trainer.enable_progress_bar=true"), tmp_path)
    assert drawn == [0, 31]  # 32 batches: ceil(8000 / 256)
