"""The post-hoc evaluator: chunked MCS, the random baseline, failed and incomparable runs, every output
file, the W&B offline run and the Hydra app. Sweeps are built from constructed dictionaries (no model)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from saesweep.errors import ConfigError
from saesweep.evaluate import (
    MCS_FILE,
    PLOT_FILES,
    SUMMARY_FILE,
    EvalSettings,
    WandbSettings,
    console_table,
    evaluate_sweep,
    mcs,
    mcs_both_ways,
)
from saesweep.metrics import EvalResult
from saesweep.rundir import recorded_wandb_group, write_run_dir
from saesweep.sae import ReluSae

REPO = Path(__file__).resolve().parents[1]
HOOK = "blocks.2.hook_resid_post"
D_IN = 32
NO_WANDB = WandbSettings(mode="disabled")


def brute_force_mcs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = (a @ b.T) / (a.norm(dim=1)[:, None] * b.norm(dim=1)[None, :])
    return cos.max(dim=1).values


def true_features(n: int = 512, d: int = D_IN, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(
        torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1
    )


def noisy_subset(features: torch.Tensor, n: int, noise: float = 0.02, seed: int = 1) -> torch.Tensor:
    """A "trained" dictionary: the first n true directions, each perturbed (cosine ≈ 0.99 to the truth)."""
    g = torch.Generator().manual_seed(seed)
    return features[:n] + noise * torch.randn(n, features.shape[1], generator=g)


def make_run(
    run_dir: Path,
    decoder: torch.Tensor,
    *,
    hook_point: str = HOOK,
    l1_coef: float = 2.0,
    dead: int = 0,
    fvu: float = 0.2,
    sae_keys: dict | None = None,
) -> None:
    d_sae, d_in = decoder.shape
    sae = ReluSae(d_in, d_sae)
    with torch.no_grad():
        sae.W_dec.copy_(decoder)
        sae.W_enc.copy_(decoder.T)
    cfg = {
        "architecture": "relu_l1",
        "d_in": d_in,
        "d_sae": d_sae,
        "dict_ratio": d_sae / d_in,
        "l1_coef": l1_coef,
        "hook_point": hook_point,
        "model_name": None,
        "model_path": "/models/fake",
    }
    if sae_keys:
        cfg |= {"architecture": sae_keys["architecture"], "sae": sae_keys}
    metrics = {
        "mse": 1.5,
        "fvu": fvu,
        "l0": 40.0 / d_sae * 32,
        "l1": 12.0,
        "dead_fraction": dead / d_sae,
        "ce_delta": 0.1 * fvu,
        "ce_recovered": 0.9,
        "n_eval_tokens": 1000.0,
    }
    frequency = torch.full((d_sae,), 0.05)
    frequency[:dead] = 0.0
    stats = {"frequency": frequency, "mean_activation": frequency * 10, "max_activation": frequency * 40}
    write_run_dir(run_dir, sae, cfg, EvalResult(metrics, stats))


def write_hydra_record(run_dir: Path, overrides: list[str]) -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def read_summary(out_dir: Path) -> dict[str, dict[str, str]]:
    with open(out_dir / SUMMARY_FILE, newline="") as f:
        return {row["run"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def nested_sweep(tmp_path_factory) -> Path:
    """Dictionaries of 32, 64 and 128 features sharing true directions (each a subset of the next,
    with independent noise), plus one failed job with only Hydra's record, plus one with cfg.json
    but no weights."""
    sweep = tmp_path_factory.mktemp("sweep")
    features = true_features()
    for job, n in enumerate((32, 64, 128)):
        make_run(sweep / str(job), noisy_subset(features, n, seed=job), dead=job, fvu=0.3 - 0.1 * job)
        write_hydra_record(sweep / str(job), [f"dict_ratio={n // D_IN}"])
    write_hydra_record(sweep / "3", ["dict_ratio=8"])
    (sweep / "4").mkdir()
    (sweep / "4" / "cfg.json").write_text(
        json.dumps(
            {"architecture": "relu_l1", "d_in": D_IN, "d_sae": 512, "dict_ratio": 16, "hook_point": HOOK}
        )
    )
    return sweep


@pytest.fixture(scope="module")
def nested_evaluation(nested_sweep):
    return evaluate_sweep(nested_sweep, EvalSettings(chunk_size=24), WandbSettings(mode="offline"))


@pytest.mark.parametrize("chunk_size", [7, 16, 100])
def test_chunked_mcs_matches_brute_force(chunk_size):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 16, generator=g), torch.randn(53, 16, generator=g) * 3.0
    a_to_b, b_to_a = mcs_both_ways(a, b, chunk_size)
    torch.testing.assert_close(a_to_b, brute_force_mcs(a, b), rtol=0, atol=1e-6)
    torch.testing.assert_close(b_to_a, brute_force_mcs(b, a), rtol=0, atol=1e-6)
    torch.testing.assert_close(mcs(a, b, chunk_size), a_to_b)


def test_mcs_against_a_superset_of_its_rows_is_one():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(40, 24, generator=g)
    superset = torch.cat([torch.randn(100, 24, generator=g), 5.0 * a[torch.randperm(40, generator=g)]])
    values = mcs(a, superset, chunk_size=32)
    torch.testing.assert_close(values, torch.ones(40), rtol=0, atol=1e-5)
    assert values.max() <= 1.0  # never above 1 by rounding (it would fall outside the histogram)
    assert mcs(superset, a, chunk_size=32)[:100].max() < 0.95  # unrelated random rows are not found


def test_mcs_rejects_different_widths():
    with pytest.raises(ValueError, match="16 vs 8"):
        mcs(torch.randn(4, 16), torch.randn(4, 8))


def test_random_baseline_is_far_below_trained_overlap(nested_evaluation):
    report = nested_evaluation.report
    assert report["comparison_groups"][0]["largest"] == "2"
    pairs = {(p["a"], p["b"]): p for p in report["pairs"]}
    assert len(pairs) == 6  # 3 finished runs, every ordered pair
    small_to_large = pairs["0", "2"]
    assert small_to_large["mean_mcs"] > 0.98
    assert small_to_large["found"]["0.9"] == {"count": 32, "fraction": 1.0}
    assert small_to_large["baseline"]["mean_mcs"] < 0.7
    assert small_to_large["baseline"]["found"]["0.9"]["count"] == 0
    # the large dictionary's extra directions are not in the small one: only its first 32 are found
    assert pairs["2", "0"]["found"]["0.9"]["count"] == 32
    assert pairs["2", "0"]["found"]["0.9"]["fraction"] == pytest.approx(0.25)
    run_1 = report["runs"]["1"]
    assert run_1["found_again"]["in_largest"] == 64
    assert run_1["found_again"]["in_runs"] == {"0": 32, "2": 64}
    assert run_1["dead_features"] == 1
    assert report["runs"]["2"]["found_again"]["in_largest"] is None  # it is the largest
    assert report["headline"]["found_in_largest/1"] == 64
    assert report["headline"]["baseline_found_in_largest/1"] == 0
    assert (
        report["headline"]["baseline_mean_mcs_to_largest/1"]
        < 0.7
        < report["headline"]["mean_mcs_to_largest/1"]
    )


def test_failed_jobs_are_named_and_the_others_evaluated(nested_evaluation):
    report = nested_evaluation.report
    assert sorted(report["failed"]) == ["3", "4"]
    assert "cfg.json is missing" in report["failed"]["3"]
    assert "sae_weights.safetensors is missing" in report["failed"]["4"]
    assert report["runs"]["3"] == {
        "status": "failed",
        "reason": report["failed"]["3"],
        "overrides": "dict_ratio=8",
    }
    assert report["headline"]["n_runs"] == 5 and report["headline"]["n_failed"] == 2
    summary = read_summary(nested_evaluation.out_dir)
    assert list(summary) == ["0", "1", "2", "3", "4"]
    assert [summary[r]["status"] for r in summary] == ["ok", "ok", "ok", "failed", "failed"]
    assert summary["3"]["overrides"] == "dict_ratio=8" and "cfg.json is missing" in summary["3"]["failure"]
    assert summary["4"]["d_sae"] == "512" and summary["4"]["fvu"] == ""  # hyperparameters from its cfg.json


def test_summary_has_hyperparameters_and_every_metric(nested_evaluation):
    summary = read_summary(nested_evaluation.out_dir)
    row = summary["1"]
    assert row["d_sae"] == "64" and row["dict_ratio"] == "2.0" and row["l1_coef"] == "2.0"
    assert row["architecture"] == "relu_l1" and row["hook_point"] == HOOK
    assert float(row["fvu"]) == pytest.approx(0.2) and float(row["n_eval_tokens"]) == 1000.0
    for key in ("mse", "fvu", "l0", "l1", "dead_fraction", "ce_delta", "ce_recovered", "n_eval_tokens"):
        assert key in row
    assert row["found_in_largest"] == "64" and row["baseline_found_in_largest"] == "0"
    assert row["largest_in_group"] == "2" and row["dead_features"] == "1"


def test_every_output_file_is_written(nested_evaluation):
    out = nested_evaluation.out_dir
    assert out == Path(nested_evaluation.report["sweep_dir"]) / "evaluation"
    assert json.loads((out / MCS_FILE).read_text()) == json.loads(json.dumps(nested_evaluation.report))
    for file in PLOT_FILES.values():
        data = (out / file).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", file
        height, width, _ = matplotlib.image.imread(out / file).shape
        assert height >= 300 and width >= 500, (file, height, width)


def test_wandb_offline_run_is_written_in_the_evaluation_dir(nested_evaluation):
    runs = list((nested_evaluation.out_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb")) and runs[0].joinpath("files").is_dir()


def test_a_sweep_without_comparable_runs_says_so_and_is_still_summarised(tmp_path, caplog):
    make_run(tmp_path / "0", true_features(32), hook_point=HOOK)
    make_run(tmp_path / "1", true_features(64), hook_point="blocks.3.hook_resid_post")
    evaluation = evaluate_sweep(tmp_path, wandb_settings=NO_WANDB)
    assert "no two runs of" in caplog.text and "blocks.3.hook_resid_post d_in=32 model=/models/fake: 1" in caplog.text
    assert evaluation.report["pairs"] == [] and len(evaluation.summary) == 2
    assert all((evaluation.out_dir / f).stat().st_size > 1000 for f in PLOT_FILES.values())


def test_runs_with_different_hook_points_or_widths_are_never_compared(tmp_path):
    features = true_features()
    make_run(tmp_path / "0", noisy_subset(features, 32), hook_point=HOOK)
    make_run(tmp_path / "1", noisy_subset(features, 64), hook_point=HOOK)
    make_run(tmp_path / "2", noisy_subset(features, 64), hook_point="blocks.3.hook_resid_post")
    make_run(tmp_path / "3", true_features(64, d=16), hook_point=HOOK)
    evaluation = evaluate_sweep(tmp_path, wandb_settings=NO_WANDB)
    report = evaluation.report
    assert {(p["a"], p["b"]) for p in report["pairs"]} == {("0", "1"), ("1", "0")}
    assert [g["runs"] for g in report["comparison_groups"]] == [["0", "1"], ["2"], ["3"]]
    assert "never compared" in report["not_compared"]
    assert report["runs"]["2"]["found_again"] == {
        "threshold": 0.9,
        "largest": "2",
        "in_largest": None,
        "in_runs": {},
        "matched_in_runs": {},
        "larger_same_seed": None,
        "other_seed": None,
    }
    summary = read_summary(evaluation.out_dir)
    assert len({summary[r]["comparison_group"] for r in summary}) == 3
    assert "d_in=16" in summary["3"]["comparison_group"]


def test_largest_dictionary_tie_goes_to_the_first_run_in_name_order(tmp_path):
    features = true_features()
    for job in (10, 9, 2):  # natural order: 2, 9, 10
        make_run(tmp_path / str(job), noisy_subset(features, 64 if job != 2 else 32, seed=job))
    report = evaluate_sweep(tmp_path, wandb_settings=NO_WANDB).report
    assert report["comparison_groups"][0] == {
        "label": report["runs"]["9"]["comparison_group"],
        "runs": ["2", "9", "10"],
        "largest": "9",
    }


def test_a_sweep_dir_without_runs_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no-such-dir"):
        evaluate_sweep(tmp_path / "no-such-dir", wandb_settings=NO_WANDB)
    (tmp_path / "empty" / "logs").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds no run directories"):
        evaluate_sweep(tmp_path / "empty", wandb_settings=NO_WANDB)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="chunk_size=0"):
        EvalSettings(chunk_size=0)
    with pytest.raises(ConfigError, match="1.5"):
        EvalSettings(found_threshold=1.5)
    with pytest.raises(ConfigError, match="'gpu'"):
        EvalSettings(device="gpu")
    with pytest.raises(ConfigError, match="'onlin'"):
        WandbSettings(mode="onlin")


def test_evaluation_joins_the_training_runs_wandb_group(tmp_path):
    sweep = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "0" / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  sweep:\n    dir: multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}\n"
        f"  runtime:\n    cwd: {tmp_path}\n"
    )
    assert recorded_wandb_group([sweep / "0"], sweep.absolute()) == "multirun/2026-01-01/12-00-00"
    assert recorded_wandb_group([], sweep) == str(sweep)


def test_hydra_app_end_to_end(tmp_path):
    features = true_features()
    for job, n in enumerate((32, 64)):
        make_run(tmp_path / "sweep" / str(job), noisy_subset(features, n, seed=job))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPO / "evaluate.py"), f"sweep_dir={tmp_path / 'sweep'}", "chunk_size=16"]
    done = subprocess.run(
        command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "sweep" / "evaluation"
    report = json.loads((out / MCS_FILE).read_text())
    assert report["runs"]["0"]["found_again"]["in_largest"] == 32
    assert (out / SUMMARY_FILE).is_file() and all(
        (out / f).stat().st_size > 1000 for f in PLOT_FILES.values()
    )
    assert (out / "evaluate.log").is_file() and (out / ".hydra" / "config.yaml").is_file()
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert not (tmp_path / "outputs").exists()

    missing = tmp_path / "no-such-sweep"
    done = subprocess.run(
        [*command[:2], f"sweep_dir={missing}"],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "no-such-sweep" in done.stderr and "is not a directory" in done.stderr
    assert not missing.exists()


def test_pareto_plot_draws_error_bars_and_marks_architectures(tmp_path):
    from saesweep import plots

    points = [
        plots.ParetoPoint("0", 32.0, 0.17, 0.25, ("k", 32), 1, 0.01, 0.002, 0.01, "topk"),
        plots.ParetoPoint("1", 30.0, 0.23, 0.40, ("l1_coef", 2.0), 4, 0.2, 0.003, 0.02, "relu_l1"),
        plots.ParetoPoint("2", 31.0, 0.15, 0.20, None, 4, math.nan, math.nan, math.nan, "topk"),  # no SEs: no bars
        plots.ParetoPoint("3", 12.0, 0.31, 0.50, ("l1_coef", 20.0), 4, 0.2, 0.003, 0.02, "relu_l1"),
    ]
    plots.plot_pareto(tmp_path / "mixed.png", points)  # two knobs: no colour scale across them
    plots.plot_pareto(tmp_path / "one.png", points[:1])
    plots.plot_pareto(tmp_path / "l1.png", [points[1], points[3]])  # one knob: coloured by its value
    for name in ("mixed.png", "one.png", "l1.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / name).stat().st_size > 10_000


def test_summary_has_a_column_for_every_architecture_key(tmp_path):
    torch.manual_seed(0)
    make_run(tmp_path / "sweep" / "0", torch.randn(32, 16), sae_keys={"architecture": "relu_l1", "l1_coef": 2.0})
    recipe = {"lr": 2e-3, "lr_warmup_steps": 0, "lr_decay_fraction": 0.0, "grad_clip_norm": None}
    make_run(tmp_path / "sweep" / "1", torch.randn(64, 16),
             sae_keys={"architecture": "topk", "k": 8, "aux_coef": 0.03, "recipe": recipe})
    evaluation = evaluate_sweep(tmp_path / "sweep", wandb_settings=WandbSettings(mode="disabled"))
    rows = read_summary(tmp_path / "sweep" / "evaluation")
    assert (rows["0"]["architecture"], rows["0"]["sae.l1_coef"], rows["0"]["sae.k"]) == ("relu_l1", "2.0", "")
    assert (rows["1"]["architecture"], rows["1"]["sae.k"], rows["1"]["sae.aux_coef"]) == ("topk", "8", "0.03")
    # the recipe's keys in their own columns, empty for a run that records none
    assert (rows["1"]["sae.recipe.lr"], rows["1"]["sae.recipe.lr_warmup_steps"], rows["0"]["sae.recipe.lr"]) == ("0.002", "0", "")
    # each architecture's own sparsity knob, in one pair of columns
    assert [(rows[r]["sparsity_knob"], rows[r]["sparsity"]) for r in "01"] == [("l1_coef", "2.0"), ("k", "8")]
    table = console_table(evaluation.summary, 0.9).splitlines()
    assert table[0].startswith("run  architecture  d_sae  L0")
    assert table[1].split()[:3] == ["0", "relu_l1", "32"] and "of 32" in table[1] and table[2].endswith("(the largest)")


def write_sparsify_dir(directory: Path, decoder: torch.Tensor, k: int = 4) -> Path:
    """A dictionary in EleutherAI sparsify's layout (cfg.json + sae.safetensors with encoder.weight)."""
    from saesweep.io import atomic_write_safetensors

    d_sae, d_in = decoder.shape
    directory.mkdir(parents=True)
    (directory / "cfg.json").write_text(json.dumps({"k": k, "num_latents": d_sae, "d_in": d_in, "activation": "topk"}))
    atomic_write_safetensors(directory / "sae.safetensors", {
        "encoder.weight": decoder.clone(), "encoder.bias": torch.zeros(d_sae), "W_dec": decoder.clone(),
        "b_dec": torch.zeros(d_in)})
    return directory


def test_released_dictionaries_join_the_comparison_and_others_are_refused(tmp_path):
    torch.manual_seed(0)
    truth = torch.randn(64, 16)
    make_run(tmp_path / "sweep" / "0", truth[:32] + 0.01 * torch.randn(32, 16))
    released = write_sparsify_dir(tmp_path / "released" / "layers.2", truth)
    evaluation = evaluate_sweep(tmp_path / "sweep", wandb_settings=WandbSettings(mode="disabled"),
                                compare_with=[released])
    names = [run.name for run in evaluation.runs]
    assert names == ["0", "released:layers.2"]
    rows = read_summary(tmp_path / "sweep" / "evaluation")
    # the released 64-feature dictionary is the largest: the run's 32 features are found again in it
    assert rows["0"]["largest_in_group"] == "released:layers.2" and rows["0"]["found_in_largest"] == "32"
    assert rows["released:layers.2"]["architecture"] == "topk"
    with pytest.raises(ConfigError, match=r"compare_with=.*wide' has d_in=8, the sweep's runs d_in=16"):
        evaluate_sweep(tmp_path / "sweep", wandb_settings=WandbSettings(mode="disabled"),
                       compare_with=[write_sparsify_dir(tmp_path / "wide", torch.randn(32, 8))])
    other_hook = tmp_path / "other_hook"
    make_run(other_hook, truth, hook_point="blocks.3.hook_resid_post")
    with pytest.raises(ConfigError, match="reads hook point 'blocks.3.hook_resid_post', the sweep's runs"):
        evaluate_sweep(tmp_path / "sweep", wandb_settings=WandbSettings(mode="disabled"), compare_with=[other_hook])
    with pytest.raises(ConfigError, match=r"compare_with=.*nowhere.*nor a SAELens"):
        evaluate_sweep(tmp_path / "sweep", wandb_settings=WandbSettings(mode="disabled"),
                       compare_with=[tmp_path / "nowhere"])


def test_one_to_one_matching_equals_brute_force_on_small_dictionaries():
    import itertools

    from saesweep.evaluate import matched_cosines

    torch.manual_seed(0)
    for n_a, n_b in ((4, 4), (4, 6), (5, 7)):
        a, b = torch.randn(n_a, 3), torch.randn(n_b, 3)
        cos = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
        best = max(sum(cos[i, j].item() for i, j in enumerate(cols)) for cols in itertools.permutations(range(n_b), n_a))
        assert matched_cosines(a, b).sum() == pytest.approx(best, abs=1e-6)


def test_max_cosine_counts_one_feature_many_times_and_matching_does_not(tmp_path):
    """Three features of A close to one feature of B: max cosine finds all three again, a one-to-one
    matching only one of them."""
    torch.manual_seed(0)
    basis = torch.eye(16)
    a = torch.stack([basis[0] + 0.05 * basis[1], basis[0] + 0.05 * basis[2], basis[0] + 0.05 * basis[3], basis[4]])
    b = torch.cat([basis[[0, 4]], basis[8:16]])  # 10 features
    make_run(tmp_path / "sweep" / "0", a)
    make_run(tmp_path / "sweep" / "1", b)
    evaluation = evaluate_sweep(tmp_path / "sweep", wandb_settings=WandbSettings(mode="disabled"))
    pair = evaluation.comparison.pairs["0", "1"]
    assert pair.found_again == 4 and pair.matched == 2 and pair.baseline_matched == 0
    row = read_summary(tmp_path / "sweep" / "evaluation")["0"]
    assert (row["found_in_largest"], row["matched_with_largest"]) == ("4", "2")


def test_runs_that_differ_only_in_seed_are_compared_both_ways(tmp_path):
    torch.manual_seed(0)
    truth = torch.randn(32, 16)
    for name, seed, ratio_rows, noise in (("0", 0, 32, 0.01), ("1", 1, 32, 0.02), ("2", 0, 16, 0.01)):
        decoder = truth[:ratio_rows] + noise * torch.randn(ratio_rows, 16)
        make_run(tmp_path / "sweep" / name, decoder)
        cfg_path = tmp_path / "sweep" / name / "cfg.json"
        cfg = json.loads(cfg_path.read_text())
        cfg_path.write_text(json.dumps({**cfg, "seed": seed}))
    evaluation = evaluate_sweep(tmp_path / "sweep", wandb_settings=WandbSettings(mode="disabled"))
    runs = evaluation.report["runs"]
    # 0 and 1 differ only in seed; 2 differs in size, so it has no seed partner
    assert runs["0"]["found_again"]["other_seed"]["run"] == "1" and runs["1"]["found_again"]["other_seed"]["run"] == "0"
    assert runs["2"]["found_again"]["other_seed"] is None
    assert runs["0"]["found_again"]["other_seed"]["found_again"] == 32
    assert runs["0"]["found_again"]["other_seed"]["baseline_found_again"] == 0
    rows = read_summary(tmp_path / "sweep" / "evaluation")
    assert (rows["1"]["other_seed_run"], rows["1"]["found_by_other_seed"], rows["1"]["matched_with_other_seed"]) == ("0", "32", "32")
    assert rows["2"]["other_seed_run"] == ""
    assert "by the other seed" in console_table(evaluation.summary, 0.9).splitlines()[0]


def test_seeds_trained_to_one_target_l0_are_partners_whatever_coefficient_the_controller_chose(tmp_path):
    """sae.target_l0 steers l1_coef to a value of its own in each seed: the two runs are still one setting
    (seed partners), while a fixed l1_coef that differs makes two settings."""
    torch.manual_seed(0)
    truth = torch.randn(32, 16)
    runs = (("0", 0, 1.21, 32), ("1", 1, 1.35, 32), ("2", 0, 1.21, None), ("3", 1, 1.35, None))
    for name, seed, l1_coef, target in runs:
        keys = {"architecture": "relu_l1", "l1_coef": l1_coef, **({"target_l0": target} if target else {})}
        make_run(tmp_path / "sweep" / name, truth + 0.01 * torch.randn(32, 16), l1_coef=l1_coef, sae_keys=keys)
        cfg_path = tmp_path / "sweep" / name / "cfg.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "seed": seed}))
    evaluation = evaluate_sweep(tmp_path / "sweep", wandb_settings=WandbSettings(mode="disabled"))
    partner = {name: (run["found_again"]["other_seed"] or {}).get("run") for name, run in evaluation.report["runs"].items()}
    assert partner == {"0": "1", "1": "0", "2": None, "3": None}


def seed_size_sweep(sweep: Path) -> None:
    """Dictionaries of 16, 32 and 64 features, seeds 0 and 1, all noisy copies of nested subsets of one
    set of true directions: every feature of a smaller dictionary is in each larger one and in the other
    seed's dictionary of its size."""
    truth = true_features(64, d=16)
    for job, (size, seed) in enumerate((s, seed) for s in (16, 32, 64) for seed in (0, 1)):
        make_run(sweep / str(job), noisy_subset(truth, size, noise=0.01, seed=job))
        cfg_path = sweep / str(job) / "cfg.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "seed": seed}))


def test_features_are_found_again_up_each_seeds_sizes_and_in_total(tmp_path):
    seed_size_sweep(tmp_path / "sweep")
    evaluation = evaluate_sweep(tmp_path / "sweep", wandb_settings=NO_WANDB)
    runs = evaluation.report["runs"]
    # 16-feature seed 0 (job 0): its next larger of the same seed is job 2 (32, seed 0), then job 4 (64)
    up = runs["0"]["found_again"]["larger_same_seed"]
    assert (up["next_larger"], up["in_next_larger"], up["in_any_larger"], up["baseline_in_any_larger"]) == ("2", 16, 16, 0)
    assert runs["3"]["found_again"]["larger_same_seed"]["next_larger"] == "5"  # 32, seed 1 → 64, seed 1
    assert runs["4"]["found_again"]["larger_same_seed"] is None  # the largest of seed 0
    # the seed experiment's total: every feature of the 16- and 32-feature dictionaries, both seeds
    assert evaluation.report["found_in_a_larger_dictionary"] == pytest.approx({
        "definition": evaluation.report["found_in_a_larger_dictionary"]["definition"], "features": 2 * (16 + 32),
        "baseline": 0})
    rows = read_summary(tmp_path / "sweep" / "evaluation")
    assert (rows["2"]["next_larger_run"], rows["2"]["found_in_next_larger"], rows["2"]["matched_with_next_larger"]) == ("4", "32", "32")
    table = console_table(evaluation.summary, 0.9).splitlines()
    assert "in the next larger, same seed" in table[0] and "by the other seed" in table[0]
    assert table[-1].endswith("all runs: 96 (chance 0)")
    for name in ("found_by_size", "mcs_vs_frequency"):
        image = matplotlib.image.imread(evaluation.out_dir / PLOT_FILES[name])
        assert image.shape[0] > 400 and image[..., :3].std() > 0.05  # drawn, not blank


def test_mcs_by_frequency_draws_a_median_per_bin_and_counts_dead_features(tmp_path):
    from saesweep import plots

    rng = np.random.default_rng(0)
    frequency = np.concatenate([np.geomspace(1e-4, 0.1, 200), np.zeros(5)])
    one = plots.FrequencySeries("a → b", frequency, rng.uniform(0, 1, 205), rng.uniform(0, 0.3, 205))
    path = tmp_path / "freq.png"
    plots.plot_mcs_by_frequency(path, {"in b": [one]}, 0.9)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    plots.plot_mcs_by_frequency(tmp_path / "none.png", {"in b": []}, 0.9)  # nothing to compare: a message
    assert (tmp_path / "none.png").stat().st_size > 1000
