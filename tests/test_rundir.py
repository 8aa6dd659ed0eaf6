import json

import pytest
import torch

from saesweep import load_sae
from saesweep.errors import CheckpointError
from saesweep.io import atomic_write_json, atomic_write_safetensors
from saesweep.metrics import EvalResult
from saesweep.rundir import MULTIRUN_FILE, recorded_wandb_group, sweep_dir_of, wandb_group, write_run_dir
from saesweep.sae import ReluSae, TopKSae


def make_run(tmp_path, d_in=8, d_sae=24):
    torch.manual_seed(0)
    sae = ReluSae(d_in, d_sae)
    with torch.no_grad():
        sae.b_dec.normal_()
    cfg = {"architecture": "relu_l1", "d_in": d_in, "d_sae": d_sae}
    stats = {k: torch.rand(d_sae) for k in ("frequency", "mean_activation", "max_activation")}
    write_run_dir(tmp_path, sae, cfg, EvalResult({"fvu": 0.5}, stats))
    return sae


def test_load_sae_round_trips_weights_from_safetensors_and_json(tmp_path):
    sae = make_run(tmp_path)
    loaded = load_sae(tmp_path)
    for name, tensor in sae.tensors().items():
        torch.testing.assert_close(getattr(loaded, name), tensor)
    assert loaded.run_cfg["d_sae"] == 24
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat)
    assert not list(tmp_path.glob(".*.tmp")), "atomic writes leave no temp files"


def test_cfg_that_disagrees_with_tensor_shapes_is_a_clear_error(tmp_path):
    make_run(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["d_sae"] = 32
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"does not match cfg.json .*d_sae=32"):
        load_sae(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_corrupt_or_missing_weights_name_the_file(tmp_path, damage):
    make_run(tmp_path)
    weights = tmp_path / "sae_weights.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "garbage":
        weights.write_bytes(b"\x80\x04 not safetensors at all" * 10)
    else:
        weights.unlink()
    with pytest.raises(CheckpointError, match="sae_weights.safetensors"):
        load_sae(tmp_path)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a finished saesweep run directory"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text('{"architecture": "relu_l2", "d_in": 2, "d_sae": 4}')
    with pytest.raises(CheckpointError, match="'relu_l2' is unknown"):
        load_sae(tmp_path)


def _pickle_run(tmp_path):
    sae = make_run(tmp_path)
    (tmp_path / "sae_weights.safetensors").unlink()
    torch.save(sae.tensors(), tmp_path / "sae.pt")
    return sae


def test_pickle_weights_are_refused_without_the_trust_flag(tmp_path):
    _pickle_run(tmp_path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*sae.pt: it is a pickle file.*trust_pickle=True"):
        load_sae(tmp_path)


def test_pickle_weights_load_with_the_trust_flag_and_are_shape_checked(tmp_path):
    sae = _pickle_run(tmp_path)
    torch.testing.assert_close(load_sae(tmp_path, trust_pickle=True).W_dec, sae.W_dec)
    torch.save({"W_enc": torch.zeros(8, 24)}, tmp_path / "sae.pt")
    with pytest.raises(CheckpointError, match=r"sae.pt does not match cfg.json .* found \{'W_enc': \(8, 24\)\}"):
        load_sae(tmp_path, trust_pickle=True)
    (tmp_path / "sae.pt").write_bytes(b"\x80\x04truncated")
    with pytest.raises(CheckpointError, match="sae.pt is not a readable torch pickle file"):
        load_sae(tmp_path, trust_pickle=True)


def test_cfg_claiming_a_huge_dictionary_is_an_error_not_an_allocation(tmp_path):
    make_run(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["d_sae"] = 10**13  # ReluSae(8, 10**13) would try to allocate petabytes
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"d_sae=10000000000000"):
        load_sae(tmp_path)


def test_runs_from_before_the_saelens_file_names_still_load(tmp_path):
    """Older run directories: weights in sae.safetensors, cfg.json "architecture" the saesweep name."""
    torch.manual_seed(0)
    sae = ReluSae(4, 8)
    atomic_write_safetensors(tmp_path / "sae.safetensors", sae.tensors())
    atomic_write_json(tmp_path / "cfg.json", {"architecture": "relu_l1", "d_in": 4, "d_sae": 8, "l1_coef": 2.0})
    loaded = load_sae(tmp_path)
    assert isinstance(loaded, ReluSae) and torch.equal(loaded.W_dec, sae.W_dec)


def test_a_saelens_directory_loads_by_its_architecture_name(tmp_path):
    torch.manual_seed(0)
    sae = TopKSae(4, 8, k=3)
    atomic_write_safetensors(tmp_path / "sae_weights.safetensors", sae.tensors())
    atomic_write_json(tmp_path / "cfg.json", {"architecture": "topk", "d_in": 4, "d_sae": 8, "k": 3, "dtype": "float32"})
    loaded = load_sae(tmp_path)
    x = torch.randn(5, 4)
    assert isinstance(loaded, TopKSae) and loaded.hparams["k"] == 3
    assert ((loaded(x).feature_acts != 0).sum(-1) <= 3).all()


def test_foreign_directories_that_cannot_be_read_say_which_file_and_what_was_expected(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="nor a SAELens .* sparsify .* or dictionary_learning"):
        load_sae(empty)
    # sparsify's layout with a decoder of the wrong width
    sparsify = tmp_path / "layers.1"
    sparsify.mkdir()
    (sparsify / "cfg.json").write_text(json.dumps({"k": 4, "num_latents": 12, "d_in": 6}))
    atomic_write_safetensors(sparsify / "sae.safetensors", {
        "encoder.weight": torch.zeros(12, 6), "encoder.bias": torch.zeros(12), "W_dec": torch.zeros(12, 5),
        "b_dec": torch.zeros(6)})
    with pytest.raises(CheckpointError, match=r"layers.1/sae.safetensors \(sparsify, d_in=6, 12 latents\): expected"):
        load_sae(sparsify)
    # dictionary_learning's pickle, refused without trust_pickle, naming the file
    learning = tmp_path / "dl"
    learning.mkdir()
    (learning / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    torch.save({"encoder.weight": torch.zeros(12, 6)}, learning / "ae.pt")
    with pytest.raises(CheckpointError, match=r"refusing to load .*dl/ae.pt: it is a pickle file"):
        load_sae(learning)
    with pytest.raises(CheckpointError, match=r"ae.pt \(AutoEncoder\): expected tensors"):
        load_sae(learning, trust_pickle=True)
    (learning / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKSAE"}}))
    with pytest.raises(CheckpointError, match="dict_class='BatchTopKSAE' is not supported; allowed"):
        load_sae(learning, trust_pickle=True)


def test_one_wandb_group_for_a_runs_training_evaluation_report_and_steering(tmp_path):
    """Training groups by the sweep directory it was given, else by the run directory; the later tools
    read the same group back from the job's Hydra record, however the directories are spelt now."""
    sweep = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    run = sweep / "sub" / "3"
    (run / ".hydra").mkdir(parents=True)
    (sweep / MULTIRUN_FILE).write_text("{}")
    (run / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  sweep:\n    dir: multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}\n"
        f"  runtime:\n    cwd: {tmp_path}\n    output_dir: {run}\n"
    )
    trained = wandb_group(run, sweep_dir=sweep.relative_to(tmp_path))
    assert trained == "multirun/2026-01-01/12-00-00"
    assert sweep_dir_of(run) == sweep and recorded_wandb_group([run]) == trained
    lone = tmp_path / "outputs" / "lone"
    (lone / ".hydra").mkdir(parents=True)
    (lone / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  sweep:\n    dir: multirun\n  runtime:\n    cwd: {tmp_path}\n    output_dir: {lone}\n"
    )
    assert sweep_dir_of(lone) is None and recorded_wandb_group([lone]) == wandb_group(lone) == str(lone)
    assert recorded_wandb_group([tmp_path / "no_record"]) == str(tmp_path / "no_record")
