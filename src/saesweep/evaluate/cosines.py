"""MCS maths on decoder directions (saesweep.similarity compares activations instead): max cosine
similarity between two dictionaries (in chunks, so any size fits in memory), their one-to-one
matching, and the overlap statistics of mcs.json."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from saesweep.matching import Matching, match_rows

DEFAULT_CHUNK_SIZE = 4096


@torch.no_grad()
def mcs_both_ways(
    a: torch.Tensor, b: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mcs(a, b)` and `mcs(b, a)` from one pass over the similarity matrix, on `a`'s device.

    Rows are normalised one chunk at a time, so memory beyond the inputs stays at chunk_size² + two
    chunks of rows whatever the dictionary sizes.
    """
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"dictionaries of different widths cannot be compared: {a.shape[-1]} vs {b.shape[-1]}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive integer")
    device = a.device
    a_to_b = torch.full((a.shape[0],), -1.0, device=device)
    b_to_a = torch.full((b.shape[0],), -1.0, device=device)
    for i in range(0, a.shape[0], chunk_size):
        a_chunk = torch.nn.functional.normalize(a[i : i + chunk_size].float(), dim=-1)
        for j in range(0, b.shape[0], chunk_size):
            b_chunk = torch.nn.functional.normalize(b[j : j + chunk_size].to(device).float(), dim=-1)
            sims = a_chunk @ b_chunk.T
            a_to_b[i : i + chunk_size] = torch.maximum(a_to_b[i : i + chunk_size], sims.amax(dim=1))
            b_to_a[j : j + chunk_size] = torch.maximum(b_to_a[j : j + chunk_size], sims.amax(dim=0))
    # rounding puts identical directions at 1 + 1e-7; a cosine above 1 would fall outside [-1, 1] bins
    return a_to_b.clamp_(max=1.0), b_to_a.clamp_(max=1.0)


def mcs(a: torch.Tensor, b: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """For each row of `a` [n_a, d], its largest cosine similarity with any row of `b` [n_b, d]: [n_a].

    Computed over chunks of both dictionaries, so memory beyond the inputs stays at chunk_size² (plus
    two chunks of rows) whatever their sizes.
    """
    return mcs_both_ways(a, b, chunk_size)[0]


def matching(a: torch.Tensor, b: torch.Tensor) -> Matching:
    """One-to-one matching of the rows of `a` and `b` (decoder directions) that maximises the summed
    cosine (as in Cunningham et al.'s run_mmcs_with_larger): min(n_a, n_b) matched pairs. Unlike max
    cosine, no row of one dictionary can count for several of the other."""
    return match_rows(_unit_rows(a.float().cpu()) @ _unit_rows(b.float().cpu()).T)


def matched_cosines(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """The cosines of the min(n_a, n_b) pairs of `matching(a, b)`."""
    return matching(a, b).cosines


def random_dictionary(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """The chance baseline's random Gaussian dictionary of `shape`: numpy's PCG64, not torch's
    generator, so it is the same on every device and cannot replay a torch-seeded SAE initialisation
    (training seeds torch with small integers too)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))


def _unit_rows(m: torch.Tensor) -> torch.Tensor:
    return m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass(frozen=True)
class Found:
    """Features at or above one MCS threshold."""

    count: int
    fraction: float  # of all the features (NaN for an empty dictionary)


@dataclass(frozen=True)
class OverlapStats:
    """How one dictionary's features are found in another: the mean MCS and, per threshold, how many."""

    mean_mcs: float  # NaN for an empty dictionary
    n_features: int
    found: dict[float, Found]  # threshold → features with MCS ≥ it

    def to_json(self) -> dict:
        """As mcs.json has it: thresholds as keys written like 0.9."""
        found = {f"{t:g}": {"count": f.count, "fraction": f.fraction} for t, f in self.found.items()}
        return {"mean_mcs": self.mean_mcs, "n_features": self.n_features, "found": found}


def overlap_stats(values: torch.Tensor, thresholds: tuple[float, ...]) -> OverlapStats:
    """Mean MCS and, per threshold, the count and fraction of features at or above it."""
    n = values.numel()
    found = {}
    for t in thresholds:
        count = int((values >= t).sum())
        found[t] = Found(count, count / n if n else math.nan)
    return OverlapStats(values.mean().item() if n else math.nan, n, found)
