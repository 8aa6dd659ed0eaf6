"""The views of a feature report (docs/METHODS.md, "Feature reports"), computed for many
features at once: every function takes all selected features and batches across them.

Conventions: `contexts` [n_ctx, ctx_len] are the held-out token contexts, `acts` [n_ctx, ctx_len, k]
the activations of the k selected features on them, `features` [k] the selected feature ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saesweep.lm import stop_layer_after
from saesweep.sae import Sae


@dataclass(frozen=True)
class Example:
    """One token of the held-out set where a feature is read."""

    context: int  # row of `contexts`
    position: int  # token position in that context
    activation: float  # the feature's activation there
    bin: int | None = None  # uniform examples: index of the bin of (0, max] it was drawn from


@dataclass(frozen=True)
class FeatureStatistics:
    """Per feature of the whole dictionary, over the held-out tokens: [d_sae] each."""

    frequency: torch.Tensor  # fraction of tokens where the feature is > 0
    mean_activation: torch.Tensor  # mean over the tokens where it fires (as in feature_stats.safetensors)
    max_activation: torch.Tensor


_ENCODE_CONTEXTS = 256  # contexts encoded at a time: bounds the memory of moving activations to the SAE's device


def _device(sae: Sae) -> torch.device:
    return sae.W_enc.device


# --- statistics and examples ---------------------------------------------------------------------


@torch.no_grad()
def feature_statistics(sae: Sae, activations: torch.Tensor, chunk_tokens: int = 8192) -> FeatureStatistics:
    """Statistics of every feature over `activations` [..., d_in], encoded in chunks of tokens."""
    x = activations.reshape(-1, activations.shape[-1])
    count = torch.zeros(sae.d_sae, dtype=torch.float64, device=_device(sae))
    total = torch.zeros_like(count)
    peak = torch.zeros(sae.d_sae, device=_device(sae))
    for start in range(0, len(x), chunk_tokens):
        f = sae.encode(x[start : start + chunk_tokens].to(_device(sae)))
        count += (f > 0).sum(dim=0)
        total += f.sum(dim=0, dtype=torch.float64)
        peak = torch.maximum(peak, f.max(dim=0).values)
    return FeatureStatistics(
        frequency=(count / len(x)).float().cpu(),
        mean_activation=(total / count.clamp_min(1)).float().cpu(),
        max_activation=peak.cpu(),
    )


@torch.no_grad()
def selected_activations(sae: Sae, activations: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Activations [n_ctx, ctx_len, k] of the selected features on `activations` [n_ctx, ctx_len, d_in]."""
    device = _device(sae)
    chunks = [
        sae.encode_features(activations[i : i + _ENCODE_CONTEXTS].to(device), features.to(device)).cpu()
        for i in range(0, len(activations), _ENCODE_CONTEXTS)
    ]
    return torch.cat(chunks)


def top_examples(acts: torch.Tensor, n: int) -> list[list[Example]]:
    """Per feature, the `n` contexts with the highest activation (one example per context, at its maximum)."""
    per_context, argmax = acts.max(dim=1)  # [n_ctx, k]
    n = min(n, acts.shape[0])
    values, contexts = per_context.topk(n, dim=0)  # [n, k]
    return [
        [
            Example(int(c), int(argmax[c, j]), float(v))
            for v, c in zip(values[:, j].tolist(), contexts[:, j].tolist())
            if v > 0
        ]
        for j in range(acts.shape[2])
    ]


def activation_bins(values: torch.Tensor, top: float, n_bins: int) -> torch.Tensor:
    """Bin index of each positive value in the equal-width bins (0, top/n], (top/n, 2·top/n], …, ((n-1)·top/n, top]."""
    return (torch.ceil(values / top * n_bins) - 1).clamp(0, n_bins - 1).long()


def uniform_examples(acts: torch.Tensor, n_bins: int, per_bin: int, generator: torch.Generator) -> list[list[Example]]:
    """Per feature, up to `per_bin` tokens drawn at random from each equal-width bin of (0, max],
    so that weak activations are seen as well as strong ones (ordered by bin, then position)."""
    _, ctx_len, k = acts.shape
    flat = acts.reshape(-1, k)
    out = []
    for j in range(k):
        values = flat[:, j]
        firing = (values > 0).nonzero().squeeze(1)
        examples: list[Example] = []
        if len(firing):
            bins = activation_bins(values[firing], float(values.max()), n_bins)
            # one random key per firing token; the per_bin smallest keys of a bin are its sample
            keys = torch.rand(len(firing), generator=generator)
            for b in range(n_bins):
                members = (bins == b).nonzero().squeeze(1)
                chosen = members[keys[members].argsort()[:per_bin]]
                for index in sorted(firing[chosen].tolist()):
                    examples.append(Example(index // ctx_len, index % ctx_len, float(values[index]), b))
        out.append(examples)
    return out


def activation_histograms(acts: torch.Tensor, n_bins: int) -> list[tuple[list[float], list[int]]]:
    """Per feature, (edges [n_bins+1], counts [n_bins]) of its non-zero activations over (0, max]."""
    flat = acts.reshape(-1, acts.shape[-1])
    out = []
    for j in range(flat.shape[1]):
        values = flat[:, j][flat[:, j] > 0]
        top = float(values.max()) if len(values) else 0.0
        counts = torch.bincount(activation_bins(values, top, n_bins), minlength=n_bins) if len(values) else (
            torch.zeros(n_bins, dtype=torch.long)
        )
        out.append((torch.linspace(0, top, n_bins + 1).tolist(), counts.tolist()))
    return out


def density_histogram(frequency: torch.Tensor, n_bins: int = 40) -> dict:
    """Histogram of log10 firing frequency over all features; features that never fired are counted apart."""
    live = frequency[frequency > 0]
    if len(live) == 0:
        return {"log10_edges": [], "counts": [], "dead": len(frequency)}
    logs = live.double().log10()
    low, high = float(logs.min()), float(logs.max())
    if high - low < 1e-6:
        low, high = low - 0.5, high + 0.5
    counts = torch.histc(logs, bins=n_bins, min=low, max=high).long()
    return {
        "log10_edges": torch.linspace(low, high, n_bins + 1).tolist(),
        "counts": counts.tolist(),
        "dead": int((frequency == 0).sum()),
    }


# --- logit lens ----------------------------------------------------------------------------------


def effective_unembedding(model, use_ln_final: bool) -> torch.Tensor:
    """W_U [d_model, d_vocab], rows scaled by the final LayerNorm weight when asked (and the model has one):
    the linear map a residual direction goes through to the logits, normalisation aside."""
    w_u = model.W_U.detach().float()
    scale = getattr(getattr(model, "ln_final", None), "w", None) if use_ln_final else None
    if scale is not None:
        w_u = w_u * scale.detach().float()[:, None]
    return w_u


def outlier_tokens(w_u: torch.Tensor, n_mads: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens whose unembedding norm is an outlier: |norm − median| > n_mads · 1.4826 · MAD.

    1.4826 · MAD estimates the standard deviation of normal data robustly, so the rule reads
    "more than n_mads robust standard deviations from the median". Tokens the model never trained
    on keep an odd norm and dominate any direction's top or bottom tokens. Returns (ids, norms).
    """
    norms = w_u.norm(dim=0)
    median = norms.median()
    mad = (norms - median).abs().median().clamp_min(1e-12)
    ids = ((norms - median).abs() > n_mads * 1.4826 * mad).nonzero().squeeze(1)
    return ids, norms


def logit_lens(
    directions: torch.Tensor, w_u: torch.Tensor, excluded: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top and bottom `k` tokens of `directions` [n, d_model] @ w_u, excluded token ids left out.

    Returns (top_ids, top_logits, bottom_ids, bottom_logits), each [n, k'] with k' = min(k, usable tokens).
    """
    logits = directions.float() @ w_u.to(directions.device)
    k = min(k, w_u.shape[1] - len(excluded))
    top = logits.index_fill(1, excluded.to(logits.device), float("-inf")).topk(k, dim=1)
    bottom = logits.index_fill(1, excluded.to(logits.device), float("inf")).topk(k, dim=1, largest=False)
    return top.indices.cpu(), top.values.cpu(), bottom.indices.cpu(), bottom.values.cpu()


# --- token deletion (ablated text) ---------------------------------------------------------------


@torch.no_grad()
def deletion_effects(
    model,
    sae: Sae,
    hook_point: str,
    contexts: torch.Tensor,
    requests: list[tuple[int, Example]],
    first_deletable: int,
    batch_contexts: int,
) -> list[torch.Tensor]:
    """For each (feature, example): delete each earlier token s in turn and record the change of the
    feature's activation at the example's token, which then sits one position to the left.

    Returns per request a tensor [position] of activation(after deleting s) − activation(original)
    for s < position, NaN for s < first_deletable (the BOS token is not text and is never deleted).
    All deletions of all requests go through the model together, in batches of sequences sorted by
    length and cut just after the position that is read (later tokens cannot change it: causal).
    """
    sequences, read_at, feature_of, owner, deleted = [], [], [], [], []
    for r, (feature, example) in enumerate(requests):
        context = contexts[example.context]
        for s in range(first_deletable, example.position):
            sequences.append(torch.cat([context[:s], context[s + 1 :]]))
            read_at.append(example.position - 1)
            feature_of.append(feature)
            owner.append(r)
            deleted.append(s)
    results = [torch.full((example.position,), float("nan")) for _, example in requests]
    if not sequences:
        return results
    after = _activation_at(
        model, sae, hook_point, torch.stack(sequences), torch.tensor(read_at), torch.tensor(feature_of),
        batch_contexts,
    )
    for value, r, s in zip(after.tolist(), owner, deleted):
        results[r][s] = value - requests[r][1].activation
    return results


# --- context dependence ---------------------------------------------------------------------------


@torch.no_grad()
def token_alone_activations(
    model, sae: Sae, hook_point: str, tokens: torch.Tensor, features: torch.Tensor, bos: int | None,
    batch_contexts: int,
) -> torch.Tensor:
    """Activation of features[r] on tokens[r] with no context: the sequence [BOS, token] read at the
    token, the place of a context's first text token in training (or [token] alone without BOS): [n]."""
    sequences = tokens[:, None] if bos is None else torch.stack([torch.full_like(tokens, bos), tokens], dim=1)
    positions = torch.full((len(tokens),), sequences.shape[1] - 1, dtype=torch.long)
    return _activation_at(model, sae, hook_point, sequences, positions, features, batch_contexts)


def context_dependence(in_context: torch.Tensor, alone: torch.Tensor) -> float | None:
    """1 − Σ min(alone⁺, in context) / Σ in context over a feature's examples, in [0, 1]: 0 when its
    token alone reaches every example's activation (read off the embedding), 1 when the token alone
    does not fire it at all (computed from the context). Weighted by activation, so the strong examples
    decide; None when no example fires."""
    fired = in_context.clamp(min=0)
    total = float(fired.sum())
    if total <= 0:
        return None
    kept = float(torch.minimum(alone.clamp(min=0), fired).sum())
    return min(1.0, max(0.0, 1.0 - kept / total))


def deletion_by_offset(deltas: list[torch.Tensor], max_offset: int) -> list[tuple[int, float | None, int]]:
    """The ablated-text view summed up by relative position: for offset −1 … −max_offset, the mean drop
    of the feature's activation at the example's token when the token that many places before it is
    deleted (deltas[e][s] = activation after deleting s − before, over positions s < the example's;
    NaN where nothing was deleted, e.g. BOS), and how many examples had such a token."""
    out = []
    for offset in range(1, max_offset + 1):
        drops = [-float(d[len(d) - offset]) for d in deltas if len(d) >= offset and not torch.isnan(d[len(d) - offset])]
        out.append((-offset, sum(drops) / len(drops) if drops else None, len(drops)))
    return out


def _activation_at(
    model, sae: Sae, hook_point: str, tokens: torch.Tensor, positions: torch.Tensor, features: torch.Tensor,
    batch_contexts: int,
) -> torch.Tensor:
    """Activation of features[r] at tokens[r, positions[r]], for every row r: [n]."""
    device = _device(sae)
    stop_at = stop_layer_after(hook_point)
    order = positions.argsort()
    out = torch.empty(len(tokens))
    for start in range(0, len(order), batch_contexts):
        rows = order[start : start + batch_contexts]
        length = int(positions[rows].max()) + 1
        _, cache = model.run_with_cache(
            tokens[rows, :length].to(device), names_filter=[hook_point], stop_at_layer=stop_at
        )
        x = cache[hook_point].float()[torch.arange(len(rows), device=device), positions[rows].to(device)]
        out[rows] = _per_row_activation(sae, x, features[rows].to(device)).cpu()
    return out


def _per_row_activation(sae: Sae, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Activation of feature features[r] on x[r, ...] for each row r: x [B, ..., d_in] → [B, ...]."""
    unique, index = features.unique(return_inverse=True)
    acts = sae.encode_features(x, unique)  # [B, ..., n_unique]
    index = index.view(-1, *([1] * (acts.dim() - 1))).expand(*acts.shape[:-1], 1)
    return acts.gather(-1, index).squeeze(-1)


# --- direction ablation --------------------------------------------------------------------------


@torch.no_grad()
def direction_ablation(
    model,
    sae: Sae,
    hook_point: str,
    contexts: torch.Tensor,
    requests: list[tuple[int, int]],
    batch_contexts: int,
) -> torch.Tensor:
    """Change of log p(actual next token) when the residual stream at the hook loses f_i(x)·W_dec[i].

    `requests` are (feature, context row) pairs; returns [n_requests, ctx_len − 1], entry p being the
    change at the prediction of token p+1. The clean log-probs are computed once per distinct context.
    """
    device = _device(sae)
    if not requests:
        return torch.empty(0, contexts.shape[1] - 1)
    features = torch.tensor([f for f, _ in requests])
    rows = torch.tensor([c for _, c in requests])
    distinct, where = rows.unique(return_inverse=True)
    clean = torch.cat([
        _next_token_logprobs(model, contexts[distinct[i : i + batch_contexts]].to(device))
        for i in range(0, len(distinct), batch_contexts)
    ])
    ablated = []
    for start in range(0, len(requests), batch_contexts):
        batch_features = features[start : start + batch_contexts].to(device)

        def remove_feature(act, hook, batch_features=batch_features):
            coefficient = _per_row_activation(sae, act.float(), batch_features)  # [B, pos]
            return (act - coefficient[..., None] * sae.W_dec[batch_features][:, None, :]).to(act.dtype)

        ablated.append(_next_token_logprobs(
            model, contexts[rows[start : start + batch_contexts]].to(device), [(hook_point, remove_feature)]
        ))
    return torch.cat(ablated) - clean[where]


def _next_token_logprobs(model, tokens: torch.Tensor, fwd_hooks=()) -> torch.Tensor:
    """log p(tokens[:, p+1] | tokens[:, :p+1]) for every p: [batch, ctx_len − 1], on the CPU."""
    logits = model.run_with_hooks(tokens, return_type="logits", fwd_hooks=list(fwd_hooks)).float()[:, :-1]
    chosen = logits.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return (chosen - logits.logsumexp(dim=-1)).cpu()


@dataclass(frozen=True)
class TokenEffect:
    token: int
    mean_delta: float  # mean change of log p(token) where it was the actual next token
    count: int  # scored positions with this next token


def logprob_changes_by_token(
    deltas: torch.Tensor, next_tokens: torch.Tensor, scored: torch.Tensor, min_count: int, k: int
) -> tuple[list[TokenEffect], list[TokenEffect]]:
    """Aggregate log-prob changes [n, ctx_len−1] by actual next token over the `scored` positions.

    Returns (falls, rises): the `k` next tokens, seen at least `min_count` times, whose mean log-prob
    fell the most and rose the most.
    """
    ids = next_tokens[scored]
    values = deltas[scored].double()
    if len(ids) == 0:
        return [], []
    n_vocab = int(ids.max()) + 1
    sums = torch.zeros(n_vocab, dtype=torch.float64).index_add_(0, ids, values)
    counts = torch.bincount(ids, minlength=n_vocab)
    eligible = (counts >= max(min_count, 1)).nonzero().squeeze(1)
    means = sums[eligible] / counts[eligible]
    order = means.argsort()

    def effects(picks: torch.Tensor) -> list[TokenEffect]:
        return [
            TokenEffect(int(eligible[i]), float(means[i]), int(counts[eligible[i]]))
            for i in picks.tolist()
        ]

    falls = effects(order[:k])
    rises = effects(order.flip(0)[:k])
    return [e for e in falls if e.mean_delta < 0], [e for e in rises if e.mean_delta > 0]
