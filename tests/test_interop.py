"""Interoperability with the real SAELens package (not a mock): every saesweep run directory loads
with `sae_lens.SAE.load_from_disk` as it is, and gives saesweep's numbers. SAELens pins
transformer-lens<4, so these run in an environment with the `bench` extra (CI makes one:
`make test-interop`); elsewhere they are skipped."""

from __future__ import annotations

import pytest
import torch

from saesweep import load_sae
from saesweep.train import train
from test_train import tiny_cfg

sae_lens = pytest.importorskip("sae_lens")

pytestmark = pytest.mark.interop


@pytest.mark.parametrize(
    "architecture, extra, saelens_class",
    [("relu_l1", [], "StandardSAE"), ("topk", ["sae.k=8"], "TopKSAE"), ("batchtopk", ["sae.k=8"], "JumpReLUSAE"),
     ("jumprelu", [], "JumpReLUSAE"), ("matryoshka_batchtopk", ["sae.k=8"], "JumpReLUSAE"), ("gated", [], "GatedSAE")],
)
def test_saelens_loads_every_run_directory_as_it_is(tmp_path, tiny_model_dir, corpus_path, architecture, extra,
                                                    saelens_class):
    run = tmp_path / "run"
    train(tiny_cfg(tiny_model_dir, corpus_path, tmp_path / "store", "logger=none", f"sae={architecture}", *extra), run)
    theirs = sae_lens.SAE.load_from_disk(run)
    assert type(theirs).__name__ == saelens_class
    meta = theirs.cfg.metadata
    assert (meta.hook_name, meta.context_size, meta.prepend_bos) == ("blocks.1.hook_resid_post", 16, True)
    assert meta.dataset_path == str(corpus_path)
    ours = load_sae(run)
    x = torch.randn(200, 32) * 3
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.decode(ours.encode(x)), ours.decode(ours.encode(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["standard", "topk", "jumprelu", "gated"])
def test_a_dictionary_saved_by_saelens_loads_into_saesweep(tmp_path, name):
    from sae_lens.registry import get_sae_class

    sae_class, config_class = get_sae_class(name)
    theirs = sae_class(config_class(d_in=16, d_sae=48, **({"k": 5} if name == "topk" else {})))
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.normal_(std=0.3)
        if name == "jumprelu":
            theirs.threshold.abs_()
    theirs.save_model(tmp_path)  # SAELens's own writer
    ours = load_sae(tmp_path)
    x = torch.randn(40, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x).x_hat, theirs(x), atol=1e-5, rtol=1e-5)


def test_a_dictionary_saved_by_sparsify_loads_into_saesweep(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    torch.manual_seed(0)
    theirs = sparsify.SparseCoder(16, sparsify.SparseCoderConfig(num_latents=48, k=5))
    with torch.no_grad():
        theirs.encoder.bias.normal_(std=0.3)
        theirs.b_dec.normal_(std=0.3)
    directory = tmp_path / "layers.2"
    theirs.save_to_disk(directory)  # sparsify's own writer
    ours = load_sae(directory)
    assert ours.architecture == "topk" and ours.hparams["k"] == 5 and ours.run_cfg["hook_point"] == "layers.2"
    x = torch.randn(40, 16)
    with torch.no_grad():
        encoded = theirs.encode(x)
        dense = torch.zeros(40, 48).scatter_(-1, encoded.top_indices, encoded.top_acts)
        torch.testing.assert_close(ours.encode(x), dense, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x).x_hat, theirs.decode(encoded.top_acts, encoded.top_indices), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dict_class", ["AutoEncoder", "AutoEncoderTopK"])
def test_a_dictionary_learning_dictionary_loads_with_trust_pickle_only(tmp_path, dict_class):
    import json

    dictionary = pytest.importorskip("dictionary_learning.dictionary")
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    from saesweep.errors import CheckpointError

    torch.manual_seed(0)
    theirs = dictionary.AutoEncoder(16, 48) if dict_class == "AutoEncoder" else AutoEncoderTopK(16, 48, k=5)
    with torch.no_grad():
        theirs.encoder.bias.normal_(std=0.3)
    # what dictionary_learning's training writes: the state dict in ae.pt, the trainer config in config.json
    torch.save(theirs.state_dict(), tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": dict_class, "activation_dim": 16,
                                                                  "dict_size": 48, "lm_name": "tiny", "layer": 1}}))
    with pytest.raises(CheckpointError, match="ae.pt: it is a pickle file"):
        load_sae(tmp_path)
    ours = load_sae(tmp_path, trust_pickle=True)
    x = torch.randn(40, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x).x_hat, theirs(x), atol=1e-5, rtol=1e-5)
