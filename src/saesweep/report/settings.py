"""What a feature report contains: the `report:` section of conf/report.yaml as a typed, checked object."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from saesweep.errors import ConfigError

SELECTIONS = ("explicit", "frequent", "random", "found_again")
# Keys of the `report:` config section that belong to the command-line app, not to the report engine.
APP_KEYS = ("sweep_dir", "wandb")


@dataclass(frozen=True)
class ReportSettings:
    # which features get a page
    features: tuple[int, ...] | None = None  # explicit ids
    # explicit | frequent | random | found_again; None: explicit when features are given, else found_again
    # for a run of a sweep, else random
    selection: str | None = None
    top_n: int = 50  # features chosen by frequent / random / found_again
    # random draws from the alive features: firing on this fraction of the held-out tokens (the densest are
    # rarely interpretable, the rarest have too few examples)
    alive_min_frequency: float = 1e-4
    alive_max_frequency: float = 0.1
    found_threshold: float = 0.9  # MCS against another run of the sweep that counts as "found again"
    # the held-out token set
    n_tokens: int = 100_000
    # examples
    n_top_examples: int = 10
    n_bins: int = 10  # equal-width bins of (0, max activation] for the uniform examples
    per_bin: int = 2  # uniform examples per bin
    # the causal views (ablated text, direction ablation per example) are shown for these examples:
    causal_top: int = 1  # the top examples, from the highest
    causal_uniform: int = 3  # uniform examples from bins spread over the occupied ones
    histogram_bins: int = 20  # bins of each feature's activation histogram
    # context dependence: each top and uniform example's activation on its token alone (BOS + token)
    context_dependence: bool = True
    # steered continuations on each page (saesweep.steering): {prompts, strength, mode, max_new_tokens,
    # temperature}; none while prompts is empty
    steering: Mapping | None = None
    # logit lens
    logit_lens_k: int = 10  # top and bottom tokens shown
    use_ln_final: bool = True  # multiply the direction by the final LayerNorm scale before W_U
    outlier_mads: float = 5.0  # unembedding norms this many scaled MADs from the median are outliers
    exclude_tokens: tuple[int, ...] | None = None  # replaces the automatic outlier list when given
    # direction ablation
    direction_contexts: int = 32  # random firing contexts per feature for the dataset-wide effect
    direction_min_count: int = 3  # a next token must occur this often to be ranked
    direction_k: int = 10  # tokens listed per feature
    # compute
    seed: int = 0
    batch_contexts: int = 128
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.features is not None:
            object.__setattr__(self, "features", _int_tuple("features", self.features))
        if self.exclude_tokens is not None:
            object.__setattr__(self, "exclude_tokens", _int_tuple("exclude_tokens", self.exclude_tokens))
        if self.selection is not None and self.selection not in SELECTIONS:
            raise ConfigError(f"report.selection={self.selection!r} is unknown; allowed: {', '.join(SELECTIONS)}")
        if self.selection == "explicit" and not self.features:
            raise ConfigError("report.selection=explicit needs feature ids: report.features=[12,345]")
        for key in ("top_n", "n_tokens", "n_bins", "histogram_bins", "logit_lens_k", "direction_k", "batch_contexts"):
            _require(key, getattr(self, key), 1)
        for key in ("n_top_examples", "per_bin", "causal_top", "causal_uniform", "direction_contexts", "direction_min_count"):
            _require(key, getattr(self, key), 0)
        if not -1.0 <= self.found_threshold <= 1.0:
            raise ConfigError(f"report.found_threshold={self.found_threshold} must lie in [-1, 1] (a cosine)")
        if not 0 <= self.alive_min_frequency < self.alive_max_frequency <= 1:
            raise ConfigError(
                f"report.alive_min_frequency={self.alive_min_frequency} and alive_max_frequency={self.alive_max_frequency} "
                "must satisfy 0 ≤ min < max ≤ 1 (fractions of tokens)"
            )
        object.__setattr__(self, "steering", _steering_section(self.steering))
        if not self.outlier_mads > 0:
            raise ConfigError(f"report.outlier_mads={self.outlier_mads} must be > 0")

    def resolved_selection(self, in_sweep: bool) -> str:
        """The selection in force: the one set, else explicit ids when given, else the features found again
        in the sweep when the run is compared with one, else a random sample of alive features."""
        if self.selection is not None:
            return self.selection
        return "explicit" if self.features else "found_again" if in_sweep else "random"

    @classmethod
    def from_config(cls, section: Mapping) -> ReportSettings:
        """From the `report:` config section (a dict or DictConfig); the app's own keys are ignored."""
        values = {k: v for k, v in dict(section).items() if k not in APP_KEYS}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown report settings {unknown}; allowed: {sorted(known | set(APP_KEYS))}")
        return cls(**values)


_STEERING_KEYS = ("prompts", "strength", "mode", "max_new_tokens", "temperature")


def _steering_section(section: Mapping | None) -> dict | None:
    """report.steering as a plain dict, None when it has no prompts; checked as steer.py checks it."""
    from saesweep.steering import SteeringSettings

    if not section or not section.get("prompts"):
        return None
    section = dict(section)
    unknown = sorted(set(section) - set(_STEERING_KEYS))
    if unknown:
        raise ConfigError(f"unknown report.steering settings {unknown}; allowed: {list(_STEERING_KEYS)}")
    try:
        checked = SteeringSettings(feature=0, **{k: (tuple(v) if k == "prompts" and not isinstance(v, str) else v)
                                                 for k, v in section.items()})
    except ConfigError as e:
        raise ConfigError(f"report.steering: {e}") from None
    return {k: getattr(checked, k) for k in section} | {"prompts": list(checked.prompts)}


def _int_tuple(key: str, values) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        values = (values,)
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"report.{key} must be a list of integer ids; {v!r} is not one")
        out.append(v)
    return tuple(out)


def _require(key: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"report.{key}={value!r} must be an integer ≥ {minimum}")
