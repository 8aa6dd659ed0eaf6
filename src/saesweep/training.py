"""The training step: a LightningModule that fits one SAE, or an ensemble of them, to a stream of
activations; its checkpoints (atomic, the previous one kept) and its stop at a step boundary on a signal.

Every SAE trains on activations divided by `act_scale` (chosen so that E‖x/scale‖² = d_in), which makes
one `l1_coef` mean the same on every model and layer; `raw_saes()` folds the scale back for
evaluation and saving.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import random
import signal
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from saesweep.errors import CheckpointError, TrainingDivergedError
from saesweep.io import atomic_link, atomic_write_bytes
from saesweep.metrics import EvalResult, MetricAccumulator
from saesweep.readback import DeviceReadback
from saesweep.sae import Sae

log = logging.getLogger(__name__)


def activation_scale(sample: torch.Tensor) -> float:
    """The factor that gives the sample [n, d_in] a mean squared norm of d_in."""
    return float((sample.float().pow(2).sum(dim=-1).mean() / sample.shape[-1]).sqrt())


class SaeTrainingModule(L.LightningModule):
    """Fits one SAE, or several at once (an ensemble), to one stream of activations.

    Every batch feeds every SAE. Their losses are summed into one backward pass; the SAEs share no
    parameter, so each gets exactly the gradient and the Adam update it would get trained alone, and
    the data path, the LM and the process are paid for once. `metric_prefixes[i]` names SAE i's
    metrics ("" for a lone SAE: `train/loss`; "dict3/" in an ensemble: `dict3/train/loss`).

    SAEs of one shape (architecture, sizes and every hyperparameter but their `per_member_hyperparameters`)
    take their step as one computation (`batched_sae_step`) when `batched` (None: on a GPU, where one
    batched computation replaces many small kernel launches; on the CPU compute dominates and the
    stacked copies cost more than they save: 136 against 87 ms a step for 8 members at d_sae 256,
    benchmarks/host_step.py); each keeps its own parameters, optimizer state, constraints and metrics.
    """

    def __init__(
        self,
        saes: Sequence[Sae],
        metric_prefixes: Sequence[str],
        act_scale: float,
        lr: float,
        adam_betas: tuple[float, float],
        lr_warmup_steps: int,
        lr_decay_fraction: float,
        total_steps: int,
        max_bad_steps: int,
        model,
        hook_point: str,
        resume_key: dict[str, object],
        compile: bool = False,
        dead_window_tokens: int = 1_000_000,
        grad_clip_norm: float | None = None,
        lr_warmup_max_fraction: float = 0.25,
        batched: bool | None = None,
    ):
        super().__init__()
        if len(saes) != len(metric_prefixes):
            raise ValueError(f"{len(saes)} SAEs and {len(metric_prefixes)} metric prefixes")
        self.saes = nn.ModuleList(saes)
        self.register_buffer("act_scale", torch.tensor(float(act_scale)))
        self.register_buffer("tokens_seen", torch.tensor(0, dtype=torch.long))
        self.metric_prefixes = list(metric_prefixes)
        self.lr = lr
        self.adam_betas = tuple(adam_betas)
        self.lr_warmup_steps = lr_warmup_steps
        self.lr_warmup_max_fraction = lr_warmup_max_fraction
        self.lr_decay_fraction = lr_decay_fraction
        self.total_steps = total_steps
        self.max_bad_steps = max_bad_steps
        self.register_buffer("skipped_steps", torch.tensor(0, dtype=torch.long))
        self._tokens_seen = 0  # tokens_seen as the host knows it (reading the buffer would wait on the device)
        # per step, its flags on their way to the host, with (step, members, tokens)
        self._step_flags = DeviceReadback()
        # per logging step, its metrics on their way to the loggers, with (step, epoch, names, host values)
        self._step_metrics = DeviceReadback()
        # per SAE and feature: training tokens since it last fired (checkpointed, cut per member in an ensemble)
        self.tokens_since_fired = [torch.zeros(sae.d_sae, dtype=torch.long) for sae in saes]
        self.dead_window_tokens = dead_window_tokens
        self.grad_clip_norm = grad_clip_norm
        self._bad_in_a_row = [0] * len(saes)
        # SAEs that diverged, with why: they train no more, their jobs fail, the others go on
        self.dropped: dict[int, str] = {}
        self.hook_point = hook_point
        # what must be unchanged for a checkpoint of this job to be resumed (data, shapes, schedule)
        self.resume_key = resume_key
        # fuses each SAE's forward pass and loss into fewer kernels; the first steps pay the compilation
        self._step = torch.compile(sae_step) if compile else sae_step
        self._batched_step = torch.compile(batched_sae_step) if compile else batched_sae_step
        self.batched = batched
        self._shape_keys = [shape_key(sae) for sae in saes]
        # per group of members stepped together: their hyperparameters that differ, one tensor each
        self._coefficients: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}
        self._member_index: dict[tuple[int, ...], torch.Tensor] = {}  # the live members, on the device
        # Kept outside the module tree on purpose: the LM must not enter checkpoints or the optimizer.
        object.__setattr__(self, "lm", model)
        self.last_evals: list[EvalResult] = []
        self._accumulators: list[MetricAccumulator] = []
        self._eval_saes: list[Sae] = []

    def raw_saes(self) -> list[Sae]:
        """The SAEs in raw activation units and their inference form (what is saved and evaluated)."""
        return [sae.rescaled(float(self.act_scale)).inference_form() for sae in self.saes]

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self._read_step_flags(wait=False)  # what earlier steps' flags told, once they reached the host
        self._emit_step_metrics(wait=False)
        x = batch / self.act_scale
        self._last_batch = x  # for the architectures that revive dead features after the step
        # Lightning's own test for "this step's metrics reach the loggers": L0 (a pass over the whole
        # batch × d_sae activations, ~6 % of a CPU step) is computed only then
        log_now = self.trainer._logger_connector.should_update_logs
        distributed = self.trainer.world_size > 1
        groups = self._live_groups()
        steps = [self._group_step(members, x, log_now) for members in groups]
        members = [i for group in groups for i in group]  # the live ones, in the order of `finite`
        # Which members' losses are finite is decided and acted on on the device, with no host sync:
        # a member whose loss is not finite gets no Adam step (MemberAdam.skip) and its counters stand
        # still; the host reads the flags a step or more later. Under DDP every rank skips the same
        # members (a min-all-reduce), or their gradient all-reduces would fall out of step.
        losses = torch.cat([step.loss for step in steps])
        finite = torch.isfinite(losses)
        if distributed:
            finite = self.trainer.strategy.reduce(finite.float(), reduce_op="min") > 0
        if len(members) == len(self.saes):
            skip = ~finite
        else:  # the dropped skip every step; a list index would be copied to the device, and waited for
            skip = torch.ones(len(self.saes), dtype=torch.bool, device=x.device)
            key = tuple(members)
            if key not in self._member_index:
                self._member_index[key] = torch.tensor(members, device=x.device)
            skip[self._member_index[key]] = ~finite
        self.optimizers(use_pl_optimizer=False).skip = skip
        step_tokens = batch.shape[0] * self.trainer.world_size
        # per SAE: skipped; last: the batch held NaN/Inf
        flags = torch.cat([skip, ~torch.isfinite(batch).all().reshape(1)])
        self._step_flags.put((self.global_step, members, step_tokens), flags)
        self.tokens_seen += step_tokens * finite.any()
        self._tokens_seen += step_tokens  # the host's count; a step found skipped is taken back
        self.skipped_steps += ~finite.all()
        self._count_firing(groups, [step.fired for step in steps], finite, step_tokens, distributed)
        if log_now:
            self._log_step({i: step.member(j) for group, step in zip(groups, steps) for j, i in enumerate(group)}, distributed)
        # a skipped member's loss is masked to 0; the NaN gradients it leaves are never applied
        return torch.where(finite, losses, 0.0).sum()

    def _live_groups(self) -> list[list[int]]:
        """The members not dropped, by shape: each group steps as one computation."""
        return self._shape_groups(i for i in range(len(self.saes)) if i not in self.dropped)

    def _shape_groups(self, members: Iterable[int]) -> list[list[int]]:
        """The members by shape (`shape_key`); one member each when not `batched`."""
        batched = self.batched if self.batched is not None else self.act_scale.device.type == "cuda"
        if not batched:
            return [[i] for i in members]
        groups: dict[tuple, list[int]] = {}
        for i in members:
            groups.setdefault(self._shape_keys[i], []).append(i)
        return list(groups.values())

    def _group_step(self, members: list[int], x: torch.Tensor, log_now: bool) -> StepLosses:
        """The step of a group of members of one shape: every field with a leading member dimension."""
        saes = [self.saes[i] for i in members]
        dead = self.dead_features(members)
        if len(members) == 1:
            return self._step(saes[0], x, dead[0], log_now).map(lambda t: t[None])
        key = tuple(members)
        if key not in self._coefficients:  # made once (until coefficients_changed): a tensor from host values each step would wait
            self._coefficients[key] = per_member_coefficients(saes, x.device)
        return self._batched_step(saes, x, dead, log_now, self._coefficients[key])

    def _log_step(self, steps: dict[int, StepLosses], distributed: bool) -> None:
        """Send this step's metrics on their way to the loggers: one stacked tensor copied to the host in
        the background (`_emit_step_metrics` logs it once it arrived). Lightning's `self.log` would turn
        each value into a Python number at every later step's end, a host sync per value and step."""
        names, values, host_values = [], [], {}
        for i, step in steps.items():
            prefix = self.metric_prefixes[i]
            on_device = {
                f"{prefix}train/loss": step.loss,
                **{f"{prefix}train/loss_{name}": term for name, term in step.terms.items()},
                # reported in raw activation units, comparable with eval/mse and metrics.json
                f"{prefix}train/mse": step.mse * self.act_scale**2,
                f"{prefix}train/l0": step.l0,
                f"{prefix}train/skipped_steps": self.skipped_steps,
                f"{prefix}train/dead_fraction": self.dead_features([i]).float().mean(),
            }
            names += on_device
            values += [v.float() for v in on_device.values()]
            host_values[f"{prefix}train/lr"] = self.trainer.optimizers[0].param_groups[i]["lr"]  # after warm-up/decay
        stacked = torch.stack(values)
        if distributed:
            stacked = self.trainer.strategy.reduce(stacked, reduce_op="mean")
        # the step Lightning's own logging would give them: the optimizer steps taken once this one is
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped + 1
        self._step_metrics.put((step, self.current_epoch, names, host_values), stacked)

    def _emit_step_metrics(self, wait: bool) -> None:
        """Log the metrics of earlier logging steps that reached the host (all of them when `wait`); a
        lone SAE's also go to the progress bar."""
        for (step, epoch, names, host_values), values in self._step_metrics.ready(wait):
            metrics = dict(zip(names, values.tolist())) | host_values
            self.trainer._logger_connector.log_metrics(metrics | {"epoch": epoch}, step=step)
            if len(self.saes) == 1:
                self.trainer.progress_bar_metrics.update(metrics)

    def _read_step_flags(self, wait: bool) -> None:
        """Act on the flags of earlier steps that reached the host (on all of them when `wait`):
        count bad steps in a row, warn, drop a member after train.max_bad_steps of them."""
        for (step, members, step_tokens), host_flags in self._step_flags.ready(wait):
            flags = host_flags.tolist()
            bad = [i for i in members if flags[i]]
            for i in members:
                if not flags[i]:
                    self._bad_in_a_row[i] = 0
            if len(bad) == len(members):
                self._tokens_seen -= step_tokens
            if bad:
                self._skip_bad_members(bad, "activations" if flags[-1] else "loss", step)

    def coefficients_changed(self) -> None:
        """An SAE's coefficient hyperparameter was changed (sae.target_l0's controller): batched steps
        rebuild their per-member coefficients from the SAEs' hyperparameters."""
        self._coefficients.clear()

    def dead_features(self, members: Sequence[int]) -> torch.Tensor:
        """[len(members), d_sae] bool: the features of these SAEs (of one d_sae) that did not fire on the
        last dead_window_tokens training tokens (on all of them while fewer were seen)."""
        window = torch.clamp(self.tokens_seen, min=1, max=self.dead_window_tokens)
        return self._since_fired(members) >= window

    def _since_fired(self, members: Sequence[int]) -> torch.Tensor:
        return torch.stack([self.tokens_since_fired[i] for i in members]).to(self.tokens_seen.device)

    @torch.no_grad()
    def _count_firing(
        self, groups: list[list[int]], fired: list[torch.Tensor], finite: torch.Tensor, step_tokens: int,
        distributed: bool,
    ) -> None:
        """Per group: `fired` [members, d_sae]; `finite` [all live members, group by group]."""
        for members, f, ok in zip(groups, fired, finite.split([len(g) for g in groups])):
            if distributed:  # a feature fired when it fired on any rank's part of the batch
                f = self.trainer.strategy.reduce(f.float(), reduce_op="max") > 0
            since = self._since_fired(members)
            since = torch.where(ok[:, None], torch.where(f, 0, since + step_tokens), since)
            for i, row in zip(members, since.unbind()):
                self.tokens_since_fired[i] = row

    def _skip_bad_members(self, members: list[int], what: str, step: int) -> None:
        """These SAEs skipped `step`; one that had train.max_bad_steps bad steps in a row stops the job
        when it is alone, and leaves the ensemble (its job fails, the others go on) when it is not."""
        for i in members:
            self._bad_in_a_row[i] += 1
            whose = f" for {self.metric_prefixes[i].rstrip('/')}" if len(self.saes) > 1 else ""
            log.warning("step %d skipped%s: NaN/Inf in the %s (%d in a row)", step, whose, what, self._bad_in_a_row[i])
            if self._bad_in_a_row[i] < self.max_bad_steps:
                continue
            checkpoint = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
            error = TrainingDivergedError(
                f"{self._bad_in_a_row[i]} consecutive steps up to step {step} had NaN/Inf "
                f"{what} (train.max_bad_steps={self.max_bad_steps}); last good checkpoint: {checkpoint}. "
                "Check the activations, or lower train.lr and resume from the checkpoint."
            )
            self.dropped[i] = str(error)
            if len(self.dropped) == len(self.saes):
                raise error
            log.error("%s leaves the ensemble: %s", self.metric_prefixes[i].rstrip("/"), error)

    def on_before_optimizer_step(self, optimizer) -> None:
        for members in self._shape_groups(range(len(self.saes))):
            saes = [self.saes[i] for i in members]
            type(saes[0]).before_optimizer_step(saes)
        if self.grad_clip_norm is not None:
            for members in self._live_groups():
                clip_grad_norms([self.saes[i] for i in members], self.grad_clip_norm)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here and not in on_train_batch_end: callbacks (the periodic checkpoint) run before the
        # module's on_train_batch_end, and a checkpoint must hold the renormalised decoder.
        optimizer = self.optimizers(use_pl_optimizer=False)
        step_tokens = self._last_batch.shape[0] * self.trainer.world_size
        for members in self._shape_groups(range(len(self.saes))):  # the dropped too, as before
            saes = [self.saes[i] for i in members]
            type(saes[0]).after_optimizer_step(saes)
        for members in self._live_groups():
            due = [i for i in members if self.saes[i].revives_after(self._tokens_seen, step_tokens)]
            for i, dead in zip(due, self.dead_features(due).unbind() if due else ()):
                revived = self.saes[i].revive_dead(dead, self._last_batch, optimizer, self._tokens_seen, step_tokens)
                if revived is not None:
                    since = self.tokens_since_fired[i]
                    self.tokens_since_fired[i] = torch.where(revived.to(since.device), 0, since)
                    log.info("step %d: %s%d dead features resampled", self.global_step, self.metric_prefixes[i], int(revived.sum()))

    def on_train_end(self) -> None:
        self._read_step_flags(wait=True)
        self._emit_step_metrics(wait=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._read_step_flags(wait=True)  # a checkpoint holds every drop up to its step
        self._emit_step_metrics(wait=True)  # and its metrics are logged, should the job stop here
        # Lightning does not save the global RNGs; nothing in training draws from them today, but a
        # resumed job must continue any that a future step uses exactly where they stood.
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        checkpoint["saesweep_resume_key"] = self.resume_key
        # clone: a batched group's counters are views of one tensor, which torch.save would store whole
        checkpoint["saesweep_tokens_since_fired"] = [since.cpu().clone() for since in self.tokens_since_fired]
        checkpoint["saesweep_dropped"] = {str(i): why for i, why in self.dropped.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # checkpoints written before the key existed carry none and are resumed unchecked
        saved = checkpoint.get("saesweep_resume_key", self.resume_key)
        changed = sorted(k for k in saved.keys() | self.resume_key.keys() if saved.get(k) != self.resume_key.get(k))
        if changed:
            differences = ", ".join(f"{k}: {saved.get(k)!r} then, {self.resume_key.get(k)!r} now" for k in changed)
            raise CheckpointError(
                f"checkpoints/last.ckpt of this run directory belongs to a job with other settings ({differences}); "
                "rerun with the original settings to resume, or use a new output directory to start afresh"
            )
        self._tokens_seen = int(checkpoint["state_dict"]["tokens_seen"])
        if "saesweep_tokens_since_fired" in checkpoint:
            self.tokens_since_fired = list(checkpoint["saesweep_tokens_since_fired"])
        self.dropped = {int(i): why for i, why in checkpoint.get("saesweep_dropped", {}).items()}
        if states := checkpoint.get("rng_states"):
            torch.set_rng_state(states["torch"])
            random.setstate(states["python"])

    def configure_optimizers(self):
        optimizer = MemberAdam([sae.parameters() for sae in self.saes], lr=self.lr, betas=self.adam_betas)
        # total_steps is given, not read from trainer.estimated_stepping_batches: that property sets the
        # train loader up before a resumed job restores the loader's position, which is then lost.
        total = max(self.total_steps, 1)
        decay_start = int(total * (1 - self.lr_decay_fraction))
        warmup = warmup_steps(self.lr_warmup_steps, total, self.lr_warmup_max_fraction)
        if warmup < self.lr_warmup_steps:
            log.info("learning-rate warm-up: %d steps, train.lr_warmup_max_fraction=%g of the %d (train.lr_warmup_steps=%d)",
                     warmup, self.lr_warmup_max_fraction, total, self.lr_warmup_steps)

        def lr_factor(step: int) -> float:
            # linear warm-up, constant, then linear decay to zero over the last lr_decay_fraction
            if step < warmup:
                return (step + 1) / warmup
            if step >= decay_start:
                return max(total - step, 0) / max(total - decay_start, 1)
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_validation_epoch_start(self) -> None:
        self._eval_saes = self.raw_saes()
        self._accumulators = [MetricAccumulator(sae.d_in, sae.d_sae, self.device) for sae in self._eval_saes]

    def validation_step(self, batch, batch_idx: int) -> None:
        for sae, accumulator in zip(self._eval_saes, self._accumulators):
            accumulator.update(sae, self.lm, self.hook_point, batch)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.world_size > 1:  # each rank evaluated its own part of the held-out set
            for accumulator in self._accumulators:
                accumulator.all_reduce()
        self.last_evals = [accumulator.compute() for accumulator in self._accumulators]
        for prefix, result in zip(self.metric_prefixes, self.last_evals):
            self.log_dict({f"{prefix}eval/{k}": v for k, v in result.metrics.items()})
        self._accumulators, self._eval_saes = [], []


class MemberAdam(torch.optim.Adam):
    """Adam with one parameter group per SAE (group i: SAE i), which skips the step of the SAEs marked
    in `skip` ([n_saes] bool on the device, set by each training step) inside its fused kernel: their
    weights, moments and step counts stay as they were, and the host never waits to find out which."""

    def __init__(self, parameters_per_sae: Sequence[Any], lr: float, betas: tuple[float, float]):
        super().__init__([{"params": list(p)} for p in parameters_per_sae], lr=lr, betas=betas, fused=True)
        self.skip: torch.Tensor | None = None

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.skip is None:
            super().step()
            return loss
        groups = self.param_groups
        try:  # the fused kernel skips on `found_inf`, one flag per call: one call per group
            for group, skip in zip(groups, self.skip.float()):
                self.param_groups, self.found_inf = [group], skip
                super().step()
        finally:
            self.param_groups, self.found_inf = groups, None
        return loss


class StepLosses(NamedTuple):
    loss: torch.Tensor  # what the optimizer minimises: the sum of the terms
    terms: dict[str, torch.Tensor]  # the architecture's named loss terms
    mse: torch.Tensor  # ‖x − x̂‖², batch mean (in the training's normalised units)
    l0: torch.Tensor | None  # only when asked for (logged steps)
    fired: torch.Tensor  # [d_sae] bool: the feature fired on some token of the batch

    def map(self, fn) -> StepLosses:
        """`fn` applied to every tensor."""
        terms = {name: fn(term) for name, term in self.terms.items()}
        return StepLosses(fn(self.loss), terms, fn(self.mse), None if self.l0 is None else fn(self.l0), fn(self.fired))

    def member(self, j: int) -> StepLosses:
        """Member j's losses, of a group's (whose every tensor has a leading member dimension)."""
        return self.map(lambda t: t[j])


def warmup_steps(lr_warmup_steps: int, total_steps: int, max_fraction: float) -> int:
    """The steps of the linear warm-up: lr_warmup_steps, but at most max_fraction of the run, so a short
    run still trains at its full learning rate."""
    return max(min(lr_warmup_steps, int(total_steps * max_fraction)), 1)


def sae_step(sae: Sae, x: torch.Tensor, dead: torch.Tensor, with_l0: bool) -> StepLosses:
    """The training loss of `sae` on the batch `x` [batch, d_in]: the sum of its architecture's named
    terms (torch.compile makes one graph for each value of `with_l0`)."""
    step = sae.training_loss(x, dead)
    loss = torch.stack(list(step.losses.values())).sum()
    mse = (step.x_hat.detach() - x).pow(2).sum(dim=-1).mean()
    l0 = (step.feature_acts > 0).sum(dim=-1).float().mean() if with_l0 else None
    fired = step.feature_acts.detach().amax(dim=0) > 0
    return StepLosses(loss, {name: term.detach() for name, term in step.losses.items()}, mse, l0, fired)


@torch.no_grad()
def clip_grad_norms(saes: Sequence[Sae], max_norm: float) -> None:
    """Each SAE's gradient clipped to `max_norm` on its own, not over the ensemble, so each member's step
    stays the one it would take alone: clip_grad_norm_'s arithmetic on each SAE's parameters (the norm
    of their gradients' norms, times max_norm / (norm + 1e-6) up to 1), for SAEs of one shape at once."""
    grads = [[p.grad for p in sae.parameters() if p.grad is not None] for sae in saes]
    if len({len(g) for g in grads}) > 1:  # SAEs of one shape whose gradients are not alike: one by one
        for sae in saes:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), max_norm)
        return
    if grads[0]:
        flat = [g for member in grads for g in member]
        norms = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(flat)).view(len(saes), -1), dim=1)
        factors = torch.clamp(max_norm / (norms + 1e-6), max=1.0).repeat_interleave(len(grads[0]))
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

    out_dims = StepLosses(0, 0, 0, 0 if with_l0 else None, 0)  # l0: None unless asked for
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file, fsynced, then renamed over the old one: a job killed
    mid-write leaves the previous last.ckpt intact instead of a truncated one. The checkpoint it
    replaces is kept as `previous_checkpoint(path)`, for the day the new one is damaged on disk."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        path = Path(path)
        if path.is_file():
            atomic_link(path, previous_checkpoint(path))
        atomic_write_bytes(path, buffer.getvalue())


def previous_checkpoint(path: Path) -> Path:
    """Where the checkpoint that `path` replaced is kept: last.ckpt → last.previous.ckpt."""
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def readable_checkpoint(last: Path) -> Path | None:
    """The checkpoint to resume from: `last`, or the one it replaced when `last` cannot be read. A
    checkpoint that cannot be read is moved aside (named in one log line), never unpickled beyond
    tensors and plain values; None when no readable one is left, and training starts over."""
    moved = False
    for path in (last, previous_checkpoint(last)):
        if not path.is_file():
            continue
        try:
            torch.load(path, map_location="cpu", weights_only=True)
            return path
        except Exception as e:  # a damaged file fails in many ways (zip, unpickling, EOF, ...)
            aside = path.with_name(f"{path.name}.unreadable-{datetime.now():%Y%m%d-%H%M%S}")
            with contextlib.suppress(FileNotFoundError):  # another DDP rank moved it first
                os.replace(path, aside)
            moved = True
            log.warning("checkpoint %s cannot be read (%s); moved aside to %s", path, _why_unreadable(e), aside.name)
    if moved:
        log.warning("no readable checkpoint is left in %s: training starts over", last.parent)
    return None


def _why_unreadable(error: Exception) -> str:
    # torch's unpickling message advises weights_only=False, which is unsafe advice for a damaged file
    if isinstance(error, pickle.UnpicklingError):
        return "UnpicklingError: it holds something other than tensors and plain values"
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else 'no detail'}"


# What a scheduler sends before it kills a job: Slurm's SIGTERM at the end, SIGUSR1 with --signal (the
# requeue signal Lightning's SLURMEnvironment uses). SIGUSR2 is submitit's preemption signal: it is
# taken only where submitit has a handler for it, which is then called after the checkpoint.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
_CHAINED_SIGNALS = (signal.SIGUSR2,)


class StopOnSignal(L.Callback):
    """Ctrl-C (SIGINT) or a scheduler's signal during training: finish the current step, write
    `checkpoint_path`, stop. `signum` tells the caller which signal stopped it (None: none did).

    Lightning's own handling exits without a checkpoint (and turns SIGTERM into a SystemExit), and a
    signal that lands between the optimizer and scheduler steps would leave them inconsistent;
    waiting for the step boundary avoids both. A second Ctrl-C interrupts at once. A chained signal's
    earlier handler (submitit's requeue) runs once the checkpoint is written.
    """

    def __init__(self, checkpoint_path: Path):
        self.checkpoint_path = Path(checkpoint_path)
        self.signum: int | None = None
        self._previous_handlers: dict[int, Any] = {}

    def _request_stop(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        again = " (Ctrl-C again to abort)" if signum == signal.SIGINT else ""
        log.warning("%s: stopping after this step and writing %s%s", signal.Signals(signum).name, self.checkpoint_path, again)

    def on_train_start(self, trainer, pl_module) -> None:
        # not on_fit_start: Lightning records the signal handlers after that hook and puts them back
        # when fit ends, which would reinstall this one after a failed job
        chained = [s for s in _CHAINED_SIGNALS if callable(signal.getsignal(s))]
        for signum in (*STOP_SIGNALS, *chained):
            self._previous_handlers[signum] = signal.signal(signum, self._request_stop)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.signum is not None and not trainer.should_stop:
            trainer.save_checkpoint(self.checkpoint_path, weights_only=False)  # the whole state
            trainer.should_stop = True
            if self.signum in _CHAINED_SIGNALS:
                handler = self._previous_handlers[self.signum]
                self._restore_handlers()
                handler(self.signum, None)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()  # Lightning skips the teardown hooks when fit raises

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(signum, handler)
        self._previous_handlers = {}
