"""LM activations at one hook point, and the shuffled stream of them that training reads."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import IterableDataset

from saesweep.lm import stop_layer_after

log = logging.getLogger(__name__)


@torch.no_grad()
def harvest(model, contexts: torch.Tensor, hook_point: str, batch_contexts: int) -> torch.Tensor:
    """Activations at `hook_point` for every token of `contexts`: [n_contexts, ctx_len, d_in], float32 on CPU.

    The forward pass stops after the hook's block, so later layers cost nothing.
    """
    device = next(model.parameters()).device
    stop_at = stop_layer_after(hook_point)
    chunks = []
    for start in range(0, len(contexts), batch_contexts):
        batch = contexts[start : start + batch_contexts].to(device)
        _, cache = model.run_with_cache(batch, names_filter=[hook_point], stop_at_layer=stop_at)
        chunks.append(cache[hook_point].float().cpu())
    return torch.cat(chunks)


class ShuffledActivations(IterableDataset):
    """Batches of activation rows in a fresh random order each epoch (one pass = one epoch)."""

    def __init__(self, activations: torch.Tensor, batch_size: int, seed: int):
        self.activations = activations
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return -(-len(self.activations) // self.batch_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.activations), generator=generator)
        for start in range(0, len(order), self.batch_size):
            yield self.activations[order[start : start + self.batch_size]]
