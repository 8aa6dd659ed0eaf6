"""The language model: loading through TransformerLens's TransformerBridge, and hook-point checks."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import torch

from saesweep.errors import ConfigError, ModelLoadError
from saesweep.hub import require_hub

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(name: str | None, path: str | None, device: torch.device, dtype: str = "float32"):
    """A TransformerBridge from a local Hugging Face directory (`path`) or a hub name (`name`)."""
    from transformer_lens.model_bridge import TransformerBridge

    if dtype not in _DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is not supported; allowed: {sorted(_DTYPES)}")
    if path:
        local = Path(path)
        if not (local / "config.json").is_file():
            raise ModelLoadError(
                f"model.path={path!r} is not a Hugging Face model directory (no config.json in it)"
            )
        source = str(local.resolve())
    elif name:
        check_model_name(name)
        require_hub(
            f"model {name!r}",
            hint="point model.path at a local Hugging Face model directory: python train.py model.path=DIR",
            error=ModelLoadError,
        )
        source = name
    else:
        raise ConfigError("no model given: set model.name (a hub name) or model.path (a local directory)")
    try:
        model = TransformerBridge.boot_transformers(source, device=device, dtype=_DTYPES[dtype])
    except (OSError, ValueError, KeyError) as e:
        # transformers raises OSError for missing/unreachable repos, ValueError/KeyError for
        # architectures the bridge does not support.
        raise ModelLoadError(
            f"could not load model {source!r}: {e}. A local model works offline: model.path=DIR"
        ) from None
    model.eval()
    model.requires_grad_(False)
    return model


def check_model_name(name: str) -> None:
    """A hub name must be one TransformerLens supports (the bridge's registry or its official names)."""
    # a module in transformer_lens 3.9, a package re-exporting it in 4.x: this path works in both
    from transformer_lens.model_bridge.sources.transformers import list_supported_models
    from transformer_lens.supported_models import OFFICIAL_MODEL_NAMES

    known = set(list_supported_models()) | set(OFFICIAL_MODEL_NAMES)
    if not known or name in known:  # an empty registry (it failed to load) must not block every name
        return
    close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ConfigError(
        f"model.name={name!r} is not a model TransformerLens supports{hint}. "
        "For any other Hugging Face model of a supported architecture, download it and set model.path=DIR"
    )


def hook_point_for(layer: int, hook: str, hook_point: str | None) -> str:
    """The full hook name: `hook_point` when given, else `blocks.{layer}.hook_{hook}`."""
    return hook_point or f"blocks.{layer}.hook_{hook}"


def validate_hook_point(model, hook_point: str) -> None:
    n_layers = model.cfg.n_layers
    match = _BLOCK_HOOK.match(hook_point)
    if match and int(match.group(1)) >= n_layers:
        raise ConfigError(
            f"layer {match.group(1)} (hook point {hook_point!r}) is out of range: "
            f"the model has layers 0..{n_layers - 1}"
        )
    if hook_point not in model.hook_dict:
        close = difflib.get_close_matches(hook_point, list(model.hook_dict), n=6, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ConfigError(f"hook point {hook_point!r} is not a hook of this model{hint}")


def stop_layer_after(hook_point: str) -> int | None:
    """The `stop_at_layer` that still computes `hook_point`: the block after it, or None (full pass)."""
    match = _BLOCK_HOOK.match(hook_point)
    return int(match.group(1)) + 1 if match else None
