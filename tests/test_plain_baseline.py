"""benchmarks/plain_topk.py, the plain TopK recipe that saesweep's TopK defaults are measured against."""

import sys

import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from plain_topk import DEAD_AFTER_TOKENS, PlainTopK, train_plain_topk  # noqa: E402


def sparse_data(n: int, d_in: int = 16, n_features: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_features, d_in, generator=generator), dim=1)
    codes = (torch.rand(n, n_features, generator=generator) < 0.05) * torch.rand(n, n_features, generator=generator)
    return codes @ directions


def test_the_plain_recipe_learns_and_its_saesweep_form_computes_the_same():
    data = sparse_data(64 * 256)
    sae = PlainTopK(16, 64, 4, data[:1024])
    with torch.no_grad():
        before = sae.loss(data[:1024]).item()
    sae = train_plain_topk(data.split(256), 16, 64, 4, data[:1024])
    with torch.no_grad():
        after = sae.loss(data[:1024]).item()
    assert after < 0.5 * before  # seen: 0.029 against 0.125
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))  # rows renormalised after each step

    # as saesweep's TopKSae on activations 3× larger: the same code, 3× the reconstruction
    ours = sae.as_saesweep(3.0)
    x = data[:100]
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    values, indices = pre.topk(4, dim=-1)
    x_hat = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values)) @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(ours(3 * x).x_hat, 3 * x_hat.detach(), rtol=1e-4, atol=1e-4)


def test_aux_k_acts_only_on_latents_dead_for_200k_tokens():
    data = sparse_data(2048)
    sae = PlainTopK(16, 64, 4, data[:512])
    with torch.no_grad():  # eight latents that never reach the top 4 but have a positive pre-activation
        sae.W_enc[:, :8] = 0
        sae.b_enc[:8] = 1e-3
    sae.tokens_since_fired[:8] = DEAD_AFTER_TOKENS  # ... and have been silent long enough
    sae.loss(data[:256]).backward()
    live_grad = sae.W_dec.grad.clone()
    sae.zero_grad()
    sae.tokens_since_fired.zero_()
    sae.loss(data[:256]).backward()
    # the dead latents that did not fire now get AuxK's gradient through their decoder rows
    changed = (live_grad - sae.W_dec.grad).abs().sum(dim=1) > 0
    assert changed[:8].all() and not changed[8:].any()
