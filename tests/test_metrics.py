import math

import pytest
import torch

from conftest import synthetic_documents
from saesweep.data import make_contexts
from saesweep.metrics import HeldOutSet, evaluate
from saesweep.sae import ReluSae

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def held_out(tiny_model):
    splits = make_contexts(synthetic_documents(40), tiny_model.tokenizer, 16, 1, 12, True, seed=0)
    return HeldOutSet.build(tiny_model, splits.eval, HOOK, batch_contexts=5)


def identity_sae(d: int) -> ReluSae:
    """f = (relu(x), relu(-x)), x̂ = relu(x) − relu(−x) = x: a perfect reconstruction."""
    sae = ReluSae(d, 2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_perfect_sae_recovers_all_loss(tiny_model, held_out):
    m = evaluate(identity_sae(32), tiny_model, HOOK, held_out, batch_contexts=4).metrics
    assert m["fvu"] < 1e-10 and m["mse"] < 1e-8
    assert m["ce_spliced"] == pytest.approx(m["ce_clean"], abs=1e-5)
    assert m["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert m["n_eval_tokens"] == 12 * 16
    # every token has a non-zero coordinate: each of the 32 dims fires on exactly one of its two features
    assert m["l0"] == pytest.approx(32, abs=0.5)


def test_zero_sae_equals_zero_ablation_and_fvu_matches_definition(tiny_model, held_out):
    sae = ReluSae(32, 64)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_enc.fill_(-1e6)  # no feature ever fires
    result = evaluate(sae, tiny_model, HOOK, held_out, batch_contexts=7)
    m = result.metrics
    x = held_out.tensors[1].reshape(-1, 32).double()
    expected_fvu = (x.pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert m["fvu"] == pytest.approx(expected_fvu, rel=1e-6)
    assert m["mse"] == pytest.approx(x.pow(2).sum(-1).mean().item(), rel=1e-6)
    assert m["ce_spliced"] == pytest.approx(m["ce_zero_ablation"], abs=1e-5)
    assert m["ce_recovered"] == pytest.approx(0.0, abs=1e-5)
    assert m["dead_fraction"] == 1.0 and m["l0"] == 0.0
    assert result.feature_stats["frequency"].sum() == 0


def test_random_sae_metrics_match_brute_force(tiny_model, held_out):
    torch.manual_seed(0)
    sae = ReluSae(32, 64)
    with torch.no_grad():
        sae.b_enc.normal_(std=0.5)
    result = evaluate(sae, tiny_model, HOOK, held_out, batch_contexts=5)
    x = held_out.tensors[1].reshape(-1, 32)
    x_hat, f = sae(x)
    m = result.metrics
    assert m["l0"] == pytest.approx((f > 0).float().sum(-1).mean().item(), rel=1e-5)
    assert m["l1"] == pytest.approx(f.sum(-1).mean().item(), rel=1e-5)
    freq = (f > 0).float().mean(0)
    torch.testing.assert_close(result.feature_stats["frequency"], freq)
    torch.testing.assert_close(result.feature_stats["max_activation"], f.max(0).values)
    assert m["dense_fraction"] == pytest.approx((freq > 0.1).float().mean().item())
    assert m["ppl_delta"] == pytest.approx(math.exp(m["ce_spliced"]) - math.exp(m["ce_clean"]))
    assert m["ce_delta"] == pytest.approx(m["ce_spliced"] - m["ce_clean"])


def shrinking_sae(d: int, threshold: float) -> ReluSae:
    """The identity SAE with encoder thresholds: x̂_d = sign(x_d)·max(|x_d| − threshold, 0). Its error,
    L0 and loss vary from context to context, so the error bars are not small."""
    sae = identity_sae(d)
    with torch.no_grad():
        sae.b_enc.fill_(-threshold)
    return sae


@pytest.fixture(scope="module")
def reference_held_out():
    """160 held-out contexts of the reference model at layer 2: a real model, whose zero-ablation loss
    is far above its clean loss (a random tiny model's are close, and ce_recovered is then meaningless)."""
    from conftest import REFERENCE_CORPUS, REFERENCE_MODEL
    from saesweep.data import ContextSource, load_texts
    from saesweep.lm import load_model

    if not REFERENCE_MODEL.is_dir():
        pytest.skip(f"no reference model at {REFERENCE_MODEL}")
    model = load_model(None, str(REFERENCE_MODEL), torch.device("cpu"))
    texts = load_texts(str(REFERENCE_CORPUS), None, "train", "text")
    contexts = ContextSource(texts, model.tokenizer, 25, True, seed=0).held_out_contexts(160).tokens
    return model, HeldOutSet.build(model, contexts, REFERENCE_HOOK, batch_contexts=80)


REFERENCE_HOOK = "blocks.2.hook_resid_post"
HEADLINE = ("fvu", "l0", "ce_delta", "ce_recovered")


def test_standard_errors_match_a_brute_force_bootstrap_over_contexts(reference_held_out):
    """The delta-method standard errors against the spread of the metrics re-evaluated on contexts
    resampled with replacement (each replicate a full evaluation: model, SAE and all)."""
    model, held_out = reference_held_out
    sae = shrinking_sae(256, threshold=3.0)
    small = HeldOutSet(*(t[:40] for t in held_out.tensors))
    m = evaluate(sae, model, REFERENCE_HOOK, small, batch_contexts=40).metrics
    assert 0.2 < m["ce_recovered"] < 0.95 and 0.05 < m["fvu"] < 0.9  # a partial reconstruction
    generator = torch.Generator().manual_seed(0)
    replicates = []
    for _ in range(100):  # the spread of 100 replicates is known to about ±7 %
        rows = torch.randint(0, 40, (40,), generator=generator)
        resampled = HeldOutSet(*(t[rows] for t in small.tensors))
        replicates.append(evaluate(sae, model, REFERENCE_HOOK, resampled, batch_contexts=40).metrics)
    for key in HEADLINE:
        spread = torch.tensor([r[key] for r in replicates], dtype=torch.float64).std().item()
        assert m[f"{key}_se"] == pytest.approx(spread, rel=0.25), key


def test_standard_errors_shrink_as_the_held_out_set_grows(reference_held_out):
    model, held_out = reference_held_out
    sae = shrinking_sae(256, threshold=3.0)
    small = evaluate(sae, model, REFERENCE_HOOK, HeldOutSet(*(t[:40] for t in held_out.tensors)), 40).metrics
    large = evaluate(sae, model, REFERENCE_HOOK, held_out, 40).metrics
    assert large["n_eval_contexts"] == 4 * small["n_eval_contexts"] == 160
    for key in HEADLINE:
        # 4× the contexts: about half the standard error
        assert 0.3 < large[f"{key}_se"] / small[f"{key}_se"] < 0.75, key
    assert large["dead_window_tokens"] == large["n_eval_tokens"] == 160 * 25
