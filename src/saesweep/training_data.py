"""The data a training pass shares: the LM and its hook point, the activation store harvested (or found)
for the configs, the held-out set they are judged on, and the normalisation sample; or the same from
synthetic activations (data=synthetic)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from saesweep.activations import harvest
from saesweep.config import check_with_model
from saesweep.data import ContextSource, context_source, dataset_description, eval_set_description
from saesweep.lm import hook_point_for, load_model, resolve_device, validate_hook_point
from saesweep.metrics import HEADLINE_SET, HeldOutSet
from saesweep.store import (
    STORE_DTYPES,
    ActivationStore,
    HarvestedRows,
    StoreSpec,
    TokenFilter,
    default_store_dir,
    model_fingerprint,
)
from saesweep.synthetic import SYNTHETIC, SyntheticSpec, is_synthetic, synthetic_data
from saesweep.training import activation_scale

log = logging.getLogger(__name__)

_INIT_SAMPLE = 8192  # activations used for the scale and the b_dec geometric median


@dataclass
class TrainingData:
    """What the jobs of one pass share: the LM and its hook point, the complete activation store, the
    held-out set they are judged on, and the normalisation sample: training sees x / scale, and the
    decoder bias starts from the sample's geometric median."""

    model: object
    device: torch.device
    hook_point: str
    d_in: int
    d_saes: list[int]  # of each config, in order
    store: ActivationStore
    manifest: dict
    eval_sets: dict[str, HeldOutSet]  # name → held-out set, the headline (HEADLINE_SET) first, then eval.sets
    sample: torch.Tensor
    scale: float
    harvested: HarvestedRows | None = None  # the rows this process's harvest kept on the device for the fit

    @property
    def held_out(self) -> HeldOutSet:
        """The headline held-out set: the training corpus's held-out documents."""
        return self.eval_sets[HEADLINE_SET]


def store_root(cfg: DictConfig) -> Path:
    """Where activation stores live: `store.dir`, or the user's cache."""
    return Path(cfg.store.dir) if cfg.store.dir else default_store_dir()


def training_data(cfgs: Sequence[DictConfig]) -> TrainingData:
    """Loads the LM, checks each config against it, then harvests the store and its held-out set (or
    reuses them: every job of a sweep, and later sweeps, find them there)."""
    cfg = cfgs[0]
    device = resolve_device(cfg.model.device)
    if is_synthetic(cfg.data):
        return synthetic_training_data(cfgs, device)
    model = load_model(cfg.model.name, cfg.model.path, device, cfg.model.dtype)
    hook_point = hook_point_for(cfg.layer, cfg.hook, cfg.hook_point)
    validate_hook_point(model, hook_point)
    probe = harvest(model, torch.full((1, 2), model.tokenizer.eos_token_id or 0), hook_point, 1)
    d_in = probe.shape[-1]
    d_saes = [check_with_model(c, model.cfg.n_ctx, d_in) for c in cfgs]

    contexts = context_source(cfg.data, model.tokenizer, cfg.ctx_len)
    store = ActivationStore(store_root(cfg), store_spec(cfg, model, hook_point), shard_tokens=cfg.store.shard_tokens)
    store.check_room(d_in)
    harvested = kept_rows(cfg, d_in, device)
    manifest = store.ensure(
        model, contexts.train_batches(cfg.harvest_batch_contexts), cfg.harvest_batch_contexts, on_shard=harvested
    )
    eval_sets = {HEADLINE_SET: held_out_set(cfg, model, hook_point, store, lambda: contexts, cfg.eval.n_tokens)}
    for name in cfg.eval.get("sets") or {}:
        eval_sets[name] = extra_held_out_set(cfg, name, model, hook_point, store)
    sample = first_rows(store, manifest)
    return TrainingData(
        model, device, hook_point, d_in, d_saes, store, manifest, eval_sets, sample, activation_scale(sample), harvested
    )


def synthetic_training_data(cfgs: Sequence[DictConfig], device: torch.device) -> TrainingData:
    """The same from synthetic activations (data=synthetic): no language model, the generator's width."""
    cfg = cfgs[0]
    d_in = SyntheticSpec.from_config(cfg.data).d_in
    harvested = kept_rows(cfg, d_in, device)
    synthetic = synthetic_data(cfg, store_root(cfg), on_shard=harvested)
    d_saes = [check_with_model(c, cfg.ctx_len, d_in) for c in cfgs]  # no model: no context length to exceed
    log.info("data=synthetic: no language model; ce_* and ppl_* are not measured (NaN)")
    sample = first_rows(synthetic.store, synthetic.manifest)
    return TrainingData(None, device, SYNTHETIC, d_in, d_saes, synthetic.store, synthetic.manifest,
                        {HEADLINE_SET: synthetic.held_out}, sample, activation_scale(sample), harvested)


def kept_rows(cfg: DictConfig, d_in: int, device: torch.device) -> HarvestedRows | None:
    """Where a harvest in this process keeps the rows it writes, for the fit that follows (None: the fit
    reads the store back, as it does a store it finds complete). Not under DDP: a rank trains on its own
    shards, and whichever rank harvests would hold the whole store on one device for nothing."""
    if cfg.trainer.get("devices", 1) != 1 or cfg.trainer.get("num_nodes", 1) != 1:
        return None
    return HarvestedRows.for_fit(cfg.store.device_buffer, cfg.n_tokens, d_in, STORE_DTYPES[cfg.store.dtype], device)


def first_rows(store: ActivationStore, manifest: dict) -> torch.Tensor:
    """The normalisation sample: the first rows of the store's first shard."""
    return store.read_shard(manifest["shards"][0])[:_INIT_SAMPLE].float()


def held_out_set(
    cfg: DictConfig, model, hook_point: str, store: ActivationStore, contexts: Callable[[], ContextSource],
    n_tokens: int, set_name: str = HEADLINE_SET, set_key: str | None = None,
) -> HeldOutSet:
    """n_tokens of held-out text (whole contexts from the held-out documents of `contexts()`, made only
    when the store lacks them) with the LM's clean pass over them: built once, then kept in the store
    beside its activations, under `set_key` for an extra set (None: the training corpus's)."""
    n_contexts = -(-n_tokens // cfg.ctx_len)
    purpose = "evaluation" if set_name == HEADLINE_SET else f"eval.sets.{set_name}"

    def build() -> dict[str, torch.Tensor]:
        eval_contexts = contexts().held_out_contexts(n_contexts, purpose)
        log.info("held-out set %s: %d contexts from %d documents", set_name, len(eval_contexts.tokens),
                 eval_contexts.n_documents)
        return HeldOutSet.build(model, eval_contexts.tokens, hook_point, cfg.eval.batch_contexts).named_tensors()

    return HeldOutSet.from_named_tensors(store.held_out(n_contexts, build, set_key=set_key))


def extra_held_out_set(cfg: DictConfig, set_name: str, model, hook_point: str, store: ActivationStore) -> HeldOutSet:
    """eval.n_tokens of the extra held-out set `eval.sets.<set_name>` (a corpus never trained on), kept in the
    store like the headline set, under a key that changes with the corpus's description and file size."""
    description = eval_set_description(cfg, set_name)
    size = Path(description["path"]).stat().st_size if description["path"] else None
    digest = hashlib.blake2b(json.dumps([description, size], sort_keys=True).encode(), digest_size=6).hexdigest()
    return held_out_set(cfg, model, hook_point, store, lambda: context_source(description, model.tokenizer, cfg.ctx_len),
                        cfg.eval.n_tokens, set_name, set_key=f"{set_name}-{digest}")


def store_spec(cfg: DictConfig, model, hook_point: str) -> StoreSpec:
    """The key of the training activations: what the model, data and harvest settings make them."""
    return StoreSpec(
        model=str(Path(cfg.model.path).resolve()) if cfg.model.path else cfg.model.name,
        model_fingerprint=model_fingerprint(model),
        hook_point=hook_point,
        dataset=dataset_description(cfg),
        split="train",
        ctx_len=cfg.ctx_len,
        n_tokens=cfg.n_tokens,
        dtype=cfg.store.dtype,
        token_filter=TokenFilter(cfg.store.drop_special_tokens, cfg.store.max_norm_ratio),
    )
