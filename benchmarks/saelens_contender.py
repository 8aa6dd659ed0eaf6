"""SAELens (the `sae-lens` package, `pip install -e '.[bench]'`) as a contender in the benchmarks: its own
trainer (`SAETrainer`) and ReLU/L1 SAE (`StandardTrainingSAE`), fed the very activations saesweep trains
on. Its ActivationsStore is not used: it loads models through HookedTransformer, which the offline
reference model is not registered for, so the harvest is timed as the same LM forward pass saesweep's
harvest makes (`run_with_cache` with `stop_at_layer`), a lower bound on SAELens's own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from saesweep.sae import ARCHITECTURES

try:
    from sae_lens import (
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.training.sae_trainer import SAETrainer
except ImportError:  # the `bench` extra is not installed
    SAETrainer = None


NOT_INSTALLED = "SAELens: not installed (pip install -c constraints.txt -e '.[bench]'), not measured"


def available() -> bool:
    return SAETrainer is not None


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _batches(x: torch.Tensor, batch: int) -> Iterator[torch.Tensor]:
    """Shuffled batches forever, like SAELens's mixing buffer hands them out."""
    while True:
        order = torch.randperm(len(x))
        for start in range(0, len(x) - batch + 1, batch):
            yield x[order[start : start + batch]]


def train_saelens(
    x: torch.Tensor, d_sae: int, batch: int, steps: int, l1_coef: float = 2.0, k: int | None = None
) -> float:
    """Trains one SAELens SAE (ReLU/L1, or TopK when `k` is given) for `steps` steps on `x` [n, d_in];
    returns the wall seconds of its `fit` (the trainer's whole loop, start-up included)."""
    if k is None:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(
            d_in=x.shape[1], d_sae=d_sae, l1_coefficient=l1_coef, device=_device()))
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=d_sae, k=k, device=_device()))
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch, train_batch_size_samples=batch, lr=3e-3, lr_end=3e-3,
        n_checkpoints=0, device=_device(),
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=_batches(x.to(_device()), batch))
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start


# saesweep's architecture -> SAELens's name for it, and saesweep's keys -> SAELens's config fields
SAELENS_ARCHITECTURE = {
    "relu_l1": "standard", "gated": "gated", "jumprelu": "jumprelu",
    "topk": "topk", "batchtopk": "batchtopk", "matryoshka_batchtopk": "matryoshka_batchtopk",
}
_SAELENS_FIELD = {
    "l1_coef": "l1_coefficient", "k": "k", "l0_coef": "l0_coefficient",
    "threshold_init": "jumprelu_init_threshold", "bandwidth": "jumprelu_bandwidth",
}


def train_saelens_architecture(
    architecture: str, hyperparameters: dict, d_in: int, d_sae: int, batches: Iterator[torch.Tensor], steps: int,
    batch: int, lr: float, warmup_steps: int, decay_steps: int, out_dir,
) -> float:
    """Trains SAELens's SAE of saesweep's `architecture` with SAELens's trainer on `batches` (already
    normalised, as saesweep trains) and saves its inference form into `out_dir` with SAELens's writer;
    returns the seconds of the fit. Keys saesweep has and SAELens lacks (AuxK coefficient, group sizes
    other than as widths, resampling) keep SAELens's defaults: this is SAELens's recipe at saesweep's
    sparsity knob, learning rate, batch, schedule and tokens."""
    name = SAELENS_ARCHITECTURE[architecture]
    sae_class, config_class = get_sae_training_class(name)
    fields = {_SAELENS_FIELD[k]: v for k, v in hyperparameters.items() if k in _SAELENS_FIELD and v is not None}
    if name == "matryoshka_batchtopk":  # saesweep's nested prefixes, as SAELens's widths
        fields["matryoshka_widths"] = ARCHITECTURES[architecture](d_in, d_sae, **hyperparameters).prefix_widths()
    sae = sae_class(config_class(d_in=d_in, d_sae=d_sae, device=_device(), **fields))
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch, train_batch_size_samples=batch, lr=lr, lr_end=lr / 100,
        lr_warm_up_steps=warmup_steps, lr_decay_steps=decay_steps, n_checkpoints=0, device=_device(),
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches)
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    trainer.sae.save_inference_model(out_dir)
    return seconds


def saelens_job(model_dir: str, corpus: str, hook_point: str, ctx_len: int, n_tokens: int, d_sae_ratio: int,
                batch: int) -> None:
    """One SAELens training job as a researcher would run it, in its own process: load the model,
    harvest `n_tokens` activations at the hook (the forward pass SAELens's ActivationsStore makes),
    train one SAE on them. The same documents and contexts as saesweep's training stream."""
    from saesweep.activations import harvest
    from saesweep.data import ContextSource, load_texts
    from saesweep.lm import load_model

    model = load_model(None, model_dir, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    contexts = ContextSource(load_texts(corpus, None, "train", "text"), model.tokenizer, ctx_len, True, 0)
    chunks, rows = [], 0
    for batch_contexts in contexts.train_batches(256):
        acts = harvest(model, batch_contexts, hook_point, 256)
        chunks.append(acts.reshape(-1, acts.shape[-1]))
        rows += chunks[-1].shape[0]
        if rows >= n_tokens:
            break
    x = torch.cat(chunks)[:n_tokens]
    train_saelens(x, d_sae_ratio * x.shape[1], batch, n_tokens // batch)


if __name__ == "__main__":
    import sys

    model_dir, corpus, hook, ctx, n, ratio, batch = sys.argv[1:]
    saelens_job(model_dir, corpus, hook, int(ctx), int(n), int(ratio), int(batch))
