"""What every SAE architecture shares: the decoder, the training-loss contract, the scale folding.

An architecture is one subclass in one file of this package: `encode`, `training_loss` (named terms
whose sum is the loss), and, where its training form is not what it saves, `inference_form`.
Parameter names and shapes follow SAELens/SAEBench (W_enc [d_in, d_sae], W_dec [d_sae, d_in], ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn


@dataclass(frozen=True)
class Hyperparameter:
    """One of an architecture's config keys (`sae.<name>`): its default, a one-line doc, and the values
    allowed (a number, an integer when `integer`, above `lowest`, or with `positive_int_list` a list of
    positive integers; None too when `nullable` or when the default is None)."""

    default: Any
    doc: str
    integer: bool = False
    lowest: float = 0
    inclusive: bool = True
    positive_int_list: bool = False

    def problem(self, value: Any) -> str | None:
        """Why `value` is not allowed, as the end of a sentence that starts with `sae.<name>=<value>`; None
        when it is."""
        if value is None:
            return None if self.default is None else "is not allowed: give a value"
        if self.positive_int_list:
            ok = isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                           for v in value)
            return None if ok else "must be a list of positive integers summing to d_sae, or null"
        kinds = (int,) if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            return "is not an integer" if self.integer else "is not a finite number"
        if value < self.lowest or (value == self.lowest and not self.inclusive):
            return f"must be {'≥' if self.inclusive else '>'} {self.lowest:g}"
        return None


def encoder_init_norm(default: float) -> Hyperparameter:
    """The `encoder_init_norm` key of an architecture that offers it, with its default."""
    return Hyperparameter(default, "each encoder column starts as its decoder row times this", inclusive=False)


# every architecture by its name: a subclass of Sae that sets `architecture` in its own body registers
# itself there when it is defined (saesweep.sae.ARCHITECTURES is this dict)
REGISTRY: dict[str, type[Sae]] = {}


class SaeOutput(NamedTuple):
    x_hat: torch.Tensor  # [..., d_in] reconstruction
    feature_acts: torch.Tensor  # [..., d_sae] non-negative feature activations


class TrainStep(NamedTuple):
    # named scalar terms (mse, l1, aux_k, l0 ...): their sum is the loss; every architecture has "mse",
    # mean over the batch of ‖x − x̂‖², unweighted (what train/mse logs)
    losses: dict[str, torch.Tensor]
    x_hat: torch.Tensor
    # [batch, d_sae]; or, from an architecture that keeps a few latents per token, [batch, k], the
    # activations of the latents `indices` names (the dense form would cost a pass of its own)
    feature_acts: torch.Tensor
    indices: torch.Tensor | None = None


class Sae(nn.Module):
    """An SAE: encoder of the architecture, untied linear decoder with unit-norm rows.

    `hyperparameters` names the architecture's own config keys (`sae.<key>`) and their defaults;
    `activation_unit_parameters` are the parameters measured in activation units, scaled when the
    SAE is moved from normalised to raw activations (`rescaled`).
    """

    architecture: ClassVar[str]
    saelens_architecture: ClassVar[str | None] = None  # SAELens's name for this saved form (None: not saved as itself)
    hyperparameters: ClassVar[dict[str, Hyperparameter]] = {}
    # the hyperparameter that sets its sparsity, which sae.target_l0 steers (None: k sets it, or nothing)
    sparsity_coefficient: ClassVar[str | None] = None
    activation_unit_parameters: ClassVar[tuple[str, ...]] = ("b_enc", "b_dec")
    # the hyperparameters that SAEs of one shape may differ in and still share one batched ensemble
    # step: those its training step reads only as numbers (a coefficient), not those that set a shape (k)
    per_member_hyperparameters: ClassVar[tuple[str, ...]] = ()
    # whether training_loss reads its `dead` mask (AuxK); when not, the step is given no dead feature and the
    # mask is not worked out from the counters at every step
    reads_dead_mask: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any):
        """Registers an architecture under the name its own body gives (`architecture`). Names are not
        inherited: a subclass that names none is not registered, and saves under no SAELens name of
        its parent's, so it cannot take over how that parent's files load."""
        super().__init_subclass__(**kwargs)
        if "saelens_architecture" not in cls.__dict__:
            cls.saelens_architecture = None
        name = cls.__dict__.get("architecture")
        if name is None:
            return
        where = f"{cls.__module__}.{cls.__qualname__}"
        for other in REGISTRY.values():
            if f"{other.__module__}.{other.__qualname__}" == where:  # the same class, its module imported again
                continue
            if other.architecture == name or (cls.saelens_architecture and other.saelens_architecture == cls.saelens_architecture):
                raise TypeError(f"architecture {name!r} (SAELens name {cls.saelens_architecture!r}) of {where} clashes "
                                f"with {other.__module__}.{other.__qualname__}'s; choose another name")
        REGISTRY[name] = cls

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each hyperparameter's default value."""
        return {name: hp.default for name, hp in cls.hyperparameters.items()}

    def __init__(self, d_in: int, d_sae: int, generator: torch.Generator | None = None, **hyperparameters: Any):
        super().__init__()
        unknown = set(hyperparameters) - set(self.hyperparameters)
        if unknown:
            raise TypeError(f"{self.architecture} has no hyperparameter {sorted(unknown)}")
        self.d_in = d_in
        self.d_sae = d_sae
        self.hparams = {**self.defaults(), **hyperparameters}
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.reset_parameters(generator)

    @classmethod
    def parameter_shapes(cls, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
        """The shapes of the saved tensors, known before allocating (a corrupt cfg.json may claim sizes
        too large to allocate)."""
        return {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows, encoder = decoder transpose (a good start: each feature
        first reads the direction it writes), scaled by the architecture's `encoder_init_norm` if it has one."""
        self.W_dec.normal_(generator=generator)
        self.normalize_decoder()
        self.W_enc.copy_(self.W_dec.T * self.hparams.get("encoder_init_norm", 1.0))
        self.b_enc.zero_()
        self.b_dec.zero_()

    # -- the forward pass -------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return encoder_affine(x, self.b_dec, self.W_enc, self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """`encode(x)[..., features]` ([..., len(features)]); architectures whose features are
        independent of each other override it to compute only those."""
        return self.encode(x)[..., features]

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return feature_acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> SaeOutput:
        feature_acts = self.encode(x)
        return SaeOutput(self.decode(feature_acts), feature_acts)

    def training_loss(self, x: torch.Tensor, dead: torch.Tensor) -> TrainStep:
        """The loss terms on a batch [batch, d_in] of normalised activations; `dead` [d_sae] marks the
        features that did not fire over the training's dead window (for AuxK-style terms)."""
        x_hat, feature_acts = self(x)
        return TrainStep({"mse": mse(x_hat, x)}, x_hat, feature_acts)

    def inference_form(self) -> Sae:
        """The SAE as it is saved and evaluated (BatchTopK-style SAEs become JumpReLU)."""
        return self

    # -- the training constraints: each acts on several SAEs of this class and one shape at once (a
    # group of the batched ensemble step, or one SAE), on each SAE as it would alone ------------------
    def normalize_decoder(self) -> None:
        normalize_decoders([self])

    @classmethod
    @torch.no_grad()
    def before_optimizer_step(cls, saes: Sequence[Sae]) -> None:
        """Project out the gradient component along each (unit) decoder row: the step then moves the
        direction, not the norm, which a sparsity penalty would otherwise shrink away."""
        with_grad = [sae for sae in saes if sae.W_dec.grad is not None]
        if not with_grad:
            return
        grads = [sae.W_dec.grad for sae in with_grad]
        decoders = _stacked([sae.W_dec for sae in with_grad])
        parallel = (_stacked(grads) * decoders).sum(dim=-1, keepdim=True)
        torch._foreach_sub_(grads, list((parallel * decoders).unbind()))

    @classmethod
    @torch.no_grad()
    def after_optimizer_step(cls, saes: Sequence[Sae]) -> None:
        normalize_decoders(saes)

    @torch.no_grad()
    def revives_after(self, tokens_seen: int, step_tokens: int, total_tokens: int) -> bool:
        """Whether `revive_dead` is due after the step that took the training to `tokens_seen` of its
        `total_tokens` tokens (asked after every optimizer step; the dead mask is worked out only when it is)."""
        return False

    def revive_dead(
        self, dead: torch.Tensor, x: torch.Tensor, optimizer: torch.optim.Optimizer, tokens_seen: int, step_tokens: int
    ) -> torch.Tensor | None:
        """Called after an optimizer step for which `revives_after` said so, with the dead mask and the
        step's batch: an architecture that re-initialises dead features does it here and returns the
        mask of those it revived."""
        return None

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor) -> None:
        """Decoder bias at the geometric median of a data sample (robust centre of the activations)."""
        self.b_dec.copy_(geometric_median(sample.float()).to(self.b_dec))

    # -- saving ---------------------------------------------------------------------------------
    @torch.no_grad()
    def rescaled(self, scale: float) -> Sae:
        """A copy that takes and returns activations `scale` times larger, with features scaled alike.

        Training runs on activations divided by `scale`; this folds the factor back so the saved SAE
        works on raw activations and keeps unit-norm decoder rows.
        """
        out = type(self)(self.d_in, self.d_sae, **self.hparams).to(self.W_enc.device)
        for name, tensor in self.tensors().items():
            getattr(out, name).copy_(tensor * scale if name in self.activation_unit_parameters else tensor)
        self.copy_state_to(out, scale)
        return out

    def copy_state_to(self, other: Sae, scale: float) -> None:
        """Non-parameter state that `rescaled` must carry over (e.g. a running threshold)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters()}


RESAMPLE_EVERY_TOKENS = Hyperparameter(
    None, "re-initialise the features dead over the dead window (sae.recipe.dead_window_tokens) each time this "
    "many training tokens pass (null: never)", integer=True, lowest=1)


class ResamplingSae(Sae):
    """An SAE whose dead features can be resampled (Anthropic's "Towards Monosemanticity" recipe): an
    architecture that offers it lists RESAMPLE_EVERY_TOKENS among its hyperparameters as
    `resample_every_tokens` and says how strongly a revived feature starts reading its direction."""

    # a revived feature's encoder column norm, as a multiple of the live columns' mean norm
    resampled_encoder_norm: ClassVar[float]

    def revives_after(self, tokens_seen: int, step_tokens: int, total_tokens: int) -> bool:
        """Every resample_every_tokens training tokens (null: never), but for the last interval: a revived
        feature trains for a whole interval, or it would be judged as a fresh random direction."""
        every = self.hparams["resample_every_tokens"]
        return (bool(every) and tokens_seen // every != (tokens_seen - step_tokens) // every
                and tokens_seen + every <= total_tokens)

    @torch.no_grad()
    def revive_dead(
        self, dead: torch.Tensor, x: torch.Tensor, optimizer: torch.optim.Optimizer, tokens_seen: int, step_tokens: int
    ) -> torch.Tensor | None:
        """Each dead feature gets the direction of a batch input drawn with probability ∝ its squared
        reconstruction loss: its decoder row becomes that unit direction, its encoder column the direction
        scaled to `resampled_encoder_norm` × the mean norm of the live columns, its bias 0. Of the Adam
        moments of all three, the first is reset to 0 and the second set to the live features' mean: reset to
        0 as well, under a step count that is not reset, it made a revived feature's first hundred updates
        3–6× the learning rate (m/√v of a steady gradient), a scatter that killed most of them again."""
        if not dead.any():
            return None
        losses = (self(x).x_hat - x).pow(2).sum(dim=-1)
        generator = torch.Generator(device=x.device).manual_seed(int(tokens_seen))
        chosen = torch.multinomial(losses.pow(2) + 1e-12, int(dead.sum()), replacement=True, generator=generator)
        directions = x[chosen] - self.b_dec
        directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        alive_norm = self.W_enc[:, ~dead].norm(dim=0).mean() if (~dead).any() else torch.tensor(1.0)
        self.W_dec[dead] = directions
        self.W_enc[:, dead] = directions.T * self.resampled_encoder_norm * alive_norm
        self.b_enc[dead] = 0.0
        for parameter, feature_dim in ((self.W_dec, 0), (self.W_enc, 1), (self.b_enc, 0)):
            state = optimizer.state.get(parameter, {})
            if "exp_avg" in state:
                state["exp_avg"].movedim(feature_dim, 0)[dead] = 0.0  # a view: features first
            if "exp_avg_sq" in state:
                second = state["exp_avg_sq"].movedim(feature_dim, 0)
                second[dead] = second[~dead].mean(dim=0) if (~dead).any() else 0.0
        return dead.clone()


@torch.no_grad()
def normalize_decoders(saes: Sequence[Sae]) -> None:
    """Every decoder row of these SAEs (of one shape) scaled to unit norm."""
    decoders = [sae.W_dec for sae in saes]
    torch._foreach_div_(decoders, list(_stacked(decoders).norm(dim=-1, keepdim=True).clamp_min(1e-8).unbind()))


def _stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors (of one shape) stacked; one alone is viewed, not copied."""
    return tensors[0][None] if len(tensors) == 1 else torch.stack(list(tensors))


def encoder_affine(x: torch.Tensor, b_dec: torch.Tensor, W: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(x − b_dec) @ W + bias. Autograd would give b_dec its gradient through a [batch, d_in] matmul
    and then sum it over the batch; here the batch sum comes first and the rest is a vector–matrix
    product, −(Σ_batch ∂out) @ Wᵀ, through a term whose value is exactly zero: one of the training
    step's big matmuls fewer (of three in a TopK step, six in a dense one)."""
    constant = b_dec.detach()
    bias = bias - (b_dec - constant) @ W.detach()
    if torch.is_autocast_enabled(x.device.type) or x.dim() != 2:
        # autocast would run addmm, bias and all, in bf16: the sum stays float32 this way, as the step expects
        # (and addmm takes a 2-D input only)
        return (x - constant) @ W + bias
    return torch.addmm(bias, x - constant, W)  # one pass over the [batch, d_sae] output fewer


def mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ‖x − x̂‖²."""
    return (x_hat - x).pow(2).sum(dim=-1).mean()


@torch.no_grad()
def geometric_median(points: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to `points` [n, d]."""
    median = points.mean(dim=0)
    for _ in range(iters):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        updated = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if (updated - median).norm() <= tol * median.norm().clamp_min(1.0):
            return updated
        median = updated
    return median
