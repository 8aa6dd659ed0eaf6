"""LM activations at one hook point."""

from __future__ import annotations

import torch

from saesweep.lm import stop_layer_after


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
