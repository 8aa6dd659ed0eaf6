"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): the k largest
pre-activations of each token are kept, the rest are zero; AuxK makes dead latents useful again."""

from __future__ import annotations

import torch

from .base import (
    RESAMPLE_EVERY_TOKENS,
    Hyperparameter,
    ResamplingSae,
    SaeOutput,
    TrainStep,
    encoder_init_norm,
    mse,
)


class TopKSae(ResamplingSae):
    architecture = "topk"
    saelens_architecture = "topk"
    hyperparameters = {
        "k": Hyperparameter(32, "latents kept per token", integer=True, lowest=1),
        "aux_k": Hyperparameter(None, "dead latents that reconstruct the residual (null: d_in // 2, as SAELens)",
                                integer=True, lowest=1),
        "aux_coef": Hyperparameter(1 / 32, "the AuxK term's weight (Gao et al.: 1/32)"),
        "resample_every_tokens": RESAMPLE_EVERY_TOKENS,
        "encoder_init_norm": encoder_init_norm(1.0),
    }
    per_member_hyperparameters = ("aux_coef", "encoder_init_norm")
    reads_dead_mask = True  # AuxK
    # as strong as a live feature: on the input it was drawn from it then wins a place among the k
    resampled_encoder_norm = 1.0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._sparse_forward(self.pre_acts(x))[1]

    def forward(self, x: torch.Tensor) -> SaeOutput:
        x_hat, feature_acts = self._sparse_forward(self.pre_acts(x))
        return SaeOutput(x_hat, feature_acts)

    def _sparse_forward(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and feature activations; the decoder reads only the k active rows per token."""
        values, indices = pre.topk(self.hparams["k"], dim=-1, sorted=False)
        values = torch.relu(values)
        feature_acts = torch.zeros_like(pre).scatter(-1, indices, values)
        return sparse_decode(values, indices, self.W_dec) + self.b_dec, feature_acts

    def training_loss(self, x: torch.Tensor, dead: torch.Tensor) -> TrainStep:
        pre = self.pre_acts(x)
        k = self.hparams["k"]
        with torch.no_grad():  # chosen without autograd: the values are gathered from `pre` after
            top = pre.topk(k, dim=-1, sorted=False)
            aux = self.aux_latents(pre, dead)
        # one gather for both choices: its backward is the step's one [batch, d_sae] pass before the encoder's
        picked = pre.gather(-1, torch.cat([top.indices, aux.indices], dim=-1))
        values = torch.relu(picked[..., :k])
        x_hat = sparse_decode(values, top.indices, self.W_dec) + self.b_dec
        aux_k = self.aux_k_loss(picked[..., k:], aux, x - x_hat, dead)
        return TrainStep({"mse": mse(x_hat, x), "aux_k": self.hparams["aux_coef"] * aux_k}, x_hat, values, top.indices)

    @torch.no_grad()
    def aux_latents(self, pre: torch.Tensor, dead: torch.Tensor):
        """Per token, its `aux_k` largest pre-activations among the dead latents (values, indices). Where
        fewer are dead a live latent stands in, at −inf: the top-k is over all latents, so that the
        dead count needs no host sync."""
        aux_k = min(self.aux_k, self.d_sae)
        return torch.where(dead, pre, -torch.inf).topk(aux_k, dim=-1, sorted=False)

    def aux_k_loss(self, aux_pre: torch.Tensor, aux, residual: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        """AuxK: the top aux_k dead latents of each token (`aux`, from `aux_latents`; `aux_pre` their
        pre-activations, with gradient) reconstruct the part of x the live ones missed (no decoder
        bias), scaled by the share of dead latents up to 1 (as SAELens). Zero when none is dead."""
        aux_values = torch.relu(aux_pre) * (aux.values > -torch.inf)  # a stand-in live latent adds nothing
        aux_recon = sparse_decode(aux_values, aux.indices, self.W_dec)
        aux_error = (aux_recon - residual.detach()).pow(2).sum(dim=-1).mean()
        return aux_error * (dead.sum() / self.aux_k).clamp(max=1.0)

    @property
    def aux_k(self) -> int:
        """The dead latents AuxK reconstructs with, per token: sae.aux_k, or d_in // 2 when null (as SAELens)."""
        return self.hparams["aux_k"] or self.d_in // 2


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Σ_j values[..., j] · W_dec[indices[..., j]]: a gather of the k active decoder rows per token
    instead of a dense matmul over all d_sae (sparsify decodes the same way)."""
    return _SparseDecode.apply(values, indices, W_dec)[0]


def _embedding_bag(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Σ_j values[..., j] · W_dec[indices[..., j]], and what embedding_bag's backward needs of its forward
    (offsets, offset2bag, bag_size, max_indices)."""
    flat = indices.reshape(-1)
    offsets = torch.arange(0, flat.numel(), indices.shape[-1], device=flat.device)
    out, *saved = torch.ops.aten._embedding_bag(W_dec, flat, offsets, False, _SUM, False, values.reshape(-1))
    return out.reshape(*indices.shape[:-1], W_dec.shape[-1]), offsets, *saved


_SUM = 0  # embedding_bag's mode


class _SparseDecode(torch.autograd.Function):
    """`_embedding_bag`, with its backward written out in the aten operators autograd itself calls for it
    (so that torch.compile traces the step whole), and a batching rule for torch.func.vmap (the batched
    ensemble step), which embedding_bag has none of: the members' decoders [n, d_sae, d_in] become one
    table of n·d_sae rows, member m's indices offset by m·d_sae, and one embedding_bag decodes every member."""

    @staticmethod
    def forward(values, indices, W_dec):
        return _embedding_bag(values, indices, W_dec)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, *output[1:])
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx, grad, *_):
        values, indices, W_dec, offsets, offset2bag, bag_size, max_indices = ctx.saved_tensors
        flat, grad = indices.reshape(-1), grad.reshape(-1, W_dec.shape[1])
        grad_W_dec = torch.ops.aten._embedding_bag_backward(
            grad, flat, offsets, offset2bag, bag_size, max_indices, W_dec.shape[0], False, _SUM, False, values.reshape(-1)
        )
        grad_values = torch.ops.aten._embedding_bag_per_sample_weights_backward(grad, W_dec, flat, offsets, offset2bag, _SUM)
        return grad_values.reshape(values.shape), None, grad_W_dec

    @staticmethod
    def vmap(info, in_dims, values, indices, W_dec):
        n = info.batch_size
        values, indices, W_dec = (
            t.movedim(dim, 0) if dim is not None else t.expand(n, *t.shape) for t, dim in zip((values, indices, W_dec), in_dims)
        )
        d_sae = W_dec.shape[1]
        offsets = torch.arange(0, n * d_sae, d_sae, device=indices.device).reshape(n, *[1] * (indices.dim() - 1))
        # autograd records embedding_bag itself here: its backward is the native one; what the backward of the
        # unbatched function would keep is not per member, and nothing reads it
        out = _embedding_bag(values, indices + offsets, W_dec.reshape(n * d_sae, -1))
        return out, (0, *[None] * (len(out) - 1))
