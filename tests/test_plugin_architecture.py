"""An architecture is one Python file and one YAML: one defined outside saesweep (a module named in the
`saesweep.architectures` entry-point group, its YAML on Hydra's search path) trains alone and in an
ensemble, resumes, is evaluated and reported, and is saved in SAELens's format, with nothing else changed."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from saesweep.sae import ARCHITECTURES, Hyperparameter, ReluSae, Sae

PLUGIN = '''
"""ReLU features under a square-root penalty (an L1/2 norm): an architecture written outside saesweep."""
import torch

from saesweep.sae import Hyperparameter, ReluSae, Sae, TrainStep


class SqrtPenaltySae(Sae):
    architecture = "sqrt_penalty"
    inference_architecture = "relu_l1"  # saved as a plain ReLU SAE ("standard" for SAELens)
    sparsity_coefficient = "sqrt_coef"
    hyperparameters = {"sqrt_coef": Hyperparameter(0.5, "the weight of the sum over features of sqrt(f)")}
    per_member_hyperparameters = ("sqrt_coef",)

    def encode(self, x):
        return torch.relu(self.pre_acts(x))

    def training_loss(self, x, dead):
        f = self.encode(x)
        x_hat = self.decode(f)
        losses = {"mse": (x_hat - x).pow(2).sum(-1).mean(), "sqrt": self.hparams["sqrt_coef"] * (f + 1e-4).sqrt().sum(-1).mean()}
        return TrainStep(losses, x_hat, f)

    @torch.no_grad()
    def inference_form(self):
        out = ReluSae(self.d_in, self.d_sae).to(self.W_enc.device)
        for name, tensor in self.tensors().items():
            getattr(out, name).copy_(tensor)
        return out
'''


@pytest.fixture
def plugin(tmp_path):
    """The plugin's module and its distribution's entry point on a folder for PYTHONPATH; its YAML in a
    config folder for Hydra's search path."""
    site = tmp_path / "site"
    (site / "sqrt_penalty_sae-0.1.dist-info").mkdir(parents=True)
    (site / "sqrt_penalty_sae.py").write_text(PLUGIN)
    (site / "sqrt_penalty_sae-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: sqrt-penalty-sae\nVersion: 0.1\n")
    (site / "sqrt_penalty_sae-0.1.dist-info" / "entry_points.txt").write_text(
        "[saesweep.architectures]\nsqrt_penalty = sqrt_penalty_sae\n")
    (tmp_path / "conf" / "sae").mkdir(parents=True)
    (tmp_path / "conf" / "sae" / "sqrt_penalty.yaml").write_text(
        "architecture: sqrt_penalty\nsqrt_coef: 0.5\ntarget_l0: null\n"
        "recipe: {lr: 3e-3, lr_warmup_steps: 100, lr_decay_fraction: 0.2, grad_clip_norm: 1.0}\n")
    return site, tmp_path / "conf"


def run(script: str, *args: str, site) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


@pytest.mark.slow  # four training processes: make test-slow
def test_an_architecture_from_one_file_and_one_yaml_trains_resumes_evaluates_reports_and_saves(
    tmp_path, tiny_model_dir, corpus_path, plugin
):
    site, conf = plugin
    common = [
        f"hydra.searchpath=[file://{conf}]", "sae=sqrt_penalty", f"model.path={tiny_model_dir}", "data=jsonl",
        f"data.path={corpus_path}", "layer=1", "ctx_len=16", "n_tokens=8000", "eval.n_tokens=800",
        "train.batch_size=256", "trainer.enable_progress_bar=false", f"store.dir={tmp_path / 'store'}",
        "store.shard_tokens=1000", "logger=none",
    ]
    lone = tmp_path / "lone"
    first = run("train.py", *common, f"hydra.run.dir={lone}", site=site)
    cfg = json.loads((lone / "cfg.json").read_text())
    # saved as its inference form, a ReLU SAE: the files SAELens loads as "standard" (test_interop loads those)
    recipe = {"lr": 3e-3, "lr_warmup_steps": 100, "lr_decay_fraction": 0.2, "grad_clip_norm": 1.0}  # its YAML's own
    assert cfg["sae"] == {"architecture": "sqrt_penalty", "sqrt_coef": 0.5, "recipe": recipe}
    assert cfg["architecture"] == "standard"
    weights = load_file(lone / "sae_weights.safetensors")
    assert set(weights) == {"W_enc", "b_enc", "W_dec", "b_dec"} and weights["W_dec"].shape == (128, 32)
    metrics = json.loads((lone / "metrics.json").read_text())
    assert 0 < metrics["l0"] < 128 and 0 < metrics["fvu"] < 1, metrics  # it trained: sparse, and reconstructs
    # run again: the finished run resumes from its checkpoint, trains no more, and gives the same weights
    run("train.py", *common, f"hydra.run.dir={lone}", site=site)
    assert "resum" in (lone / "train.log").read_text().lower()
    torch.testing.assert_close(load_file(lone / "sae_weights.safetensors"), weights, rtol=0, atol=0)
    assert "sqrt_penalty" in first.stdout + first.stderr + (lone / "train.log").read_text()

    sweep = tmp_path / "sweep"
    run("train.py", *common, "dict_ratio=1,2", "sae.sqrt_coef=0.5", "train.ensemble=true",
        f"hydra.sweep.dir={sweep}", "-m", site=site)
    for i, d_sae in enumerate((32, 64)):
        cfg = json.loads((sweep / str(i) / "cfg.json").read_text())
        assert (cfg["sae"]["architecture"], cfg["d_sae"]) == ("sqrt_penalty", d_sae)
    run("evaluate.py", f"sweep_dir={sweep}", "report.top_n=3", "report.n_tokens=4000", site=site)
    assert (sweep / "evaluation").is_dir() and any((sweep / "evaluation").iterdir())
    run("report.py", f"run_dir={lone}", "report.top_n=3", "report.n_tokens=4000", site=site)
    assert list(lone.glob("**/index.html")), "no report page"



def test_architectures_register_by_their_own_names_only():
    class Unnamed(ReluSae):  # a helper subclass: no name of its own, so neither registered nor "standard"
        pass

    assert Unnamed.saelens_architecture is None and Unnamed not in ARCHITECTURES.values()
    assert ARCHITECTURES["relu_l1"] is ReluSae
    with pytest.raises(TypeError, match="'relu_l1'.*clashes with saesweep.sae.relu_l1.ReluSae"):
        type("Impostor", (ReluSae,), {"architecture": "relu_l1", "__module__": "elsewhere"})
    with pytest.raises(TypeError, match="SAELens name 'standard'.*clashes"):
        type("Standard2", (ReluSae,), {"architecture": "relu_l1_again", "saelens_architecture": "standard",
                                       "__module__": "elsewhere"})
    assert "relu_l1_again" not in ARCHITECTURES


def test_a_hyperparameter_names_what_it_allows():
    k = Hyperparameter(32, "latents kept per token", integer=True, lowest=1)
    assert [k.problem(v) for v in (1, 0, 2.5, "8", None)] == [
        None, "must be ≥ 1", "is not an integer", "is not an integer", "is not allowed: give a value"]
    scale = Hyperparameter(0.1, "a scale", inclusive=False)
    assert [scale.problem(v) for v in (0.1, 0, float("nan"), True)] == [
        None, "must be > 0", "is not a finite number", "is not a finite number"]
    sizes = Hyperparameter(None, "group sizes", positive_int_list=True)
    assert [sizes.problem(v) for v in (None, [4, 4], [4, 0], "4")] == [
        None, None, "must be a list of positive integers summing to d_sae, or null",
        "must be a list of positive integers summing to d_sae, or null"]
    assert issubclass(ARCHITECTURES["topk"], Sae) and set(ARCHITECTURES["topk"].defaults()) == {
        "k", "aux_k", "aux_coef", "resample_every_tokens", "encoder_init_norm"}
