"""The batched ensemble step: members of one shape stepped as one computation train exactly as they
do stepped one by one (weights and Adam moments), and a steady-state step makes no host sync."""

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from saesweep.dispatch import OpCounter
from saesweep.recipe import Recipe
from saesweep.sae import ARCHITECTURES, GatedSae, ReluSae, TopKSae
from saesweep.step import batched_sae_step, per_member_coefficients
from saesweep.training import SaeTrainingModule

STEPS, BATCH, D_IN, D_SAE = 50, 64, 8, 32
POISONED_AT, COUNTED = 20, 25  # member 1 gets a NaN weight; the step whose operators are counted

# three members of one shape per architecture, differing in their coefficients (and seeds)
MEMBERS = {
    # dead latents resampled every 10 steps
    "relu_l1": [{"l1_coef": c, "resample_every_tokens": 10 * BATCH} for c in (0.5, 1, 3)],
    "topk": [{"k": 4, "aux_k": 4, "aux_coef": c} for c in (1 / 32, 0.3, 1.0)],
    "batchtopk": [{"k": 4, "aux_coef": c} for c in (1 / 32, 0.3, 1.0)],
    "matryoshka_batchtopk": [{"k": 4, "aux_coef": c, "resample_every_tokens": 10 * BATCH} for c in (1 / 32, 0.3, 1.0)],
    "jumprelu": [{"l0_coef": c, "bandwidth": b} for c, b in ((0.1, 0.05), (0.7, 0.1), (2.0, 0.05))],
    "gated": [{"l1_coef": c} for c in (0.5, 1, 3)],
}


def make_saes(architecture: str) -> list:
    saes = []
    for seed, hparams in enumerate(MEMBERS[architecture]):
        sae = ARCHITECTURES[architecture](D_IN, D_SAE, torch.Generator().manual_seed(seed), **hparams)
        with torch.no_grad():  # the last quarter of the latents (almost) never fires: dead, for AuxK and resampling
            (sae.b_gate if isinstance(sae, GatedSae) else sae.b_enc)[-D_SAE // 4:] = -2.0 if "topk" in architecture else -20.0
        saes.append(sae)
    return saes


def ensemble(saes: list, batched: bool, act_scale: float = 1.0, batch_scale: float | None = None) -> SaeTrainingModule:
    return SaeTrainingModule(
        saes, metric_prefixes=[f"m{i}/" for i in range(len(saes))], act_scale=act_scale,
        recipes=[Recipe(3e-3, 5, 0.2, 1.0)] * len(saes), adam_betas=(0.9, 0.999), total_steps=STEPS, max_bad_steps=3, model=None, hook_point="h",
        resume_key={}, dead_window_tokens=2 * BATCH, batched=batched, batch_scale=batch_scale,
    )


class Probe(L.Callback):
    """Puts a NaN into member 1's encoder before step POISONED_AT; counts the operators of step COUNTED."""

    def __init__(self):
        self.counter = OpCounter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == POISONED_AT:
            with torch.no_grad():
                pl_module.saes[1].W_enc[0, 0] = float("nan")
        if batch_idx == COUNTED:
            self.counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == COUNTED:
            self.counter.__exit__(None, None, None)


def fit(architecture: str, batched: bool, log_dir) -> tuple[SaeTrainingModule, Probe]:
    batches = torch.randn(STEPS, BATCH, D_IN, generator=torch.Generator().manual_seed(0))
    module, probe = ensemble(make_saes(architecture), batched), Probe()
    trainer = L.Trainer(
        max_epochs=1, logger=CSVLogger(log_dir), log_every_n_steps=10, limit_val_batches=0, callbacks=[probe],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return module, probe


# two in the default suite (ReLU's resampling, TopK's AuxK and sparse decode); the rest in make test-slow
@pytest.mark.parametrize("architecture", [
    a if a in ("relu_l1", "topk") else pytest.param(a, marks=pytest.mark.slow) for a in sorted(MEMBERS)
])
def test_the_batched_step_trains_every_member_as_the_per_member_loop_does(architecture, tmp_path):
    with warnings.catch_warnings():
        # vmap's per-member fallback for an operator without a batching rule warns of a "performance drop"
        warnings.filterwarnings("error", message=".*performance drop.*")
        batched, probe = fit(architecture, True, tmp_path / "batched")
    looped, _ = fit(architecture, False, tmp_path / "looped")

    assert probe.counter.syncs == {} and sum(probe.counter.counts.values()) > 0
    # member 1's NaN: its steps skipped, then it left the ensemble; the other two went on as one group
    assert batched.dropped.keys() == looped.dropped.keys() == {1}
    optimizers = batched.optimizers(use_pl_optimizer=False), looped.optimizers(use_pl_optimizer=False)
    for i, (a, b) in enumerate(zip(batched.saes, looped.saes)):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            # the same arithmetic per member; only the order of float operations may differ
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, equal_nan=True, msg=f"member {i} {name}")
            state_a, state_b = optimizers[0].state[p], optimizers[1].state[q]
            for moment in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.isfinite(state_a[moment]).all()
                torch.testing.assert_close(state_a[moment], state_b[moment], rtol=1e-4, atol=1e-6)
        for name, buffer in a.named_buffers():  # BatchTopK's running threshold
            torch.testing.assert_close(buffer, b.get_buffer(name), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(batched.tokens_since_fired[i], looped.tokens_since_fired[i], rtol=0, atol=0)
    if MEMBERS[architecture][0].get("resample_every_tokens"):  # the silenced latents were resampled (bias reset to 0)
        assert (batched.saes[0].b_enc[-D_SAE // 4:] > -1).all()
    elif "topk" in architecture:  # AuxK moved the encoders of latents that are still dead
        dead = batched.dead_features([0])[0]
        moved = (batched.saes[0].W_enc - make_saes(architecture)[0].W_enc).abs().amax(dim=0) > 0
        assert (dead & moved).any()


def test_batches_divided_by_the_stream_train_as_batches_the_step_divides(tmp_path):
    """batch_scale=1 (a stream that divides each batch by the activation scale, as train.py's does) trains
    the very weights that raw batches divided in the step do."""
    raw = torch.randn(STEPS, BATCH, D_IN, generator=torch.Generator().manual_seed(0)) * 7.0
    modules = []
    for batches, batch_scale in ((raw, None), (raw / 7.0, 1.0)):
        module = ensemble(make_saes("topk")[:1], batched=False, act_scale=7.0, batch_scale=batch_scale)
        trainer = L.Trainer(max_epochs=1, logger=False, limit_val_batches=0, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        modules.append(module)
    assert modules[0].batch_scale == 7.0 and modules[1].batch_scale == 1.0
    for p, q in zip(modules[0].saes[0].parameters(), modules[1].saes[0].parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(modules[0].saes[0].W_enc, make_saes("topk")[0].W_enc)  # it trained


def test_members_form_one_group_per_shape():
    saes = [
        TopKSae(8, 32, k=4, aux_coef=0.1), TopKSae(8, 32, k=8), TopKSae(8, 32, k=4, aux_coef=0.5),
        ReluSae(8, 32, l1_coef=1), ReluSae(8, 64), ReluSae(8, 32, l1_coef=3), GatedSae(8, 32),
    ]
    assert ensemble(saes, True)._live_groups() == [[0, 2], [1], [3, 5], [4], [6]]
    module = ensemble(saes, True)
    module.dropped = {0: "diverged", 4: "diverged"}
    assert module._live_groups() == [[1], [2], [3, 5], [6]]
    assert ensemble(saes, False)._live_groups() == [[i] for i in range(7)]


def test_member_adam_steps_each_member_as_adam_does_and_leaves_a_skipped_one_untouched():
    from saesweep.step import MemberAdam

    members = [[torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(i))),
                torch.nn.Parameter(torch.randn(3, generator=torch.Generator().manual_seed(10 + i)))] for i in range(3)]
    alone = [[torch.nn.Parameter(p.detach().clone()) for p in params] for params in members]
    optimizer = MemberAdam(members, lrs=[1e-2, 2e-2, 3e-2], betas=(0.9, 0.99))
    references = [torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99)) for params, lr in zip(alone, (1e-2, 2e-2, 3e-2))]
    untouched = [p.detach().clone() for p in members[1]]
    for step in range(3):
        for params in (*members, *alone):
            for j, p in enumerate(params):
                p.grad = torch.full_like(p, 0.1 * (step + 1) + j)
        optimizer.skip = torch.tensor([False, True, False])
        optimizer.step()
        references[0].step()
        references[2].step()
    for i in (0, 2):
        for p, q in zip(members[i], alone[i]):
            torch.testing.assert_close(p, q)
            assert optimizer.state[p]["step"] == references[i].state[q]["step"] == 3
    assert all(torch.equal(p, q) for p, q in zip(members[1], untouched))
    assert all(optimizer.state[p]["step"] == 0 for p in members[1])


@pytest.mark.slow  # compiles six steps, about 45 s
@pytest.mark.parametrize("architecture", sorted(MEMBERS))
def test_the_batched_step_compiles_to_the_eager_step_and_runs_under_bf16_autocast(architecture):
    """train.compile=true and trainer.precision=bf16-mixed with the batched step (torch.func.vmap over members)."""
    saes = make_saes(architecture)
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(0))
    dead = torch.zeros(len(saes), D_SAE, dtype=torch.bool)
    dead[:, -D_SAE // 4:] = True
    coefficients = per_member_coefficients(saes, x.device)
    params = [p for sae in saes for p in sae.parameters()]

    def loss_and_grads(step):
        losses = step(saes, x, dead, False, coefficients).loss
        return losses.detach(), torch.autograd.grad(losses.sum(), params, allow_unused=True)

    eager_loss, eager_grads = loss_and_grads(batched_sae_step)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(batched_sae_step))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)
    for compiled, eager in zip(compiled_grads, eager_grads, strict=True):
        if eager is not None:
            torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed_loss, _ = loss_and_grads(batched_sae_step)
    assert mixed_loss.dtype == torch.float32
    torch.testing.assert_close(mixed_loss, eager_loss, rtol=0.05, atol=0)
