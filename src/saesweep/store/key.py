"""What decides a store's activations (model, hook, data, sizes, dtype, token filter) and names it."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMAT_VERSION = 3  # 2: shards record the training contexts they read; 3: documents mixed, held-out documents


def default_store_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "saesweep" / "activations"


def model_fingerprint(model) -> str:
    """A digest of every weight of the model: a changed local model never reuses stale activations."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class TokenFilter:
    """Which harvested positions to drop: special tokens (BOS/EOS) and norm outliers."""

    drop_special_tokens: bool = False
    max_norm_ratio: float | None = None  # drop rows with norm > ratio × the median norm of their shard

    @property
    def active(self) -> bool:
        return self.drop_special_tokens or self.max_norm_ratio is not None

    def keep_mask(self, tokens: torch.Tensor, acts: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
        keep = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        if self.drop_special_tokens and special_ids:
            keep &= ~torch.isin(tokens, torch.tensor(special_ids, device=tokens.device))
        if self.max_norm_ratio is not None:
            norms = acts.float().norm(dim=-1)
            keep &= norms <= self.max_norm_ratio * norms.median()
        return keep

    def apply(self, tokens: torch.Tensor, acts: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
        """The kept rows of `acts` [n, ctx_len, d] as [rows, d] (a view when nothing is filtered)."""
        if not self.active:
            return acts.reshape(-1, acts.shape[-1])
        return acts[self.keep_mask(tokens, acts, special_ids)]


@dataclass(frozen=True)
class StoreSpec:
    """Everything that decides the stored activations; its digest names the store."""

    model: str
    model_fingerprint: str
    hook_point: str
    dataset: dict
    split: str
    ctx_len: int
    n_tokens: int
    dtype: str
    token_filter: TokenFilter

    def key(self) -> dict:
        return {
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "hook_point": self.hook_point,
            "dataset": self.dataset,
            "split": self.split,
            "ctx_len": self.ctx_len,
            "n_tokens": self.n_tokens,
            "dtype": self.dtype,
            "token_filter": {
                "drop_special_tokens": self.token_filter.drop_special_tokens,
                "max_norm_ratio": self.token_filter.max_norm_ratio,
            },
            "format": FORMAT_VERSION,
        }

    @classmethod
    def from_key(cls, key: dict) -> StoreSpec:
        fields = {name: key[name] for name in cls.__dataclass_fields__ if name != "token_filter"}
        return cls(**fields, token_filter=TokenFilter(**key["token_filter"]))

    def digest(self) -> str:
        return hashlib.blake2b(json.dumps(self.key(), sort_keys=True).encode(), digest_size=10).hexdigest()
