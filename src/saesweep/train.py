"""Training jobs end to end: data → LM activations → store → SAE training → run directories.

`train_ensemble(cfgs, run_dirs, ...)` trains one dictionary per config in one pass over the
activations (a lone job is an ensemble of one); saesweep.job.run_jobs calls it for every launcher,
the top-level train.py's Hydra app and the ensemble launcher alike. `train(cfg, run_dir)` is the
one-job form, for Python callers and tests. What differs between a lone job, an ensemble and a DDP
process is decided once, in its TrainingPlan (`training_plan`): the members with their metric prefixes,
loggers, checkpoints and resume keys, the folder it checkpoints into, this process's rank.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers.logger import Logger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset

from saesweep.checkpoints import AtomicCheckpointIO, StopOnSignal, readable_checkpoint
from saesweep.config import check_jobs, check_writable_dir
from saesweep.ensemble import RunLogger, write_member_checkpoints
from saesweep.errors import ConfigError, JobStopped, TrainingDivergedError
from saesweep.lm import hook_point_for
from saesweep.metrics import EvalResult
from saesweep.recipe import Recipe
from saesweep.run_description import describe_run, describe_sae, run_name, sae_hyperparameters
from saesweep.rundir import CHECKPOINT_DIR, ENSEMBLE_DIR, ERROR_FILE, wandb_group, write_run_dir
from saesweep.sae import ARCHITECTURES, Sae
from saesweep.store import (
    ResumableLoader,
    StoreStream,
)
from saesweep.synthetic import SYNTHETIC, is_synthetic
from saesweep.target_l0 import TargetL0
from saesweep.training import SaeTrainingModule
from saesweep.training_data import TrainingData, store_root, training_data

log = logging.getLogger(__name__)



def train(cfg: DictConfig, run_dir: Path, sweep_dir: Path | None = None) -> EvalResult:
    """One job: one SAE into `run_dir` (a lone SAE that diverges raises TrainingDivergedError)."""
    (result,) = train_ensemble([cfg], [run_dir], sweep_dir)
    assert isinstance(result, EvalResult)
    return result


def train_ensemble(
    cfgs: Sequence[DictConfig],
    run_dirs: Sequence[Path],
    sweep_dir: Path | None = None,
    ensemble_name: str = ENSEMBLE_DIR,
    data: TrainingData | None = None,
) -> list[EvalResult | TrainingDivergedError]:
    """Several jobs in one pass: the SAE of `cfgs[i]` into `run_dirs[i]`, all fed by the same batches.

    The configs may differ only in dict_ratio, target_l0, the architecture and its keys (checked). The LM, the activation
    store and the held-out set are loaded once. Each run directory is written to the same contract as a
    lone job's, with its own W&B run; a lone job is an ensemble of one. An ensemble of several
    checkpoints into `<sweep dir>/<ensemble_name>/checkpoints/last.ckpt` while it trains (rerunning the
    same command resumes from it), and each run directory gets its own SAE's part of the final checkpoint.
    A member that diverges (train.max_bad_steps bad steps in a row) leaves the ensemble: its entry of
    the result is the TrainingDivergedError, its run directory gets no SAE, the others train on.
    `data`: `training_data(cfgs)` when the caller has loaded it already (a benchmark that goes on to
    train other tools on the same activations).
    """
    run_dirs = prepare_run_dirs(cfgs, run_dirs)
    L.seed_everything(cfgs[0].seed, workers=True, verbose=False)
    data = data or training_data(cfgs)
    saes = [new_sae(cfg, d_sae, data) for cfg, d_sae in zip(cfgs, data.d_saes)]
    plan = training_plan(cfgs, run_dirs, sweep_dir, data, ensemble_name)
    train_loader, eval_loaders = loaders(plan, data)
    module = training_module(plan, saes, data)
    fit(plan, module, train_loader, eval_loaders)
    if module.last_evals_step != plan.trainer.global_step:  # unless the periodic evaluation fell on the last step
        plan.trainer.validate(module, dataloaders=eval_loaders, verbose=False)
    if plan.rank != 0:  # under DDP the run directory and the W&B run are rank 0's
        return module.last_evals
    return write_outcomes(plan, module, data)


def prepare_run_dirs(cfgs: Sequence[DictConfig], run_dirs: Sequence[Path]) -> list[Path]:
    """The configs checked, alone and as one ensemble, and the folders they write checked writable; a
    failed earlier attempt's error.json removed (a rerun of a failed job starts afresh)."""
    run_dirs = [Path(d) for d in run_dirs]
    if len(cfgs) != len(run_dirs):
        raise ValueError(f"{len(cfgs)} configs for {len(run_dirs)} run directories")
    check_jobs(cfgs)
    for run_dir in run_dirs:
        check_writable_dir("output directory (hydra.run.dir or hydra.sweep.dir)", run_dir)
    check_writable_dir("store.dir", store_root(cfgs[0]))  # every setting but the dictionary's own is the same in all
    for run_dir in run_dirs:
        (run_dir / ERROR_FILE).unlink(missing_ok=True)
    return run_dirs


def new_sae(cfg: DictConfig, d_sae: int, data: TrainingData) -> Sae:
    """The config's SAE, initialised: its own seed, the decoder bias at the sample's geometric median."""
    sae = ARCHITECTURES[cfg.sae.architecture](data.d_in, d_sae, generator=init_generator(cfg, d_sae), **sae_hyperparameters(cfg))
    sae.init_b_dec(data.sample / data.scale)
    return sae


@dataclass(frozen=True)
class Member:
    """One dictionary of a pass: its job's config and run directory, the prefix of its metrics in the
    module's log ("" for a lone job), its own logger (its W&B run; False: none), and its own
    checkpoint with the key that resumes it (an ensemble member's is cut from the shared one)."""

    cfg: DictConfig
    run_dir: Path
    d_sae: int
    metric_prefix: str
    logger: Logger | Literal[False]
    checkpoint: Path
    resume_key: dict


@dataclass(frozen=True)
class TrainingPlan:
    """What a pass trains and where it writes, decided once: its members, the folder it checkpoints
    into while it trains (a lone job's run directory, an ensemble's `<sweep dir>/<ensemble_name>`), the
    Lightning trainer (whose strategy sets this process's DDP rank and the world size), the rank's
    part of the activation stream, the schedule's length and the key a checkpoint must match."""

    members: tuple[Member, ...]
    checkpoint_dir: Path
    trainer: L.Trainer
    stop_on_signal: StopOnSignal
    target_l0: TargetL0 | None  # the controller of the members with a sae.target_l0 coefficient
    stream: StoreStream
    total_steps: int
    resume_key: dict

    @property
    def cfg(self) -> DictConfig:
        """The settings the members share (all but the dictionary's own)."""
        return self.members[0].cfg

    @property
    def lone(self) -> bool:
        return len(self.members) == 1

    @property
    def last(self) -> Path:
        return self.checkpoint_dir / "last.ckpt"

    @property
    def rank(self) -> int:
        return self.trainer.global_rank

    @property
    def world_size(self) -> int:
        return self.trainer.world_size


def training_plan(
    cfgs: Sequence[DictConfig],
    run_dirs: Sequence[Path],
    sweep_dir: Path | None,
    data: TrainingData,
    ensemble_name: str = ENSEMBLE_DIR,
) -> TrainingPlan:
    """The plan of a pass of `cfgs` into `run_dirs`: a lone job if there is one config, an ensemble
    otherwise (whose members' metrics are prefixed by their run directories' names). Opens the
    members' loggers (their W&B runs start) and makes the trainer."""
    cfg = cfgs[0]  # every setting but the dictionary's own is the same in all
    lone = len(cfgs) == 1
    prefixes = [""] if lone else [f"{run_dir.name}/" for run_dir in run_dirs]
    if len(set(prefixes)) != len(prefixes):
        raise ConfigError(f"the run directories of an ensemble need distinct names: {[str(d) for d in run_dirs]}")
    loggers = [make_logger(c, run_dir, sweep_dir, concurrent=not lone) for c, run_dir in zip(cfgs, run_dirs)]
    checkpoint_dir = (run_dirs[0] if lone else Path(sweep_dir or run_dirs[0].parent) / ensemble_name) / CHECKPOINT_DIR
    stop_on_signal = StopOnSignal(checkpoint_dir / "last.ckpt")
    trainer_logger = loggers[0] if lone else [RunLogger(lg, p, prefixes) for lg, p in zip(loggers, prefixes) if lg] or False
    controller = target_l0_controller(cfgs)
    trainer = make_trainer(cfg, run_dirs[0], trainer_logger, checkpoint_dir, [stop_on_signal, *filter(None, [controller])])
    stream = StoreStream(
        data.store, cfg.train.batch_size, cfg.store.buffer_tokens, cfg.seed, trainer.global_rank, trainer.world_size,
        device_buffer=cfg.store.device_buffer, device=trainer.strategy.root_device, scale=data.scale,
        harvested=data.harvested,
    )
    steps = total_steps(cfg.trainer, len(stream))
    shared_key = {
        "activation_store": data.store.path.name,
        "seed": cfg.seed,
        "train.batch_size": cfg.train.batch_size,
        "store.buffer_tokens": cfg.store.buffer_tokens,
        "total_steps": steps,
        "world_size": trainer.world_size,  # a stream position counts one rank's batches
    }
    members = tuple(
        Member(c, run_dir, d_sae, prefix, logger, run_dir / CHECKPOINT_DIR / "last.ckpt", shared_key | {"d_sae": d_sae})
        for c, run_dir, d_sae, prefix, logger in zip(cfgs, run_dirs, data.d_saes, prefixes, loggers)
    )
    ensemble_key = shared_key | {"d_sae": data.d_saes, "sae": [describe_sae(c) for c in cfgs]}
    return TrainingPlan(
        members, checkpoint_dir, trainer, stop_on_signal, controller, stream, steps,
        members[0].resume_key if lone else ensemble_key,
    )


def make_trainer(cfg: DictConfig, root_dir: Path, logger, checkpoint_dir: Path, callbacks: list[L.Callback]) -> L.Trainer:
    """The configured Lightning trainer: checkpoints into `checkpoint_dir` every
    train.checkpoint_every_n_steps (and on a signal: StopOnSignal among `callbacks`), evaluates every eval.every_n_steps."""
    return instantiate(
        cfg.trainer,
        default_root_dir=str(root_dir),
        logger=logger,
        callbacks=[
            ModelCheckpoint(
                dirpath=checkpoint_dir,
                save_last=True,
                save_top_k=0,
                every_n_train_steps=cfg.train.checkpoint_every_n_steps,
            ),
            *([ThrottledProgressBar()] if cfg.trainer.get("enable_progress_bar", True) else []),
            *callbacks,
        ],
        plugins=[AtomicCheckpointIO()],
        val_check_interval=cfg.eval.every_n_steps,
        check_val_every_n_epoch=None,
        use_distributed_sampler=False,  # the stream and the held-out set are split over ranks here
    )


class ThrottledProgressBar(RichProgressBar):
    """Lightning's progress bar, whose per-batch update (metrics gathered, bar redrawn) is done at most once
    every `min_interval_s` seconds and on an epoch's last batch: after every batch, as Lightning does it,
    it cost 0.2-0.6 ms of a 5 ms CPU step (benchmarks/RESULTS.md, host_step.py), more of a 1 ms GPU step."""

    min_interval_s = 0.25

    def __init__(self):
        super().__init__()
        self._drawn_at = -float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if now - self._drawn_at < self.min_interval_s and batch_idx + 1 < self.total_train_batches:
            return
        self._drawn_at = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def training_module(plan: TrainingPlan, saes: Sequence[Sae], data: TrainingData) -> SaeTrainingModule:
    """The Lightning module that trains the plan's SAEs, with the shared training settings."""
    cfg = plan.cfg
    return SaeTrainingModule(
        saes,
        metric_prefixes=[member.metric_prefix for member in plan.members],
        act_scale=data.scale,
        batch_scale=data.scale / plan.stream.scale,  # 1: the stream divides the batches
        recipes=[Recipe.from_config(member.cfg.sae.recipe) for member in plan.members],
        adam_betas=tuple(cfg.train.adam_betas),
        lr_warmup_max_fraction=cfg.train.lr_warmup_max_fraction,
        total_steps=plan.total_steps,
        max_bad_steps=cfg.train.max_bad_steps,
        model=data.model,
        hook_point=data.hook_point,
        resume_key=plan.resume_key,
        compile=cfg.train.compile,
        dead_window_tokens=cfg.train.dead_window_tokens,
        eval_set_names=list(data.eval_sets),
    )


def loaders(plan: TrainingPlan, data: TrainingData) -> tuple[ResumableLoader, list[DataLoader]]:
    """This rank's training batches (the plan's stream) and its part of each held-out set (the headline first)."""
    pin = data.device.type == "cuda"
    train_loader = ResumableLoader(plan.stream, pin_memory=pin and not plan.stream.resident)
    # under DDP each rank evaluates every world_size-th context; the module adds the ranks' sums up
    eval_loaders = [
        DataLoader(Subset(held_out, range(plan.rank, len(held_out), plan.world_size)),
                   batch_size=plan.cfg.eval.batch_contexts, pin_memory=pin)
        for held_out in data.eval_sets.values()
    ]
    return train_loader, eval_loaders


def fit(plan: TrainingPlan, module: SaeTrainingModule, train_loader: ResumableLoader, eval_loaders: list[DataLoader]) -> None:
    """Trains to the end (resuming from the plan's last checkpoint when there is a readable one) and
    checkpoints the whole state; a signal stops it with its checkpoint written."""
    resume_from = readable_checkpoint(plan.last)
    if resume_from:
        log.info("resuming from %s", resume_from)
    trainer = plan.trainer
    # weights_only: a checkpoint holds tensors and plain values, so nothing in it needs unpickling
    trainer.fit(
        module, train_dataloaders=train_loader, val_dataloaders=eval_loaders, ckpt_path=str(resume_from) if resume_from else None, weights_only=True
    )
    signum = plan.stop_on_signal.signum
    if signum == signal.SIGINT:
        raise KeyboardInterrupt(f"training interrupted at step {trainer.global_step}; {plan.last} written")
    if signum is not None:
        raise JobStopped(signum, f"stopped by {signal.Signals(signum).name} at step {trainer.global_step}; {plan.last} written")
    trainer.save_checkpoint(plan.last, weights_only=False)  # the whole state, optimizer and loops included


def write_outcomes(
    plan: TrainingPlan, module: SaeTrainingModule, data: TrainingData
) -> list[EvalResult | TrainingDivergedError]:
    """Rank 0's part once trained: an ensemble's checkpoint cut into its members' run directories, then
    each run directory written and its W&B run finished; a member that diverged gets its error instead."""
    if not plan.lone:
        write_member_checkpoints(
            plan.last,
            [member.checkpoint for member in plan.members],
            [member.resume_key for member in plan.members],
        )
    train_contexts = sum(shard["contexts"] for shard in data.manifest["shards"])
    outcomes: list[EvalResult | TrainingDivergedError] = []
    for index, (member, sae, result) in enumerate(zip(plan.members, module.raw_saes(), module.last_evals)):
        if index in module.dropped:  # diverged and left the ensemble: its checkpoint holds its last good step
            outcomes.append(TrainingDivergedError(module.dropped[index]))
            if run := wandb_run(member.logger):
                run.finish(exit_code=1)
            continue
        outcomes.append(result)
        run_cfg = describe_run(final_config(plan, index), data.hook_point, data.d_in, member.d_sae, int(module.tokens_seen),
                               train_contexts)
        write_run_dir(member.run_dir, sae, run_cfg, result)
        if member.logger:
            log_final_metrics(member, result, plan.trainer.global_step)
        log.info("wrote %s: %s", member.run_dir, {k: round(v, 4) for k, v in result.metrics.items()})
    return outcomes


def final_config(plan: TrainingPlan, index: int) -> DictConfig:
    """Member `index`'s config as trained: a coefficient steered to sae.target_l0 at its final, frozen value."""
    cfg = plan.members[index].cfg
    if plan.target_l0 is None or index not in plan.target_l0.controlled:
        return cfg
    key, _ = plan.target_l0.controlled[index]
    final = copy.deepcopy(cfg)
    OmegaConf.update(final, f"sae.{key}", plan.target_l0.coefficient(index))
    return final


def log_final_metrics(member: Member, result: EvalResult, step: int) -> None:
    """The member's final metrics (`final/*`), to its logger and its W&B run's summary; closes the run."""
    final = {f"final/{k}": v for k, v in result.metrics.items()}
    if member.cfg.target_l0 is not None:  # the objective of sweeps/bayes_l1_target_l0.yaml
        final["final/abs_l0_error"] = abs(result.metrics["l0"] - member.cfg.target_l0)
    member.logger.log_metrics(final, step=step)
    member.logger.save()  # a file logger (CSV) writes what it holds only when saved, and training has ended
    if run := wandb_run(member.logger):
        run.summary.update(result.metrics)
        run.finish()


def wandb_run(logger: Logger | Literal[False]):
    """The W&B run behind a logger; None for no logger or another kind (CSV, TensorBoard)."""
    experiment = getattr(logger, "experiment", None)
    return experiment if hasattr(experiment, "summary") and hasattr(experiment, "finish") else None


def init_generator(cfg: DictConfig, d_sae: int) -> torch.Generator:
    """The SAE's initialisation seed, from `seed` and the run's hyperparameters.

    With one seed for all, a 2× dictionary would start from the first half of a 4× one's decoder
    rows, and dictionaries at two layers from the same directions, and overlap between runs (MCS,
    across sizes or layers) would partly measure shared initial directions.
    """
    hook_point = SYNTHETIC if is_synthetic(cfg.data) else hook_point_for(cfg.layer, cfg.hook, cfg.hook_point)
    # the recipe left out: dictionaries trained by two recipes start alike, so they compare in pairs
    sae = {k: v for k, v in describe_sae(cfg).items() if k != "recipe"}
    identity = json.dumps([cfg.seed, d_sae, sae, hook_point], sort_keys=True)
    return torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(identity.encode(), digest_size=8).digest()))


def target_l0_controller(plan_cfgs: Sequence[DictConfig]) -> TargetL0 | None:
    """The controller for the members whose sae.target_l0 sets a sparsity coefficient (None: no such member)."""
    controlled = {
        i: (key, float(c.sae.target_l0))
        for i, c in enumerate(plan_cfgs)
        if c.sae.get("target_l0") is not None and (key := ARCHITECTURES[c.sae.architecture].sparsity_coefficient)
    }
    return TargetL0(controlled) if controlled else None


def total_steps(trainer_cfg: DictConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole job: max_epochs passes, cut short by trainer.max_steps when set."""
    steps = steps_per_epoch * trainer_cfg.get("max_epochs", 1)
    max_steps = trainer_cfg.get("max_steps", -1)
    return min(steps, max_steps) if max_steps is not None and max_steps >= 0 else steps


def make_logger(cfg: DictConfig, run_dir: Path, sweep_dir: Path | None, concurrent: bool = False):
    """The configured Lightning logger; a W&B run is grouped by its sweep directory (rundir.wandb_group). `concurrent`:
    other runs of this process (an ensemble's) are open at the same time."""
    if cfg.logger is None or cfg.logger.get("_target_") is None:
        return False
    extra: dict = {"save_dir": str(run_dir)}
    if cfg.logger._target_.endswith("WandbLogger"):
        name = run_name(cfg) + (f" #{run_dir.name}" if sweep_dir else "")
        extra |= {"name": name, "group": wandb_group(run_dir, sweep_dir), "job_type": "train"}
        if concurrent:
            extra["reinit"] = "create_new"
    logger = instantiate(cfg.logger, **extra)
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and "anonymous" in init and init["anonymous"] is None:
        # Lightning passes anonymous=None, which wandb warns about on every run ("has no effect")
        del init["anonymous"]
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return logger


