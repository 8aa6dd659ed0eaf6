"""The training loop's module: a LightningModule that fits one SAE, or an ensemble of them, to a stream
of activations, with the bookkeeping around each step (skipped members, dead features, logging, the
learning-rate schedule, what a checkpoint holds). The step itself is in step.py, the checkpoint files
and the stop on a signal in checkpoints.py.

Every SAE trains on activations divided by `act_scale` (chosen so that E‖x/scale‖² = d_in), which makes
one `l1_coef` mean the same on every model and layer; `raw_saes()` folds the scale back for
evaluation and saving.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

from saesweep.errors import CheckpointError, TrainingDivergedError
from saesweep.metrics import HEADLINE_SET, EvalResult, MetricAccumulator
from saesweep.readback import DeviceReadback
from saesweep.recipe import Recipe
from saesweep.sae import Sae
from saesweep.step import (
    MemberAdam,
    StepLosses,
    batched_sae_step,
    clip_grad_norms,
    per_member_coefficients,
    sae_step,
    shape_key,
)

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
    Each counts a feature dead after its recipe's `dead_window_tokens` silent training tokens, or after
    `dead_window_tokens` (train.dead_window_tokens) when its recipe names none.
    """

    def __init__(
        self,
        saes: Sequence[Sae],
        metric_prefixes: Sequence[str],
        act_scale: float,
        recipes: Sequence[Recipe],
        adam_betas: tuple[float, float],
        total_steps: int,
        max_bad_steps: int,
        model,
        hook_point: str,
        resume_key: dict[str, object],
        compile: bool = False,
        dead_window_tokens: int = 1_000_000,
        lr_warmup_max_fraction: float = 0.25,
        batched: bool | None = None,
        eval_set_names: Sequence[str] = (HEADLINE_SET,),
        batch_scale: float | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False  # training_step steps the optimizer itself
        if not len(saes) == len(metric_prefixes) == len(recipes):
            raise ValueError(f"{len(saes)} SAEs, {len(metric_prefixes)} metric prefixes and {len(recipes)} recipes")
        self.saes = nn.ModuleList(saes)
        self.register_buffer("act_scale", torch.tensor(float(act_scale)))
        # what each training batch is divided by before the SAEs see it: act_scale (None) for batches of raw
        # activations, 1 for a stream that divides them already (StoreStream's scale), which saves an
        # operator over the whole batch at every step
        self.batch_scale = float(act_scale if batch_scale is None else batch_scale)
        self.register_buffer("tokens_seen", torch.tensor(0, dtype=torch.long))
        self.metric_prefixes = list(metric_prefixes)
        self.recipes = list(recipes)  # SAE i's learning rate, schedule and gradient clip
        self.adam_betas = tuple(adam_betas)
        self.lr_warmup_max_fraction = lr_warmup_max_fraction
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
        # per SAE: the training tokens a feature must stay silent for to count as dead (its recipe's, or the
        # shared default); from the config, so not checkpointed
        windows = [recipe.dead_window(dead_window_tokens) for recipe in recipes]
        self.register_buffer("dead_window_tokens", torch.tensor(windows, dtype=torch.long), persistent=False)
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
        self._member_index: dict[tuple[int, ...], torch.Tensor] = {}  # groups of members, on the device
        self._none_dead_masks: dict[tuple[int, ...], torch.Tensor] = {}  # per group, for architectures without AuxK
        # Kept outside the module tree on purpose: the LM must not enter checkpoints or the optimizer.
        object.__setattr__(self, "lm", model)
        self.last_evals: list[EvalResult] = []
        self.last_evals_step: int | None = None  # the global step last_evals were measured at
        self.eval_set_names = list(eval_set_names)  # of the validation dataloaders, in order: the headline first
        self._accumulators: list[MetricAccumulator] = []
        self._eval_saes: list[Sae] = []

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning names the running hook here some 20 times a step; nn.Module's __setattr__ looks for a
        # parameter, buffer or module of that name each time, about 4 µs on the host (benchmarks/host_step.py)
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def raw_saes(self) -> list[Sae]:
        """The SAEs in raw activation units and their inference form (what is saved and evaluated)."""
        return [sae.rescaled(float(self.act_scale)).inference_form() for sae in self.saes]

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._read_step_flags(wait=False)  # what earlier steps' flags told, once they reached the host
        self._emit_step_metrics(wait=False)
        x = batch if self.batch_scale == 1.0 else batch / self.batch_scale
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
        losses = steps[0].loss if len(steps) == 1 else torch.cat([step.loss for step in steps])
        finite = torch.isfinite(losses)
        if distributed:
            finite = self.trainer.strategy.reduce(finite.float(), reduce_op="min") > 0
        if len(members) == len(self.saes):
            skip = ~finite
        else:  # the dropped skip every step
            skip = torch.ones(len(self.saes), dtype=torch.bool, device=x.device)
            skip[self._device_index(members)] = ~finite
        optimizer = self.optimizers()
        optimizer.optimizer.skip = skip
        step_tokens = batch.shape[0] * self.trainer.world_size
        # the batch travels with the flags: whether it held the NaN/Inf is asked only of a step that skipped
        self._step_flags.put((self.global_step, members, step_tokens, batch), skip)
        self.tokens_seen += step_tokens * finite.any()
        self._tokens_seen += step_tokens  # the host's count; a step found skipped is taken back
        self.skipped_steps += ~finite.all()
        self._count_firing(groups, [step.fired for step in steps], finite, step_tokens, distributed)
        if log_now:
            self._log_step({i: step.member(j) for group, step in zip(groups, steps) for j, i in enumerate(group)}, distributed)
        # Optimized by hand: Lightning's automatic loop (its closure, hooks and output checks) cost about 0.1 ms
        # a step more on the host, where the GPU then waits (benchmarks/host_step.py). The step goes through
        # Lightning's optimizer all the same, which counts global_step, unscales 16-bit gradients and calls
        # on_before_optimizer_step (the clip) first.
        # A skipped member's NaN gradients stay in its own parameters (members share none) and are never applied.
        self.manual_backward(losses.sum())
        optimizer.step()
        optimizer.optimizer.zero_grad()
        self.lr_schedulers().step()
        self._after_optimizer_step(optimizer.optimizer, step_tokens)

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
        dead = self.dead_features(members) if saes[0].reads_dead_mask else self._none_dead(members, saes[0].d_sae)
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
                f"{prefix}train/mse": step.terms["mse"] * self.act_scale**2,
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
        for (step, members, step_tokens, batch), host_flags in self._step_flags.ready(wait):
            flags = host_flags.tolist()
            bad = [i for i in members if flags[i]]
            for i in members:
                if not flags[i]:
                    self._bad_in_a_row[i] = 0
            if len(bad) == len(members):
                self._tokens_seen -= step_tokens
            if bad:  # rare: the one place a step's own data is read back at once
                self._skip_bad_members(bad, "loss" if torch.isfinite(batch).all() else "activations", step)

    def coefficients_changed(self) -> None:
        """An SAE's coefficient hyperparameter was changed (sae.target_l0's controller): batched steps
        rebuild their per-member coefficients from the SAEs' hyperparameters."""
        self._coefficients.clear()

    def dead_features(self, members: Sequence[int]) -> torch.Tensor:
        """[len(members), d_sae] bool: the features of these SAEs (of one d_sae) that did not fire on the
        last dead_window_tokens training tokens of each (on all of them while fewer were seen)."""
        window = torch.minimum(self.dead_window_tokens[self._device_index(members)], self.tokens_seen.clamp(min=1))
        return self._since_fired(members) >= window[:, None]

    def _device_index(self, members: Sequence[int]) -> torch.Tensor:
        """These members' indices as a tensor on the device, made once: a list index would be copied to the
        device at each use, and waited for."""
        key = tuple(members)
        if key not in self._member_index:
            self._member_index[key] = torch.tensor(key, device=self.tokens_seen.device)
        return self._member_index[key]

    def _none_dead(self, members: Sequence[int], d_sae: int) -> torch.Tensor:
        """An all-false dead mask for these members, made once."""
        key = tuple(members)
        if key not in self._none_dead_masks:
            self._none_dead_masks[key] = torch.zeros(len(members), d_sae, dtype=torch.bool, device=self.tokens_seen.device)
        return self._none_dead_masks[key]

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
            log.warning("step %d skipped%s: NaN/Inf in the %s (%d in a row)", step, self._whose(i, "for"), what,
                        self._bad_in_a_row[i])
            if self._bad_in_a_row[i] < self.max_bad_steps:
                continue
            checkpoint = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
            error = TrainingDivergedError(
                f"{self._bad_in_a_row[i]} consecutive steps up to step {step} had NaN/Inf "
                f"{what} (train.max_bad_steps={self.max_bad_steps}); last good checkpoint: {checkpoint}. "
                "Check the activations, or lower sae.recipe.lr and resume from the checkpoint."
            )
            self.dropped[i] = str(error)
            if len(self.dropped) == len(self.saes):
                raise error
            log.error("%s leaves the ensemble: %s", self._run_name(i), error)

    def _whose(self, i: int, preposition: str) -> str:
        """" for run 3" naming SAE i by its run directory in a log line of an ensemble; "" for a lone SAE."""
        return f" {preposition} {self._run_name(i)}" if len(self.saes) > 1 else ""

    def _run_name(self, i: int) -> str:
        return f"run {self.metric_prefixes[i].rstrip('/')}"

    def on_before_optimizer_step(self, optimizer) -> None:
        for members in self._shape_groups(range(len(self.saes))):
            saes = [self.saes[i] for i in members]
            type(saes[0]).before_optimizer_step(saes)
        for members in self._live_groups():
            clipped = [i for i in members if self.recipes[i].grad_clip_norm is not None]
            if clipped:
                clip_grad_norms([self.saes[i] for i in clipped], [self.recipes[i].grad_clip_norm for i in clipped])

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, step_tokens: int) -> None:
        """The constraints after each update (unit decoder rows), and resampling where it is due. In the
        step and not in on_train_batch_end: callbacks (the periodic checkpoint) run before the module's
        on_train_batch_end, and a checkpoint must hold the renormalised decoder."""
        total_tokens = self.total_steps * step_tokens
        for members in self._shape_groups(range(len(self.saes))):  # the dropped too, as before
            saes = [self.saes[i] for i in members]
            type(saes[0]).after_optimizer_step(saes)
        for members in self._live_groups():
            due = [i for i in members if self.saes[i].revives_after(self._tokens_seen, step_tokens, total_tokens)]
            for i, dead in zip(due, self.dead_features(due).unbind() if due else ()):
                revived = self.saes[i].revive_dead(dead, self._last_batch, optimizer, self._tokens_seen, step_tokens)
                if revived is not None:
                    since = self.tokens_since_fired[i]
                    self.tokens_since_fired[i] = torch.where(revived.to(since.device), 0, since)
                    log.info("step %d: %d dead features resampled%s", self.global_step, int(revived.sum()),
                             self._whose(i, "in"))

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
        optimizer = MemberAdam([sae.parameters() for sae in self.saes], [r.lr for r in self.recipes], betas=self.adam_betas)
        # total_steps is given, not read from trainer.estimated_stepping_batches: that property sets the
        # train loader up before a resumed job restores the loader's position, which is then lost.
        for recipe in {r.lr_warmup_steps: r for r in self.recipes}.values():  # one line per warm-up asked for
            if (warmup := recipe.warmup_steps(self.total_steps, self.lr_warmup_max_fraction)) < recipe.lr_warmup_steps:
                log.info("learning-rate warm-up: %d steps, train.lr_warmup_max_fraction=%g of the %d "
                         "(sae.recipe.lr_warmup_steps=%d)", warmup, self.lr_warmup_max_fraction, self.total_steps,
                         recipe.lr_warmup_steps)
        factors = [r.lr_factor(self.total_steps, self.lr_warmup_max_fraction) for r in self.recipes]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)  # one schedule per SAE's parameter group
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_validation_epoch_start(self) -> None:
        self._eval_saes = self.raw_saes()
        # per held-out set (validation dataloader, in eval_set_names' order), one accumulator per SAE
        self._accumulators = [
            [MetricAccumulator(sae.d_in, sae.d_sae, self.device) for sae in self._eval_saes] for _ in self.eval_set_names
        ]

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        for sae, accumulator in zip(self._eval_saes, self._accumulators[dataloader_idx]):
            accumulator.update(sae, self.lm, self.hook_point, batch)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.world_size > 1:  # each rank evaluated its own part of each held-out set
            for accumulator in (a for per_set in self._accumulators for a in per_set):
                accumulator.all_reduce()
        per_set = [[accumulator.compute() for accumulator in accumulators] for accumulators in self._accumulators]
        self.last_evals = [
            EvalResult.of_sets(dict(zip(self.eval_set_names, results))) for results in zip(*per_set)
        ]
        self.last_evals_step = self.global_step
        for prefix, result in zip(self.metric_prefixes, self.last_evals):
            self.log_dict({f"{prefix}eval/{k}": v for k, v in result.metrics.items()})
        self._accumulators, self._eval_saes = [], []
