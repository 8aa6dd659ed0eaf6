"""Steering with a feature: generate with its decoder direction added at the hook, or with the feature
clamped to a value, next to the unsteered continuation from the same seed.

`steer(run_dir, feature, strength, prompts)` (also `saesweep.steer`, and `python steer.py`) loads the
run's model and dictionary; `steer_with(...)` works on loaded ones (the feature report uses it).

- mode=add: x ← x + strength · max_activation · W_dec[feature] at every position of the hook;
- mode=clamp: x ← x + (strength · max_activation − f(x)) · W_dec[feature], so the feature reads
  strength · max_activation everywhere (strength 0 ablates it).
`max_activation` is the feature's largest activation on the held-out tokens, so strength is in units
of the feature's own range. Greedy and sampled decoding (temperature, one seed shared by the steered
and unsteered runs); the logit shift is the change of log p of every token at the first generated
position, its largest rises and falls listed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from saesweep.config import check_writable_dir
from saesweep.errors import CheckpointError, ConfigError
from saesweep.sae import Sae
from saesweep.tokens import ReadableTokens

MODES = ("add", "clamp")
DECODINGS = ("greedy", "sampled")


@dataclass(frozen=True)
class SteeringSettings:
    feature: int
    strength: float
    prompts: tuple[str, ...]
    mode: str = "add"
    max_new_tokens: int = 20
    temperature: float = 1.0  # of the sampled continuation
    seed: int = 0
    logit_shift_k: int = 10  # tokens listed as rising and as falling most

    def __post_init__(self) -> None:
        if isinstance(self.feature, bool) or not isinstance(self.feature, int) or self.feature < 0:
            raise ConfigError(f"feature={self.feature!r} must be a feature index ≥ 0")
        if isinstance(self.strength, bool) or not isinstance(self.strength, int | float) or not math.isfinite(self.strength):
            raise ConfigError(f"strength={self.strength!r} must be a finite number (a multiple of the feature's max activation)")
        prompts = (self.prompts,) if isinstance(self.prompts, str) else tuple(self.prompts or ())
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ConfigError(f"prompts={list(prompts)!r} must be a non-empty list of non-empty texts, e.g. prompts='[\"The cat\"]'")
        object.__setattr__(self, "prompts", prompts)
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is unknown; allowed: {', '.join(MODES)}")
        for key, minimum in (("max_new_tokens", 1), ("logit_shift_k", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{key}={value!r} must be an integer ≥ {minimum}")
        if not (isinstance(self.temperature, int | float) and self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature={self.temperature!r} must be a finite number > 0")


@dataclass(frozen=True)
class Continuation:
    prompt: str
    decoding: str  # greedy | sampled
    unsteered: list[str]  # the generated tokens, readable
    steered: list[str]


@dataclass(frozen=True)
class TokenShift:
    id: int
    token: str
    delta_logprob: float


@dataclass(frozen=True)
class SteeringResult:
    feature: int
    mode: str
    strength: float
    max_activation: float
    hook_point: str
    continuations: list[Continuation]
    # per prompt: the tokens whose log-prob at the first generated position rises / falls most
    logit_shift: list[dict[str, object]] = field(default_factory=list)
    run_dir: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def check_feature(feature: int, d_sae: int) -> None:
    if not 0 <= feature < d_sae:
        raise ConfigError(f"feature={feature} is out of range: this dictionary has features 0..{d_sae - 1}")


def _steering_hook(sae: Sae, settings: SteeringSettings, max_activation: float):
    direction = sae.W_dec[settings.feature].detach()
    value = settings.strength * max_activation
    feature = torch.tensor([settings.feature], device=direction.device)

    def add(act, hook):
        return (act.float() + value * direction).to(act.dtype)

    def clamp(act, hook):
        current = sae.encode_features(act.float(), feature)[..., 0]
        return (act.float() + (value - current)[..., None] * direction).to(act.dtype)

    return add if settings.mode == "add" else clamp


@torch.no_grad()
def _generate(model, prompt: torch.Tensor, settings: SteeringSettings, fwd_hooks: list, sampled: bool):
    """Token ids generated after `prompt` [1, n], and the log-probs of the first generated position."""
    generator = torch.Generator(device=prompt.device).manual_seed(settings.seed) if sampled else None
    tokens, first = prompt, None
    for _ in range(settings.max_new_tokens):
        logits = model.run_with_hooks(tokens, return_type="logits", fwd_hooks=fwd_hooks)[0, -1].float()
        if first is None:
            first = logits.log_softmax(-1)
        if sampled:
            probs = (logits / settings.temperature).softmax(-1)
            next_token = torch.multinomial(probs, 1, generator=generator)
        else:
            next_token = logits.argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token[None]], dim=1)
    return tokens[0, prompt.shape[1] :].tolist(), first


def steer_with(
    model, sae: Sae, hook_point: str, max_activation: float, settings: SteeringSettings, bos: int | None
) -> tuple[list[Continuation], list[dict[str, object]]]:
    """Continuations of each prompt, unsteered and steered, greedy and sampled; and the logit shift."""
    check_feature(settings.feature, sae.d_sae)
    device = sae.W_dec.device
    text = ReadableTokens(model.tokenizer)
    hooks = [(hook_point, _steering_hook(sae, settings, max_activation))]
    prompt_ids = [([] if bos is None else [bos]) + model.tokenizer(p, add_special_tokens=False)["input_ids"]
                  for p in settings.prompts]
    check_prompt_lengths(settings, [len(ids) for ids in prompt_ids], model.cfg.n_ctx)
    continuations, shifts = [], []
    for prompt, ids in zip(settings.prompts, prompt_ids):
        tokens = torch.tensor([ids], device=device)
        for decoding in DECODINGS:
            sampled = decoding == "sampled"
            plain, plain_first = _generate(model, tokens, settings, [], sampled)
            steered, steered_first = _generate(model, tokens, settings, hooks, sampled)
            continuations.append(Continuation(prompt, decoding, text.sequence(plain), text.sequence(steered)))
        # the first position's log-probs are the same whatever the decoding: the prompt's own
        delta = (steered_first - plain_first).cpu()
        shifts.append({
            "prompt": prompt,
            "rises": _shifts(delta, delta.topk(settings.logit_shift_k).indices, text),
            "falls": _shifts(delta, (-delta).topk(settings.logit_shift_k).indices, text),
        })
    return continuations, shifts


def check_prompt_lengths(settings: SteeringSettings, lengths: list[int], n_ctx: int) -> None:
    """Every prompt and its continuation fit in the model's context (beyond it, positions the model
    never saw would be generated, slowly and meaninglessly)."""
    room = n_ctx - settings.max_new_tokens
    for prompt, length in zip(settings.prompts, lengths):
        if length > room:
            raise ConfigError(
                f"prompt {prompt[:40]!r}{'...' if len(prompt) > 40 else ''} is {length} tokens (BOS included); with "
                f"max_new_tokens={settings.max_new_tokens} it needs {length + settings.max_new_tokens} positions, more "
                f"than the model's context n_ctx={n_ctx}; allowed: prompts of at most {max(room, 0)} tokens, or a "
                "lower max_new_tokens"
            )


def _shifts(delta: torch.Tensor, ids: torch.Tensor, text: ReadableTokens) -> list[TokenShift]:
    return [TokenShift(int(i), t, float(f"{float(delta[i]):.4g}")) for i, t in zip(ids, text.single(ids))]


def steer(
    run_dir: str | Path,
    feature: int,
    strength: float,
    prompts: list[str] | tuple[str, ...],
    *,
    mode: str = "add",
    max_new_tokens: int = 20,
    temperature: float = 1.0,
    seed: int = 0,
    logit_shift_k: int = 10,
    device: str = "auto",
    model=None,
) -> SteeringResult:
    """Steer the model of a saesweep run with one of its features (see the module docstring)."""
    from saesweep.data import bos_token_id
    from saesweep.lm import load_model, resolve_device, validate_hook_point
    from saesweep.rundir import CFG_FILE, load_feature_stats, load_run_config, load_sae, run_setting

    settings = SteeringSettings(feature, strength, tuple(prompts) if not isinstance(prompts, str) else prompts,
                                mode, max_new_tokens, temperature, seed, logit_shift_k)
    run_dir = Path(run_dir)
    if not (run_dir / CFG_FILE).is_file():
        raise CheckpointError(f"run_dir={str(run_dir)!r} is not a saesweep run directory (no {CFG_FILE} in it)")
    run_cfg = load_run_config(run_dir)
    torch_device = resolve_device(device)
    sae = load_sae(run_dir, torch_device).eval()
    check_feature(settings.feature, sae.d_sae)
    max_activation = load_feature_stats(run_dir).get("max_activation")
    if max_activation is None:
        raise CheckpointError(f"{run_dir} has no per-feature max_activation in its feature_stats.safetensors")
    if model is None:
        model = load_model(run_setting(run_cfg, "model_name"), run_setting(run_cfg, "model_path"), torch_device)
    hook_point = run_setting(run_cfg, "hook_point")
    validate_hook_point(model, hook_point)
    prepend_bos = (run_cfg.get("dataset") or {}).get("prepend_bos", True)
    bos = bos_token_id(model.tokenizer) if prepend_bos else None
    scale = float(max_activation[settings.feature])
    continuations, shifts = steer_with(model, sae, hook_point, scale, settings, bos)
    return SteeringResult(settings.feature, settings.mode, float(settings.strength), scale, hook_point,
                          continuations, shifts, str(run_dir.resolve()))


STEERING_DIR = "steering"


def result_name(result: SteeringResult) -> str:
    return f"feature_{result.feature}_{result.mode}_{result.strength:g}"


def write_result(result: SteeringResult, out_dir: Path) -> tuple[Path, Path]:
    """<out_dir>/<feature_N_mode_strength>.json and .html."""
    from saesweep.io import atomic_write_bytes, atomic_write_json
    from saesweep.pages import render_steering_page

    data = result.to_dict()
    json_path = out_dir / f"{result_name(result)}.json"
    html_path = json_path.with_suffix(".html")
    atomic_write_json(json_path, data)
    atomic_write_bytes(html_path, render_steering_page(data).encode())
    return json_path, html_path


def console_text(result: SteeringResult) -> str:
    lines = [f"feature {result.feature}, {result.mode} at strength {result.strength:g} × max activation "
             f"{result.max_activation:.4g}, at {result.hook_point}"]
    for c in result.continuations:
        lines += [f"\n[{c.decoding}] {c.prompt!r}", f"  unsteered: {''.join(c.unsteered)!r}",
                  f"  steered:   {''.join(c.steered)!r}"]
    for shift in result.logit_shift:
        rises = ", ".join(f"{s.token!r} {s.delta_logprob:+.2f}" for s in shift["rises"])
        falls = ", ".join(f"{s.token!r} {s.delta_logprob:+.2f}" for s in shift["falls"])
        lines += [f"\nlog-prob shift at the first generated token of {shift['prompt']!r}:", f"  rises: {rises}",
                  f"  falls: {falls}"]
    return "\n".join(lines)


def log_to_wandb(result: SteeringResult, run_dir: Path, wandb_cfg: dict) -> None:
    """A W&B run (job_type=steering) in RUN/wandb/, in the run's group: the continuations and the logit
    shift as tables."""
    import wandb

    from saesweep.rundir import recorded_wandb_group

    run = wandb.init(project=wandb_cfg.get("project"), entity=wandb_cfg.get("entity"), mode=wandb_cfg.get("mode", "offline"),
                     dir=str(run_dir), group=recorded_wandb_group([run_dir]),
                     job_type="steering", name=f"{run_dir.name}-{result_name(result)}",
                     config={k: v for k, v in result.to_dict().items() if k not in ("continuations", "logit_shift")})
    try:
        continuations = wandb.Table(columns=["prompt", "decoding", "unsteered", "steered"])
        for c in result.continuations:
            continuations.add_data(c.prompt, c.decoding, "".join(c.unsteered), "".join(c.steered))
        shifts = wandb.Table(columns=["prompt", "direction", "token", "delta_logprob"])
        for shift in result.logit_shift:
            for direction in ("rises", "falls"):
                for s in shift[direction]:
                    shifts.add_data(shift["prompt"], direction, s.token, s.delta_logprob)
        run.log({"steering/continuations": continuations, "steering/logit_shift": shifts})
    finally:
        run.finish()


def steer_from_config(cfg) -> SteeringResult:
    """`python steer.py run_dir=RUN feature=N strength=S prompts=[...]` (conf/steer.yaml)."""
    from omegaconf import OmegaConf

    for key in ("run_dir", "feature", "prompts"):
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{key} is required: python steer.py run_dir=RUN feature=N strength=S prompts='[\"The cat\"]'")
    prompts = OmegaConf.to_container(cfg.prompts) if OmegaConf.is_list(cfg.prompts) else cfg.prompts
    run_dir = Path(cfg.run_dir)
    # before the model loads and generates: the results must have somewhere to go
    check_writable_dir("run_dir (its steering/ folder)", run_dir / STEERING_DIR)
    if cfg.wandb.enabled:
        check_writable_dir("run_dir (W&B's folder; or wandb.enabled=false)", run_dir)
    result = steer(cfg.run_dir, cfg.feature, cfg.strength, prompts, mode=cfg.mode, max_new_tokens=cfg.max_new_tokens,
                   temperature=cfg.temperature, seed=cfg.seed, logit_shift_k=cfg.logit_shift_k, device=cfg.device)
    print(console_text(result), flush=True)  # printed first: a failed write loses nothing
    json_path, html_path = write_result(result, run_dir / STEERING_DIR)
    print(f"\nwrote {json_path} and {html_path}")
    if cfg.wandb.enabled:
        log_to_wandb(result, run_dir, OmegaConf.to_container(cfg.wandb))
    return result
