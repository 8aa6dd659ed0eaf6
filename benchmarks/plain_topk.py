"""The plain TopK recipe of Gao et al. 2024 ("Scaling and evaluating sparse autoencoders") in a page of
PyTorch: a baseline for saesweep's TopK defaults (quality.py --plain-baseline), not one of them.

Encoder initialised as the decoder's transpose (random unit decoder rows), decoder bias at the geometric
median of a sample; the k largest pre-activations kept (then ReLU); AuxK with weight 1/32 on the top d_in/2
latents dead for 200k tokens; Adam at lr 2e-3, constant: no warm-up, no decay, no gradient clipping; the
decoder rows renormalised to unit norm after each step. Nothing of saesweep's trainer is used.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from saesweep.sae import TopKSae
from saesweep.sae.base import geometric_median

LR = 2e-3
AUX_COEF = 1 / 32
DEAD_AFTER_TOKENS = 200_000


class PlainTopK(torch.nn.Module):
    def __init__(self, d_in: int, d_sae: int, k: int, sample: torch.Tensor, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(d_sae, d_in, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(W_dec)
        self.W_enc = torch.nn.Parameter(W_dec.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(geometric_median(sample.float()))
        self.k, self.aux_k = k, d_in // 2
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        values, indices = pre.topk(self.k, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
        x_hat = acts @ self.W_dec + self.b_dec
        loss = (x_hat - x).pow(2).sum(-1).mean()
        fired = (acts > 0).any(dim=0)
        self.tokens_since_fired = torch.where(fired, 0, self.tokens_since_fired + len(x))
        dead = self.tokens_since_fired >= DEAD_AFTER_TOKENS
        if dead.any():  # AuxK: the top dead latents reconstruct what the live ones missed
            aux_values, aux_indices = pre[:, dead].topk(min(self.aux_k, int(dead.sum())), dim=-1)
            aux_recon = torch.relu(aux_values).unsqueeze(-1).mul(self.W_dec[dead][aux_indices]).sum(-2)
            loss = loss + AUX_COEF * (aux_recon - (x - x_hat).detach()).pow(2).sum(-1).mean()
        return loss

    @torch.no_grad()
    def renormalise(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    def as_saesweep(self, scale: float) -> TopKSae:
        """The trained SAE as saesweep's TopKSae on raw activations (training saw x / scale), for its evaluation."""
        sae = TopKSae(self.W_enc.shape[0], self.W_enc.shape[1], k=self.k)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, name).copy_(getattr(self, name))
        return sae.rescaled(scale)


def train_plain_topk(batches: Iterable[torch.Tensor], d_in: int, d_sae: int, k: int, sample: torch.Tensor,
                     seed: int = 0) -> PlainTopK:
    """One pass over `batches` (normalised activations [batch, d_in]) with the plain recipe."""
    sae = PlainTopK(d_in, d_sae, k, sample, seed)
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR)
    for x in batches:
        optimizer.zero_grad(set_to_none=True)
        sae.loss(x).backward()
        optimizer.step()
        sae.renormalise()
    return sae
