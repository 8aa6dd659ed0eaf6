import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from saesweep.recipe import Recipe
from saesweep.sae import (
    ARCHITECTURES,
    JumpReluSae,
    ReluSae,
    geometric_median,
)
from saesweep.step import sae_step


def test_decoder_rows_start_unit_norm_and_encoder_is_their_scaled_transpose():
    sae = ReluSae(16, 64)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(sae.W_enc, 0.1 * sae.W_dec.T)  # encoder_init_norm's default
    torch.testing.assert_close(ReluSae(16, 64, encoder_init_norm=1.0).W_enc.norm(dim=0), torch.ones(64))
    for architecture in ("topk", "batchtopk", "jumprelu"):  # the others start at the plain transpose
        other = ARCHITECTURES[architecture](16, 64)
        torch.testing.assert_close(other.W_enc, other.W_dec.T)
    scaled = ARCHITECTURES["matryoshka_batchtopk"](16, 64, encoder_init_norm=3.0)  # the TopK family's is a key too
    torch.testing.assert_close(scaled.W_enc, 3.0 * scaled.W_dec.T)


def test_gradient_clipping_is_per_dictionary():
    """Each SAE's gradient is clipped to its own sae.recipe.grad_clip_norm on its own: a member with a large
    gradient does not shrink another's step, as one norm over the whole ensemble would, and a member
    without a clip keeps its gradient whole."""
    from saesweep.training import SaeTrainingModule

    saes = [ReluSae(4, 8) for _ in range(4)]
    clips = (1.0, 1.0, 0.05, None)
    module = SaeTrainingModule(
        saes, metric_prefixes=["a/", "b/", "c/", "d/"], act_scale=1.0,
        recipes=[Recipe(1e-3, 1, 0.0, clip) for clip in clips], adam_betas=(0.9, 0.999),
        total_steps=1, max_bad_steps=1, model=None, hook_point="h", resume_key={},
    )
    for sae, size in zip(saes, (10.0, 0.1, 0.1, 10.0)):
        for name, parameter in sae.named_parameters():  # W_dec's gradient 0: its projection leaves it so
            parameter.grad = torch.zeros_like(parameter) if name == "W_dec" else torch.full_like(parameter, size)
    before = [{name: p.grad.clone() for name, p in sae.named_parameters()} for sae in saes]
    module.on_before_optimizer_step(None)

    def norm(sae):
        return torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in sae.parameters()])).item()

    assert norm(saes[0]) == pytest.approx(1.0, rel=1e-5)
    assert norm(saes[2]) == pytest.approx(0.05, rel=1e-4)  # 0.1·√44 ≈ 0.66 clipped to its own 0.05
    for i in (1, 3):  # b: norm 0.66 < 1, untouched; d: no clip, its norm 66 untouched
        for name, parameter in saes[i].named_parameters():
            torch.testing.assert_close(parameter.grad, before[i][name], rtol=0, atol=0)


@pytest.mark.parametrize("total, asked, max_fraction, warmup", [
    (2000, 500, 0.25, 500), (1953, 500, 0.25, 488), (40, 500, 0.25, 10), (1953, 1000, 0.5, 976), (1953, 1, 0.25, 1),
])
def test_learning_rate_warms_up_over_at_most_a_share_of_the_run_then_decays_to_zero(total, asked, max_fraction, warmup):
    """sae.recipe.lr_warmup_steps=500: a run of 2000 steps warms up over 500; a shorter one over a
    quarter of its steps (train.lr_warmup_max_fraction), so it still reaches its full learning rate; the last
    20 % decay linearly to zero."""
    from saesweep.training import SaeTrainingModule

    module = SaeTrainingModule(
        [ReluSae(4, 8)], metric_prefixes=[""], act_scale=1.0, recipes=[Recipe(3e-3, asked, 0.2, None)],
        adam_betas=(0.9, 0.999), total_steps=total, max_bad_steps=1, model=None, hook_point="h", resume_key={},
        lr_warmup_max_fraction=max_fraction,
    )
    factor = module.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert factor(0) == pytest.approx(1 / warmup)
    assert warmup == 1 or factor(warmup - 2) < 1.0
    assert factor(warmup - 1) == factor(warmup) == 1.0
    decay_start = int(total * 0.8)
    assert factor(decay_start - 1) == 1.0
    assert factor(decay_start + (total - decay_start) // 2) == pytest.approx(0.5, abs=1 / (total - decay_start))
    assert factor(total) == 0.0


def test_each_member_follows_its_own_schedule():
    """Members of one ensemble with other recipes: each parameter group gets its own learning rate and
    schedule (no warm-up: the full rate from the first step; no decay: to the end)."""
    from saesweep.training import SaeTrainingModule

    module = SaeTrainingModule(
        [ReluSae(4, 8), ReluSae(4, 8)], metric_prefixes=["a/", "b/"], act_scale=1.0,
        recipes=[Recipe(3e-3, 500, 0.2, 1.0), Recipe(2e-3, 0, 0.0, None)], adam_betas=(0.9, 0.999),
        total_steps=2000, max_bad_steps=1, model=None, hook_point="h", resume_key={},
    )
    configured = module.configure_optimizers()
    scheduler, optimizer = configured["lr_scheduler"]["scheduler"], configured["optimizer"]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([3e-3 / 500, 2e-3])
    first, second = scheduler.lr_lambdas
    assert (first(250), second(0), second(1999)) == (pytest.approx(251 / 500), 1.0, 1.0)
    assert first(1999) == pytest.approx(1 / 400)


def test_forward_is_relu_of_centred_input_then_linear_decode():
    torch.manual_seed(0)
    sae = ReluSae(8, 16)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(5, 8)
    out = sae(x)
    expected_f = torch.clamp((x - sae.b_dec) @ sae.W_enc + sae.b_enc, min=0)
    torch.testing.assert_close(out.feature_acts, expected_f)
    torch.testing.assert_close(out.x_hat, expected_f @ sae.W_dec + sae.b_dec)
    assert (out.feature_acts == 0).any() and (out.feature_acts > 0).any()


def test_parallel_gradient_removed_and_renormalised_step_keeps_unit_rows():
    torch.manual_seed(0)
    sae = ReluSae(8, 32)
    loss = sae(torch.randn(64, 8)).x_hat.pow(2).sum() + sae.W_dec.sum()
    loss.backward()
    ReluSae.before_optimizer_step([sae])
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    assert (parallel.abs() / sae.W_dec.grad.norm(dim=1)).max() < 1e-5
    torch.optim.SGD(sae.parameters(), lr=0.5).step()
    assert (sae.W_dec.norm(dim=1) - 1).abs().max() > 1e-4  # the step moved rows off the sphere
    ReluSae.after_optimizer_step([sae])
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


def test_rescaled_sae_on_raw_inputs_equals_normalised_sae_times_scale():
    torch.manual_seed(0)
    sae = ReluSae(8, 16)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.3)
    scale = 7.5
    x_raw = torch.randn(10, 8) * scale
    normalised = sae(x_raw / scale)
    raw_sae = sae.rescaled(scale)
    raw = raw_sae(x_raw)
    torch.testing.assert_close(raw.x_hat, normalised.x_hat * scale, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(raw.feature_acts, normalised.feature_acts * scale, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(raw_sae.W_dec.norm(dim=1), torch.ones(16))


def test_geometric_median_resists_outliers_where_mean_does_not():
    torch.manual_seed(0)
    points = torch.cat([torch.randn(95, 3) * 0.1, torch.full((5, 3), 100.0)])
    median = geometric_median(points)
    assert median.norm() < 0.2
    assert points.mean(dim=0).norm() > 8


def small(architecture: str, d_in: int = 8, d_sae: int = 32, **hparams):
    torch.manual_seed(0)
    defaults = {"topk": {"k": 4}, "batchtopk": {"k": 4}, "matryoshka_batchtopk": {"k": 4}}
    sae = ARCHITECTURES[architecture](d_in, d_sae, **(defaults.get(architecture, {}) | hparams))
    with torch.no_grad():
        sae.b_dec.normal_()
        for name, p in sae.named_parameters():
            if name.startswith("b_") and name != "b_dec":
                p.normal_(std=0.3)
    return sae


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_architecture_rescales_and_trains_through_the_same_interface(architecture):
    sae = small(architecture)
    x = torch.randn(64, 8)
    step = sae.training_loss(x, dead=torch.zeros(32, dtype=torch.bool))
    loss = torch.stack(list(step.losses.values())).sum()
    assert torch.isfinite(loss) and "mse" in step.losses
    loss.backward()
    assert sae.W_enc.grad is not None and sae.W_dec.grad is not None
    # the saved (inference) form on raw activations is the normalised SAE scaled
    scale = 7.5
    form = sae.inference_form()
    raw = sae.rescaled(scale).inference_form()
    with torch.no_grad():
        torch.testing.assert_close(raw(x * scale).x_hat, form(x).x_hat * scale, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(raw.W_dec.norm(dim=1), torch.ones(32))
        assert set(raw.tensors()) == set(type(raw).parameter_shapes(8, 32))


def test_topk_keeps_exactly_k_features_per_token_and_decodes_sparsely():
    sae = small("topk")
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: exactly k survive
    x = torch.randn(50, 8)
    out = sae(x)
    assert ((out.feature_acts > 0).sum(-1) == 4).all()
    torch.testing.assert_close(out.x_hat, out.feature_acts @ sae.W_dec + sae.b_dec, rtol=1e-5, atol=1e-5)


def test_batchtopk_keeps_k_per_token_on_average_over_the_batch():
    sae = small("batchtopk")
    with torch.no_grad():
        sae.b_enc.fill_(10.0)
    step = sae.training_loss(torch.randn(50, 8), dead=torch.zeros(32, dtype=torch.bool))
    counts = (step.feature_acts > 0).sum(-1)
    assert counts.float().mean() == 4 and counts.min() < counts.max()  # some tokens more, some fewer
    assert float(sae.running_threshold) == pytest.approx(float(step.feature_acts[step.feature_acts > 0].min()))
    # saved as JumpReLU with that threshold
    form = sae.inference_form()
    assert isinstance(form, JumpReluSae) and torch.all(form.threshold == sae.running_threshold)


def test_jumprelu_threshold_gets_a_gradient_and_moves():
    sae = small("jumprelu", l0_coef=1.0, threshold_init=0.5, bandwidth=2.0)
    before = sae.threshold.detach().clone()
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(5):
        step = sae.training_loss(torch.randn(256, 8), dead=torch.zeros(32, dtype=torch.bool))
        optimizer.zero_grad()
        torch.stack(list(step.losses.values())).sum().backward()
        assert sae.threshold.grad is not None and sae.threshold.grad.abs().sum() > 0
        optimizer.step()
        JumpReluSae.after_optimizer_step([sae])
    assert (sae.threshold.detach() - before).abs().max() > 1e-3


def test_matryoshka_prefix_losses_are_reconstructions_from_their_first_latents():
    sae = small("matryoshka_batchtopk", group_sizes=[4, 4, 8, 16])
    assert sae.prefix_widths() == [4, 8, 16, 32]
    x = torch.randn(20, 8)
    step = sae.training_loss(x, dead=torch.zeros(32, dtype=torch.bool))
    f = step.feature_acts
    expected = sum(((f[:, :m] @ sae.W_dec[:m] + sae.b_dec - x).pow(2).sum(-1).mean()) for m in (4, 8, 16))
    torch.testing.assert_close(step.losses["prefix_mse"], expected)
    torch.testing.assert_close(step.losses["mse"], (step.x_hat - x).pow(2).sum(-1).mean())


def test_aux_k_is_zero_without_dead_latents_and_pulls_dead_ones_toward_the_residual():
    sae = small("topk", aux_coef=1.0, aux_k=4)
    x = torch.randn(64, 8)
    alive = sae.training_loss(x, dead=torch.zeros(32, dtype=torch.bool))
    assert alive.losses["aux_k"] == 0
    dead = torch.zeros(32, dtype=torch.bool)
    dead[16:] = True
    step = sae.training_loss(x, dead=dead)
    assert step.losses["aux_k"] > 0
    step.losses["aux_k"].backward()
    # only dead latents' decoder rows are moved by AuxK
    assert sae.W_dec.grad[:16].abs().sum() == 0 and sae.W_dec.grad[16:].abs().sum() > 0
    with torch.no_grad():  # a small step along the gradient lowers it: dead latents move toward the residual
        sae.W_dec -= 1e-3 * sae.W_dec.grad
    assert sae.training_loss(x, dead=dead).losses["aux_k"] < step.losses["aux_k"]


@pytest.mark.parametrize("architecture", ["relu_l1", "topk", "batchtopk", "matryoshka_batchtopk"])
def test_resampling_revives_dead_features_and_resets_their_adam_moments(architecture):
    torch.manual_seed(0)
    cls = ARCHITECTURES[architecture]
    sae = cls(8, 16, resample_every_tokens=100, **({} if architecture == "relu_l1" else {"k": 4}))
    dead = torch.zeros(16, dtype=torch.bool)
    dead[:4] = True
    with torch.no_grad():
        sae.b_enc[dead] = -1e6  # never fire
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(256, 8)
    step = sae.training_loss(x, dead)
    torch.stack(list(step.losses.values())).sum().backward()
    optimizer.step()
    assert (sae(x).feature_acts[:, dead] == 0).all()
    with torch.no_grad():
        optimizer.state[sae.W_dec]["exp_avg"].fill_(1.0)
        optimizer.state[sae.W_enc]["exp_avg_sq"][:, ~dead] = torch.arange(8.0)[:, None] * torch.linspace(1, 3, 12)
    # due only at a resampling boundary (the step that crossed 100 tokens), and not in the last interval
    assert [sae.revives_after(t, 10, total_tokens=1000) for t in (90, 100, 110, 900)] == [False, True, False, True]
    assert not sae.revives_after(1000, 10, total_tokens=1000) and not sae.revives_after(900, 10, total_tokens=999)
    assert not cls(8, 16, resample_every_tokens=None).revives_after(100, 10, total_tokens=1000)
    assert sae.revive_dead(torch.zeros_like(dead), x, optimizer, tokens_seen=100, step_tokens=10) is None  # none dead
    revived = sae.revive_dead(dead, x, optimizer, tokens_seen=100, step_tokens=10)
    assert torch.equal(revived, dead)
    torch.testing.assert_close(sae.W_dec[dead].norm(dim=1), torch.ones(4))
    assert (sae.b_enc[dead] == 0).all()
    assert (optimizer.state[sae.W_dec]["exp_avg"][dead] == 0).all()
    assert (optimizer.state[sae.W_dec]["exp_avg"][~dead] == 1).all()  # the live features' moments are kept
    # a revived feature's second moment is the live ones' mean, input by input: its first updates are no larger
    torch.testing.assert_close(optimizer.state[sae.W_enc]["exp_avg_sq"][:, dead], 2 * torch.arange(8.0)[:, None].expand(8, 4))
    assert (optimizer.state[sae.b_enc]["exp_avg_sq"][dead] == optimizer.state[sae.b_enc]["exp_avg_sq"][~dead].mean()).all()
    # every revived feature fires again, in TopK's family too: there it reads its input as strongly as a live one
    assert (sae(x).feature_acts[:, dead] > 0).any(dim=0).all()
    torch.testing.assert_close(sae.W_enc[:, dead].norm(dim=0),
                               sae.W_enc[:, ~dead].norm(dim=0).mean().expand(4) * cls.resampled_encoder_norm)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_an_architecture_says_whether_its_loss_reads_the_dead_mask(architecture):
    """The training module hands architectures that do not read it an all-false mask instead of working one
    out at every step: `reads_dead_mask` must be true exactly where the mask changes the loss."""
    sae = small(architecture)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    losses = []
    for dead in (torch.zeros(32, dtype=torch.bool), torch.ones(32, dtype=torch.bool)):
        step = sae.training_loss(x, dead)
        losses.append(torch.stack(list(step.losses.values())).sum().item())
    assert (losses[0] != losses[1]) == sae.reads_dead_mask


class _MatmulShapes(TorchDispatchMode):
    """The output shapes of the matrix products dispatched while active."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.name.removeprefix("aten::") in ("mm", "addmm", "bmm", "baddbmm"):
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("architecture", ["relu_l1", "gated"])
def test_encoder_is_the_centred_affine_map_without_a_batch_sized_matmul_for_the_decoder_bias(architecture):
    sae = small(architecture)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    bias = sae.b_enc if architecture == "relu_l1" else sae.b_gate
    plain = (x - sae.b_dec) @ sae.W_enc + bias
    expected = torch.autograd.grad(plain.pow(2).sum(), (sae.W_enc, bias, sae.b_dec))
    with _MatmulShapes() as matmuls:
        pre = sae.pre_acts(x)
        got = torch.autograd.grad(pre.pow(2).sum(), (sae.W_enc, bias, sae.b_dec))
    torch.testing.assert_close(pre, plain)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    # b_dec's gradient comes from the batch sum: no [batch, d_in] product in the backward
    assert (64, 8) not in matmuls.shapes and (64, 32) in matmuls.shapes


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_topk_training_step_equals_the_dense_top_k_with_auxk_in_loss_gradients_and_firing(architecture):
    """The training step gathers the chosen latents and decodes sparsely; the reference here builds the
    dense activations and masks the live latents out of AuxK's top-k."""
    sae = small(architecture, aux_k=6, aux_coef=0.5)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[0, 3, 7, 11, 20]] = True  # fewer than aux_k: live latents stand in and add nothing
    params = list(sae.parameters())

    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if architecture == "topk":
        values, indices = pre.topk(4, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
    else:
        acts = sae.batch_topk(pre)
    x_hat = acts @ sae.W_dec + sae.b_dec
    aux_values, aux_indices = pre.masked_fill(~dead, -torch.inf).topk(6, dim=-1)
    aux_recon = torch.zeros_like(pre).scatter(-1, aux_indices, torch.relu(aux_values)) @ sae.W_dec
    aux = (aux_recon - (x - x_hat).detach()).pow(2).sum(-1).mean() * 5 / 6
    expected_loss = (x_hat - x).pow(2).sum(-1).mean() + 0.5 * aux
    expected_grads = torch.autograd.grad(expected_loss, params)

    step = sae_step(sae, x, dead, with_l0=True)
    torch.testing.assert_close(step.terms["aux_k"], 0.5 * aux.detach())
    for got, expected in zip(torch.autograd.grad(step.loss, params), expected_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(step.fired, (acts > 0).any(dim=0)) and 0 < int(step.fired.sum()) < 32
    assert step.l0 == (acts > 0).sum(-1).float().mean()


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_training_step_compiles_as_one_graph(architecture):
    """train.compile=true fuses the whole step: no graph break (TopK's sparse decode once broke it at the
    autograd.grad in its backward, 7 times a step)."""
    sae = small(architecture)
    explained = torch._dynamo.explain(sae_step)(sae, torch.randn(64, 8), torch.zeros(32, dtype=torch.bool), False)
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_training_step_runs_under_bf16_autocast_close_to_float32(architecture):
    """trainer.precision=bf16-mixed: the matmuls round to bf16, the loss and its terms stay float32."""
    sae = small(architecture)
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:4] = True
    exact = sae_step(sae, x, dead, with_l0=False).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = sae_step(sae, x, dead, with_l0=False)
    mixed.loss.backward()
    assert mixed.loss.dtype == torch.float32 and all(p.grad is not None for p in sae.parameters() if p.requires_grad)
    assert mixed.loss.item() == pytest.approx(exact.item(), rel=0.05)
