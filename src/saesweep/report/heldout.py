"""The held-out token set of a report, rebuilt from the run's own cfg.json."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saesweep.activations import harvest
from saesweep.data import ContextSource, load_texts
from saesweep.errors import CheckpointError


@dataclass(frozen=True)
class HeldOutTokens:
    contexts: torch.Tensor  # [n_ctx, ctx_len] token ids
    activations: torch.Tensor  # [n_ctx, ctx_len, d_in] at the run's hook point, float32 on the CPU
    n_eval_contexts: int  # the first contexts are the run's own evaluation set (metrics.json)

    @property
    def n_tokens(self) -> int:
        return self.contexts.numel()

    @property
    def n_eval_tokens(self) -> int:
        """Tokens of the run's own evaluation set among these (the rest come from after the training documents)."""
        return min(self.n_eval_contexts, len(self.contexts)) * self.contexts.shape[1]

    def describe(self) -> str:
        text = (
            f"{self.n_tokens} tokens in {len(self.contexts)} contexts of {self.contexts.shape[1]}, none trained on: "
            f"{self.n_eval_tokens} from the run's evaluation documents"
        )
        if self.n_tokens > self.n_eval_tokens:
            text += f", {self.n_tokens - self.n_eval_tokens} from the documents after the last one training read"
        return text


def run_setting(run_cfg: dict, *keys: str):
    """A value of cfg.json (nested keys), or a CheckpointError naming the missing key."""
    value = run_cfg
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise CheckpointError(f"cfg.json has no {'.'.join(keys)}: the run directory is from an older saesweep")
        value = value[key]
    return value


def rebuild_held_out(model, run_cfg: dict, n_tokens: int, batch_contexts: int) -> HeldOutTokens:
    """`n_tokens` (rounded up to whole contexts) held-out tokens of the run's dataset and their activations.

    The first are the run's evaluation contexts (the first documents of the shuffled order); when more
    are asked for, they come from the documents after the last one training read, so none of them
    was ever trained on (see saesweep.data.ContextSource.held_out_contexts).
    """
    ctx_len = run_setting(run_cfg, "ctx_len")
    texts = load_texts(
        run_setting(run_cfg, "dataset", "path"),
        run_setting(run_cfg, "dataset", "name"),
        run_setting(run_cfg, "dataset", "split"),
        run_setting(run_cfg, "dataset", "text_field"),
    )
    n_eval_contexts = -(-run_setting(run_cfg, "eval_n_tokens") // ctx_len)
    source = ContextSource(
        texts,
        model.tokenizer,
        ctx_len,
        prepend_bos=run_setting(run_cfg, "dataset", "prepend_bos"),
        seed=run_setting(run_cfg, "dataset", "seed"),
    )
    # runs from before train_contexts was recorded harvested ceil(n_tokens / ctx_len) contexts
    n_train_contexts = run_cfg.get("train_contexts") or -(-run_setting(run_cfg, "n_tokens") // ctx_len)
    contexts = source.held_out_contexts(n_eval_contexts, n_train_contexts, -(-n_tokens // ctx_len))
    activations = harvest(model, contexts, run_setting(run_cfg, "hook_point"), batch_contexts)
    return HeldOutTokens(contexts, activations, n_eval_contexts)
