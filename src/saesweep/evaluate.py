"""Post-hoc evaluation across the runs of a sweep: max cosine similarity (MCS) between dictionaries."""

from __future__ import annotations

import torch

_DEFAULT_CHUNK = 4096


@torch.no_grad()
def mcs(a: torch.Tensor, b: torch.Tensor, chunk_size: int = _DEFAULT_CHUNK) -> torch.Tensor:
    """For each row of `a` [n_a, d], its largest cosine similarity with any row of `b` [n_b, d]: [n_a].

    Computed over chunks of both dictionaries, so memory stays at chunk_size² whatever their sizes.
    """
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"dictionaries of different widths cannot be compared: {a.shape[-1]} vs {b.shape[-1]}")
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    best = torch.full((a.shape[0],), -1.0, device=a.device)
    for i in range(0, a.shape[0], chunk_size):
        a_chunk = a[i : i + chunk_size]
        for j in range(0, b.shape[0], chunk_size):
            sims = a_chunk @ b[j : j + chunk_size].to(a.device).T
            best[i : i + chunk_size] = torch.maximum(best[i : i + chunk_size], sims.max(dim=1).values)
    return best
