"""The training step of one SAE or of SAEs of one shape at once: the named losses (`sae_step`), the
batched form under torch.func.vmap (`batched_sae_step`), each SAE's own gradient clipping, and Adam with
one parameter group per SAE that skips an SAE's step on the device (`MemberAdam`)."""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from saesweep.sae import Sae, TrainStep


class MemberAdam(torch.optim.Adam):
    """Adam with one parameter group per SAE (group i: SAE i), which skips the step of the SAEs marked
    in `skip` ([n_saes] bool on the device, set by each training step) inside its fused kernel: their
    weights, moments and step counts stay as they were, and the host never waits to find out which."""

    def __init__(self, parameters_per_sae: Sequence[Any], lrs: Sequence[float], betas: tuple[float, float]):
        groups = [{"params": list(p), "lr": lr} for p, lr in zip(parameters_per_sae, lrs, strict=True)]
        super().__init__(groups, lr=lrs[0], betas=betas, fused=True)
        self.skip: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.skip is None:
            super().step()
            return loss
        # The fused kernel skips on `found_inf`, one flag per call: one call per SAE. Adam.step would also
        # move each call's step counts on and back (2 operators per SAE); here all move in one each.
        members = []
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, [], steps)
            members.append((group, params, grads, exp_avgs, exp_avg_sqs, steps))
        flags = self.skip.float().unbind()
        all_steps = [count for *_, steps in members for count in steps]
        torch._foreach_add_(all_steps, 1)
        for (group, params, grads, exp_avgs, exp_avg_sqs, steps), skip in zip(members, flags, strict=True):
            if params:
                beta1, beta2 = group["betas"]
                torch._fused_adam_(
                    params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"], beta1=beta1,
                    beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                    grad_scale=None, found_inf=skip,
                )
        torch._foreach_sub_(all_steps, [skip for (*_, steps), skip in zip(members, flags) for _ in steps])
        return loss


class StepLosses(NamedTuple):
    loss: torch.Tensor  # what the optimizer minimises: the sum of the terms
    # the architecture's named loss terms; "mse" is ‖x − x̂‖², batch mean (in the training's normalised units)
    terms: dict[str, torch.Tensor]
    l0: torch.Tensor | None  # only when asked for (logged steps)
    fired: torch.Tensor  # [d_sae] bool: the feature fired on some token of the batch

    def map(self, fn) -> StepLosses:
        """`fn` applied to every tensor."""
        terms = {name: fn(term) for name, term in self.terms.items()}
        return StepLosses(fn(self.loss), terms, None if self.l0 is None else fn(self.l0), fn(self.fired))

    def member(self, j: int) -> StepLosses:
        """Member j's losses, of a group's (whose every tensor has a leading member dimension)."""
        return self.map(lambda t: t[j])


def sae_step(sae: Sae, x: torch.Tensor, dead: torch.Tensor, with_l0: bool) -> StepLosses:
    """The training loss of `sae` on the batch `x` [batch, d_in]: the sum of its architecture's named
    terms (torch.compile makes one graph for each value of `with_l0`)."""
    step = sae.training_loss(x, dead)
    loss = functools.reduce(operator.add, step.losses.values())  # n - 1 operators; a stack and sum take two more
    l0 = (step.feature_acts > 0).sum(dim=-1).float().mean() if with_l0 else None
    fired = _fired(step, sae.d_sae)
    return StepLosses(loss, {name: term.detach() for name, term in step.losses.items()}, l0, fired)


@torch.no_grad()
def _fired(step: TrainStep, d_sae: int) -> torch.Tensor:
    """[d_sae] bool: the features active on some token of the step's batch."""
    if step.indices is None:
        return step.feature_acts.amax(dim=0) > 0
    active = (step.feature_acts > 0).to(step.feature_acts.dtype).flatten()
    return torch.zeros(d_sae, dtype=active.dtype, device=active.device).index_add(0, step.indices.flatten(), active) > 0


@torch.no_grad()
def clip_grad_norms(saes: Sequence[Sae], max_norms: Sequence[float]) -> None:
    """SAE i's gradient clipped to `max_norms[i]` on its own, not over the ensemble, so each member's step
    stays the one it would take alone: clip_grad_norm_'s arithmetic on each SAE's parameters (the norm
    of their gradients' norms, times max_norm / (norm + 1e-6) up to 1), for SAEs of one shape at once."""
    grads = [[p.grad for p in sae.parameters() if p.grad is not None] for sae in saes]
    if len({len(g) for g in grads}) > 1:  # SAEs of one shape whose gradients are not alike: one by one
        for sae, max_norm in zip(saes, max_norms, strict=True):
            torch.nn.utils.clip_grad_norm_(sae.parameters(), max_norm)
        return
    if grads[0]:
        flat = [g for member in grads for g in member]
        norms = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(flat)).view(len(saes), -1), dim=1)
        limits = torch.tensor(list(max_norms), dtype=norms.dtype, device=norms.device)
        factors = torch.clamp(limits / (norms + 1e-6), max=1.0).repeat_interleave(len(grads[0]))
        torch._foreach_mul_(flat, list(factors.unbind()))


def shape_key(sae: Sae) -> tuple:
    """What SAEs that share one batched step must have in common: architecture, sizes, and every
    hyperparameter that is not one of its `per_member_hyperparameters` (k, aux_k, group_sizes ...)."""
    fixed = sorted((k, repr(v)) for k, v in sae.hparams.items() if k not in sae.per_member_hyperparameters)
    return type(sae), sae.d_in, sae.d_sae, tuple(fixed)


def per_member_coefficients(saes: Sequence[Sae], device: torch.device) -> dict[str, torch.Tensor]:
    """The per-member hyperparameters on which these SAEs differ, each a [members] tensor."""
    names = [n for n in saes[0].per_member_hyperparameters if len({repr(sae.hparams[n]) for sae in saes}) > 1]
    dtype = saes[0].W_dec.dtype
    return {n: torch.tensor([float(sae.hparams[n]) for sae in saes], dtype=dtype, device=device) for n in names}


def batched_sae_step(
    saes: Sequence[Sae], x: torch.Tensor, dead: torch.Tensor, with_l0: bool, coefficients: dict[str, torch.Tensor]
) -> StepLosses:
    """`sae_step` of SAEs of one `shape_key` as one computation: their parameters and buffers stacked,
    the first SAE's step run under torch.func.vmap on the stacks, `dead` [members, d_sae] and the
    `coefficients` ([members] each, per_member_coefficients) per member. Every field of the result has a
    leading member dimension; the gradients reach each SAE's own parameters (through the stack), and
    what the step changes in a buffer (BatchTopK's running threshold) is written back to each SAE."""
    stepper = _SaeStep(saes[0])
    params = {f"sae.{n}": _Stack.apply(*[sae.get_parameter(n) for sae in saes]) for n, _ in saes[0].named_parameters()}
    buffers = {f"sae.{n}": torch.stack([sae.get_buffer(n) for sae in saes]) for n, _ in saes[0].named_buffers()}

    def member_step(params, buffers, dead, coefficients):
        return torch.func.functional_call(stepper, (params, buffers), (x, dead, with_l0, coefficients))

    out_dims = StepLosses(0, 0, 0 if with_l0 else None, 0)  # l0: None unless asked for
    step = torch.func.vmap(member_step, out_dims=out_dims)(params, buffers, dead, coefficients)
    for name, stacked in buffers.items():
        for sae, value in zip(saes, stacked.unbind()):
            sae.get_buffer(name.removeprefix("sae.")).copy_(value)
    return step


class _Stack(torch.autograd.Function):
    """torch.stack whose backward is one unbind: torch.stack's own selects each part apart, one operator
    per member and parameter on every step."""

    @staticmethod
    def forward(*tensors):
        return torch.stack(tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad.unbind()


class _SaeStep(nn.Module):
    """`sae_step` of `sae` as a module's forward (for torch.func.functional_call), with some of its
    hyperparameters replaced by the given values while it runs."""

    def __init__(self, sae: Sae):
        super().__init__()
        self.sae = sae

    def forward(self, x: torch.Tensor, dead: torch.Tensor, with_l0: bool, hyperparameters: dict[str, Any]) -> StepLosses:
        own = self.sae.hparams
        self.sae.hparams = own | hyperparameters
        try:
            return sae_step(self.sae, x, dead, with_l0)
        finally:
            self.sae.hparams = own
