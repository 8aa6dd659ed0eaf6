"""Dictionaries others released, read as saesweep SAEs: EleutherAI sparsify directories (cfg.json +
sae.safetensors with `encoder.weight`) and dictionary_learning directories (ae.pt + config.json).
SAELens directories need no conversion: saesweep's run directories use SAELens's own format.

Each reader returns (cfg, tensors): a cfg.json-like dict (SAELens architecture name, d_in, d_sae, k,
hook point where known) and tensors under saesweep's names, or None when the directory is not its format.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from saesweep.errors import CheckpointError


def read_foreign(directory: Path, load_pickle) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The dictionary of `directory` in one of the foreign formats, or None. `load_pickle(path)` reads a
    pickle weights file (and refuses it without trust_pickle)."""
    return _read_sparsify(directory) or _read_dictionary_learning(directory, load_pickle)


def _json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _read_sparsify(directory: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    cfg = _json(directory / "cfg.json")
    weights = directory / "sae.safetensors"
    if cfg is None or "architecture" in cfg or "k" not in cfg or "d_in" not in cfg or not weights.is_file():
        return None
    tensors = load_file(weights)
    if "encoder.weight" not in tensors:
        return None
    for key, allowed in (("transcode", False), ("skip_connection", False), ("activation", "topk")):
        if cfg.get(key, allowed) != allowed:
            raise CheckpointError(f"{directory / 'cfg.json'}: sparsify {key}={cfg[key]!r} is not supported; allowed: {allowed!r}")
    d_in = int(cfg["d_in"])
    d_sae = int(cfg.get("num_latents") or cfg.get("expansion_factor", 32) * d_in)
    expected = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if found != expected:
        raise CheckpointError(f"{weights} (sparsify, d_in={d_in}, {d_sae} latents): expected tensors {expected}, found {found}")
    converted = {"W_enc": tensors["encoder.weight"].T.float().contiguous(), "b_enc": tensors["encoder.bias"].float(),
                 "W_dec": tensors["W_dec"].float(), "b_dec": tensors["b_dec"].float()}
    # sparsify names a dictionary's directory after its hook point (e.g. layers.2)
    return {"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": int(cfg["k"]), "hook_point": directory.name,
            "source_format": "sparsify"}, converted


# dictionary_learning classes saesweep can read, and their SAELens architecture names
_DICTIONARY_LEARNING = {"AutoEncoder": "standard", "AutoEncoderTopK": "topk"}


def _read_dictionary_learning(directory: Path, load_pickle) -> tuple[dict, dict[str, torch.Tensor]] | None:
    cfg = _json(directory / "config.json")
    weights = directory / "ae.pt"
    if cfg is None or not weights.is_file() or not isinstance(cfg.get("trainer"), dict):
        return None
    trainer = cfg["trainer"]
    dict_class = trainer.get("dict_class")
    if dict_class not in _DICTIONARY_LEARNING:
        raise CheckpointError(
            f"{directory / 'config.json'}: dictionary_learning dict_class={dict_class!r} is not supported; "
            f"allowed: {sorted(_DICTIONARY_LEARNING)}"
        )
    state = load_pickle(weights)
    bias_name = "bias" if dict_class == "AutoEncoder" else "b_dec"
    needed = ("encoder.weight", "encoder.bias", "decoder.weight", bias_name)
    if any(name not in state for name in needed):
        raise CheckpointError(f"{weights} ({dict_class}): expected tensors {list(needed)}, found {sorted(state)}")
    d_sae, d_in = state["encoder.weight"].shape
    converted = {"W_enc": state["encoder.weight"].T.float().contiguous(), "b_enc": state["encoder.bias"].float(),
                 "W_dec": state["decoder.weight"].T.float().contiguous(), "b_dec": state[bias_name].float()}
    described = {"architecture": _DICTIONARY_LEARNING[dict_class], "d_in": int(d_in), "d_sae": int(d_sae),
                 "model_name": trainer.get("lm_name"), "source_format": "dictionary_learning"}
    if dict_class == "AutoEncoderTopK":
        described["k"] = int(state["k"]) if "k" in state else int(trainer["k"])
    return described, converted
