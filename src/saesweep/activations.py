"""LM activations at hook points."""

from __future__ import annotations

import torch

from saesweep.lm import stop_layer_after


@torch.no_grad()
def activations_at(model, contexts: torch.Tensor, hook_points: list[str]) -> dict[str, torch.Tensor]:
    """One forward pass over `contexts`: hook point → activations [n_contexts, ctx_len, d_in], float32 on CPU.

    The pass stops after the last hook's block, so later layers cost nothing.
    """
    device = next(model.parameters()).device
    stops = [stop_layer_after(hook_point) for hook_point in hook_points]
    stop_at = None if None in stops else max(stops)
    _, cache = model.run_with_cache(contexts.to(device), names_filter=list(hook_points), stop_at_layer=stop_at)
    return {hook_point: cache[hook_point].float().cpu() for hook_point in hook_points}


def harvest(model, contexts: torch.Tensor, hook_point: str, batch_contexts: int) -> torch.Tensor:
    """Activations at `hook_point` for every token of `contexts`: [n_contexts, ctx_len, d_in], float32 on CPU."""
    return torch.cat([
        activations_at(model, contexts[start : start + batch_contexts], [hook_point])[hook_point]
        for start in range(0, len(contexts), batch_contexts)
    ])
