"""The held-out token set of a report, rebuilt from the run's own cfg.json."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saesweep.activations import harvest
from saesweep.rundir import held_out_contexts, run_setting


@dataclass(frozen=True)
class HeldOutTokens:
    contexts: torch.Tensor  # [n_ctx, ctx_len] token ids
    activations: torch.Tensor  # [n_ctx, ctx_len, d_in] at the run's hook point, float32 on the CPU
    n_eval_contexts: int  # the first contexts are the run's own evaluation set (metrics.json)
    n_documents: int  # held-out documents they come from

    @property
    def n_tokens(self) -> int:
        return self.contexts.numel()

    @property
    def n_eval_tokens(self) -> int:
        """Tokens of the run's own evaluation set among these (the rest come from after the training documents)."""
        return min(self.n_eval_contexts, len(self.contexts)) * self.contexts.shape[1]

    def describe(self) -> str:
        return (
            f"{self.n_tokens} tokens in {len(self.contexts)} contexts of {self.contexts.shape[1]} from "
            f"{self.n_documents} held-out documents (never trained on); the first {self.n_eval_tokens} are the "
            "run's evaluation set"
        )


def rebuild_held_out(model, run_cfg: dict, n_tokens: int, batch_contexts: int) -> HeldOutTokens:
    """`n_tokens` (rounded up to whole contexts) held-out tokens of the run's dataset and their activations.

    They are the first contexts of the held-out order (saesweep.data.ContextSource.held_out_contexts):
    spread over the held-out documents, which no run of the sweep trained on, and beginning with the
    run's own evaluation contexts.
    """
    held_out = held_out_contexts(model.tokenizer, run_cfg, n_tokens, "report")
    activations = harvest(model, held_out.tokens, run_setting(run_cfg, "hook_point"), batch_contexts)
    n_eval_contexts = -(-run_setting(run_cfg, "eval_n_tokens") // held_out.tokens.shape[1])
    return HeldOutTokens(held_out.tokens, activations, n_eval_contexts, held_out.n_documents)

