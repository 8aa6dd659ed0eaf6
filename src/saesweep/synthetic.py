"""Synthetic activations with known features (`data=synthetic`): the ground truth that says whether the
features a dictionary finds, and finds again, are the real ones.

Each token is x = Σ_i a_i · m_i · d_i + noise: d_i a unit direction per true feature (random, with a share of
near-duplicates of another feature), a_i ∈ {0, 1} whether it fires, m_i ≥ 0 its magnitude. Firing
probabilities follow a power law over the features, scaled so that `mean_active` features fire per
token on average (exactly, unless a probability reaches 1). Two structures make the cases real dictionaries get wrong:
- correlated groups: the members of a group fire together (one event per group, at the members' mean
  probability);
- hierarchies: a child fires only when its parent fires (with probability `child_given_parent` then),
  the case that makes a dictionary absorb the parent's direction into the child's latent.

The features come from `seed` alone; training and held-out tokens from separate streams of it, so the
held-out tokens are never trained on.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from saesweep.errors import ConfigError
from saesweep.io import atomic_write_bytes
from saesweep.metrics import HeldOutSet
from saesweep.store import ActivationStore, ShardSink, StoreSpec, TokenFilter

TRUE_FEATURES_FILE = "true_features.safetensors"
_TRAIN_STREAM, _HELD_OUT_STREAM = "train", "held_out"  # the token streams, seeded apart from the features
BLOCK = 16384  # rows drawn from one seed
GENERATOR_VERSION = 4  # in the store key: a store made by an earlier sampler (other rows for a seed) is not reused


@dataclass(frozen=True)
class SyntheticSpec:
    """The generator's knobs: `data.<name>` in the config (conf/data/synthetic.yaml documents each)."""

    d_in: int = 64
    n_features: int = 512
    mean_active: float = 8.0
    firing_power: float = 1.0
    magnitude_mean: float = 1.0
    magnitude_std: float = 0.25
    duplicate_fraction: float = 0.0
    duplicate_cos: float = 0.9
    n_correlated_groups: int = 0
    group_size: int = 4
    n_hierarchies: int = 0
    children_per_parent: int = 2
    child_given_parent: float = 0.3
    noise_std: float = 0.0
    seed: int = 0

    @classmethod
    def from_config(cls, data_cfg) -> SyntheticSpec:
        """The spec from `cfg.data` (its other keys, such as `name`, are not the generator's)."""
        spec = cls(**{f.name: data_cfg[f.name] for f in dataclasses.fields(cls) if f.name in data_cfg})
        spec.check()
        return spec

    def check(self) -> None:
        positive = ("d_in", "n_features", "group_size", "children_per_parent")
        for name in positive:
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ConfigError(f"data.{name}={getattr(self, name)!r} must be a positive integer")
        for name in ("n_correlated_groups", "n_hierarchies"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise ConfigError(f"data.{name}={getattr(self, name)!r} must be an integer ≥ 0")
        for name in ("duplicate_fraction", "child_given_parent"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"data.{name}={getattr(self, name)!r} must be in [0, 1]")
        if not 0 < self.mean_active <= self.n_features:
            raise ConfigError(f"data.mean_active={self.mean_active} must be in (0, data.n_features={self.n_features}]")
        if not -1 < self.duplicate_cos < 1:
            raise ConfigError(f"data.duplicate_cos={self.duplicate_cos} must be in (-1, 1)")
        if self.magnitude_mean <= 0 or self.magnitude_std < 0 or self.noise_std < 0:
            raise ConfigError("data.magnitude_mean must be > 0, data.magnitude_std and data.noise_std ≥ 0")
        structured = self.n_correlated_groups * self.group_size + self.n_hierarchies * (1 + self.children_per_parent)
        if structured > self.n_features:
            raise ConfigError(
                f"data.n_correlated_groups × data.group_size + data.n_hierarchies × (1 + data.children_per_parent) = "
                f"{structured} features, more than data.n_features={self.n_features}"
            )


@dataclass(frozen=True)
class TrueFeatures:
    """The features behind synthetic activations: directions [n, d_in] (unit rows), their firing
    probabilities [n] (a child's: given its parent), parent [n] (-1: none) and group [n] (-1: none)."""

    directions: torch.Tensor
    firing_probability: torch.Tensor  # a child's: given that its parent fires
    parent: torch.Tensor
    group: torch.Tensor

    def save(self, path: Path) -> None:
        from safetensors.torch import save

        atomic_write_bytes(Path(path), save({f.name: getattr(self, f.name).contiguous() for f in dataclasses.fields(self)}))

    @classmethod
    def load(cls, path: Path) -> TrueFeatures:
        return cls(**load_file(Path(path)))

    @functools.cached_property
    def units(self) -> tuple[Members, torch.Tensor]:
        """The independently firing units: each free (ungrouped, parentless) feature, and each group;
        the features each stands for, and its firing probability per token (float64)."""
        free = ((self.group < 0) & (self.parent < 0)).nonzero().squeeze(-1)
        groups = [(self.group == g).nonzero().squeeze(-1) for g in range(int(self.group.max()) + 1)]
        members = [f.reshape(1) for f in free] + groups
        probability = torch.stack([self.firing_probability[f[0]] for f in members]).double()
        return Members.of(members), probability.clamp(max=1)

    @functools.cached_property
    def children(self) -> Members:
        """Each feature's children (empty for most)."""
        return Members.of([torch.nonzero(self.parent == f).squeeze(-1) for f in range(len(self.parent))])

    def hierarchy_pairs(self) -> list[tuple[int, int]]:
        """(parent, child) for every child."""
        return [(int(p), child) for child, p in enumerate(self.parent.tolist()) if p >= 0]


@dataclass(frozen=True)
class Members:
    """Lists of features (a unit's members, a feature's children) as one flat tensor with each list's
    size and start, so that expanding (token, list) pairs into (token, member) pairs is a few tensor ops."""

    flat: torch.Tensor
    sizes: torch.Tensor
    starts: torch.Tensor

    @classmethod
    def of(cls, lists: list[torch.Tensor]) -> Members:
        sizes = torch.tensor([len(m) for m in lists], dtype=torch.long)
        flat = torch.cat(lists) if lists else torch.zeros(0, dtype=torch.long)
        return cls(flat, sizes, torch.cumsum(sizes, 0) - sizes)

    def expand(self, token: torch.Tensor, which: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token, list) pairs expanded to (token, member) for every member of the list."""
        per_pair = self.sizes[which]
        first = torch.cumsum(per_pair, 0) - per_pair
        within = torch.arange(int(per_pair.sum())) - torch.repeat_interleave(first, per_pair)
        return torch.repeat_interleave(token, per_pair), self.flat[torch.repeat_interleave(self.starts[which], per_pair) + within]


def make_features(spec: SyntheticSpec) -> TrueFeatures:
    """The true features of `spec`: directions, probabilities and structure, from spec.seed alone."""
    generator = torch.Generator().manual_seed(spec.seed)
    n = spec.n_features
    directions = _unit(torch.randn(n, spec.d_in, generator=generator))
    # power law over a random order of the features, scaled to mean_active expected firings per token
    rank = torch.randperm(n, generator=generator).double() + 1
    probability = _scaled_to_mean(rank.pow(-spec.firing_power), spec.mean_active)
    roles = torch.randperm(n, generator=generator).tolist()
    parent = torch.full((n,), -1, dtype=torch.long)
    group = torch.full((n,), -1, dtype=torch.long)
    for _ in range(spec.n_hierarchies):
        family = roles[:1 + spec.children_per_parent]
        roles = roles[1 + spec.children_per_parent:]
        parent[family[1:]] = family[0]
        probability[family[1:]] = spec.child_given_parent
    for g in range(spec.n_correlated_groups):
        members, roles = roles[:spec.group_size], roles[spec.group_size:]
        group[members] = g
        probability[members] = probability[members].mean()
    # structure changed who fires how often: rescale (children follow their parents) to mean_active again
    children = parent >= 0
    marginal = probability.clone()
    marginal[children] = spec.child_given_parent * probability[parent[children]]
    probability[~children] = (probability[~children] * spec.mean_active / marginal.sum()).clamp(max=1)
    n_duplicates = round(spec.duplicate_fraction * n)
    if n_duplicates:
        copies = roles[:n_duplicates]
        others = torch.tensor(sorted(set(range(n)) - set(copies)))  # a copy's original is no copy itself
        originals = others[torch.randint(0, len(others), (n_duplicates,), generator=generator)]
        orthogonal = torch.randn(n_duplicates, spec.d_in, generator=generator)
        base = directions[originals]
        orthogonal = _unit(orthogonal - (orthogonal * base).sum(-1, keepdim=True) * base)
        directions[copies] = spec.duplicate_cos * base + math.sqrt(1 - spec.duplicate_cos**2) * orthogonal
    return TrueFeatures(directions, probability.float(), parent, group)


def activation_chunks(
    spec: SyntheticSpec, features: TrueFeatures, n_tokens: int, held_out: bool = False
) -> Iterator[torch.Tensor]:
    """n_tokens activations [rows, d_in] in blocks of BLOCK rows: the training stream, or the held-out
    one. Block b is drawn from its own seed, so a larger n_tokens extends a smaller one, and blocks can be
    drawn side by side: one per torch thread, each on one thread of its own (torch's thread count is per
    thread), yielded in order. The random draws and the sort run on one core whatever the thread count, so
    two blocks at a time drew 2× as fast as one block on 2 cores."""
    stream = _HELD_OUT_STREAM if held_out else _TRAIN_STREAM

    def block(index: int, rows: int) -> torch.Tensor:
        digest = hashlib.blake2b(f"{spec.seed}/{stream}/{index}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        return _draw(spec, features, BLOCK, generator)[0][:rows]  # whole blocks: the same rows

    features.units, features.children  # noqa: B018 -- the cached tables, built before the threads share them
    workers = max(torch.get_num_threads(), 1)
    with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        drawing: deque[Future[torch.Tensor]] = deque()
        for index, start in enumerate(range(0, n_tokens, BLOCK)):
            drawing.append(pool.submit(block, index, min(BLOCK, n_tokens - start)))
            if len(drawing) > workers:
                yield drawing.popleft().result()
        while drawing:
            yield drawing.popleft().result()


def sample(
    spec: SyntheticSpec, features: TrueFeatures, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """n tokens: their activations [n, d_in] and the true features' coefficients a_i·m_i, a coalesced
    sparse [n, n_features] tensor (see _draw)."""
    x, token, feature, magnitude = _draw(spec, features, n, generator)
    coefficients = torch.sparse_coo_tensor(torch.stack([token, feature]), magnitude, (n, len(features.parent)),
                                           check_invariants=False)  # built valid; saying so silences a warning
    return x, coefficients.coalesce()


def _draw(
    spec: SyntheticSpec, features: TrueFeatures, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """n tokens: their activations [n, d_in], and the (token, feature, magnitude) of every feature that
    fires, sorted by token, then feature. Only the firing features are drawn (about mean_active per token,
    not n_features): each unit (a free feature, or a group firing as one) fires on each token with its
    probability p independently, so the gaps between its firing tokens are Geometric(p), drawn for all
    units at once; a parent's children then fire with it at their probability. x is one embedding_bag
    over the firing features' directions."""
    unit_features, probability = features.units
    unit, token = _bernoulli_events(probability, n, generator)
    token, feature = _members(unit_features, unit, token)
    if (features.parent >= 0).any():  # a child fires only with its parent, then at its probability
        has_children = features.children.sizes[feature] > 0
        child_token, child = features.children.expand(token[has_children], feature[has_children])
        kept = torch.rand(len(child), generator=generator) < features.firing_probability[child]
        token, feature = torch.cat([token, child_token[kept]]), torch.cat([feature, child[kept]])
    # One sort of (token, feature) packed into an integer, not an argsort and two gathers; the draws past
    # the block (token n) sort to the end and are cut there.
    shift = max(len(features.parent) - 1, 1).bit_length()
    packed = (token << shift) | feature
    packed = torch.sort(packed.int() if (n + 1) << shift < 2**31 else packed).values
    packed = packed[: int(torch.searchsorted(packed, n << shift))].long()
    token, feature = packed >> shift, packed & ((1 << shift) - 1)
    magnitude = (spec.magnitude_mean + spec.magnitude_std * torch.randn(len(token), generator=generator)).clamp_min(0)
    per_token = torch.bincount(token, minlength=n)
    offsets = torch.cumsum(per_token, 0) - per_token
    x = torch.nn.functional.embedding_bag(feature, features.directions, offsets, mode="sum", per_sample_weights=magnitude)
    if spec.noise_std:
        x += spec.noise_std * torch.randn(x.shape, generator=generator)
    return x, token, feature, magnitude


def _bernoulli_events(
    probability: torch.Tensor, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit, token) of every event when unit u fires on each of n tokens with probability[u], and some
    events at token n, past the block (the caller drops them): per unit, the partial sums of Geometric(p)
    gaps, drawn a little past the expected count (n·p plus one standard deviation); the units (about one in
    six) whose draws end before token n draw on from where they stopped."""
    units = torch.arange(len(probability))
    per_draw = 1 / torch.log1p(-probability)  # p = 1: −0, so every gap is 1
    start = torch.full((len(probability),), -1, dtype=torch.long)  # each unit's last event so far
    unit_parts, token_parts = [], []
    while len(units):
        p = probability[units]
        expected = (n - 1 - start[units]) * p
        count = (expected + (expected * (1 - p)).sqrt() + 1).ceil().long()
        which = torch.repeat_interleave(units, count)
        uniform = torch.rand(len(which), generator=generator, dtype=torch.float64)
        # gap ⌊log(1 − U) / log(1 − p)⌋ + 1, clamped to the block (a tiny p's would overflow an integer)
        gaps = (torch.log1p(-uniform) * per_draw[which]).clamp_(max=n).long() + 1
        ends = torch.cumsum(count, 0)
        steps = torch.cumsum(gaps, 0)
        before = torch.cat([steps.new_zeros(1), steps[ends[:-1] - 1]]) - start[units]  # per unit
        position = (steps - torch.repeat_interleave(before, count)).clamp_(max=n)
        unit_parts.append(which)
        token_parts.append(position)
        start[units] = position[ends - 1]
        units = units[start[units] < n]  # every draw fell inside: the next event may still be
    return torch.cat(unit_parts), torch.cat(token_parts)


def _members(unit_features: Members, unit: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, unit) events as (token, feature): a free feature's unit is itself, a group's all its members."""
    if len(unit_features.flat) == len(unit_features.sizes):  # no groups: no masks over every event
        return token, unit_features.flat[unit]
    single = unit_features.sizes[unit] == 1
    grouped_token, grouped = unit_features.expand(token[~single], unit[~single])
    return torch.cat([token[single], grouped_token]), torch.cat([unit_features.flat[unit_features.starts[unit[single]]], grouped])


def _unit(m: torch.Tensor) -> torch.Tensor:
    return m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _scaled_to_mean(weights: torch.Tensor, mean_active: float) -> torch.Tensor:
    """Probabilities ∝ weights, capped at 1, summing to mean_active (the cap's excess spread over the rest)."""
    probability = torch.zeros_like(weights)
    capped = torch.zeros_like(weights, dtype=torch.bool)
    for _ in range(len(weights)):
        free = ~capped
        probability[free] = weights[free] * (mean_active - capped.sum()) / weights[free].sum()
        over = free & (probability > 1)
        if not over.any():
            break
        capped |= over
        probability[capped] = 1.0
    return probability


SYNTHETIC = "synthetic"  # data.name of this source; the store key's model and hook point


def is_synthetic(data_cfg) -> bool:
    return data_cfg.get("name") == SYNTHETIC


@dataclass(frozen=True)
class SyntheticData:
    """What training needs from a synthetic source: the complete store, its manifest, the held-out set."""

    spec: SyntheticSpec
    store: ActivationStore
    manifest: dict
    held_out: HeldOutSet


def synthetic_data(cfg, store_root: Path, on_shard: ShardSink | None = None) -> SyntheticData:
    """The activation store of `cfg.data` (a synthetic source), generated once under the store's lock
    like a harvest, with the true features saved beside the shards (TRUE_FEATURES_FILE), and its
    held-out set: eval.n_tokens held-out tokens in contexts of ctx_len (the units of the standard errors).
    `on_shard` is told of each shard generated now (ActivationStore.ensure_rows)."""
    spec = SyntheticSpec.from_config(cfg.data)
    features = make_features(spec)
    key = StoreSpec(
        model=SYNTHETIC,
        model_fingerprint=hashlib.blake2b(repr((GENERATOR_VERSION, spec)).encode(), digest_size=16).hexdigest(),
        hook_point=SYNTHETIC, dataset=dataclasses.asdict(spec), split="train", ctx_len=cfg.ctx_len,
        n_tokens=cfg.n_tokens, dtype=cfg.store.dtype, token_filter=TokenFilter(),
    )
    store = ActivationStore(store_root, key, shard_tokens=cfg.store.shard_tokens)
    store.check_room(spec.d_in)
    manifest = store.ensure_rows(lambda: activation_chunks(spec, features, cfg.n_tokens), on_shard)
    if not (store.path / TRUE_FEATURES_FILE).is_file():
        features.save(store.path / TRUE_FEATURES_FILE)
    n_contexts = -(-cfg.eval.n_tokens // cfg.ctx_len)

    def build() -> dict[str, torch.Tensor]:
        acts = torch.cat(list(activation_chunks(spec, features, n_contexts * cfg.ctx_len, held_out=True)))
        losses = torch.full((n_contexts, cfg.ctx_len - 1), math.nan)
        return HeldOutSet(
            torch.zeros(n_contexts, cfg.ctx_len, dtype=torch.long), acts.reshape(n_contexts, cfg.ctx_len, -1), losses, losses.clone()
        ).named_tensors()

    return SyntheticData(spec, store, manifest, HeldOutSet.from_named_tensors(store.held_out(n_contexts, build)))
