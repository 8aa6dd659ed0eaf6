"""Property-based tests: whatever the bad input (config values, bytes on disk), the result is the
project's own error with a message, never another exception or a hang."""

import json
import tempfile
import zlib
from functools import cache
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from safetensors.torch import save as safetensors_bytes

from conftest import REPO
from saesweep import load_sae
from saesweep.config import check_config, check_with_model
from saesweep.errors import CheckpointError, ConfigError
from saesweep.rundir import load_run_config
from saesweep.sae import ReluSae
from saesweep.store import StoreCorruptError, read_shard

FAST = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

# what a mistyped command-line override can turn a value into
any_value = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=8),
)
CHECKED_KEYS = [
    "dict_ratio", "l1_coef", "ctx_len", "n_tokens", "eval.n_tokens", "train.batch_size", "eval.batch_contexts",
    "harvest_batch_contexts", "train.checkpoint_every_n_steps", "train.max_bad_steps", "sae.architecture",
    "sae.recipe.lr", "sae.recipe.lr_warmup_steps", "train.lr_warmup_max_fraction", "sae.recipe.lr_decay_fraction",
    "sae.recipe.grad_clip_norm",
]


@cache
def default_config_yaml() -> str:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_yaml(compose("config"))


@FAST
@given(st.dictionaries(st.sampled_from(CHECKED_KEYS), any_value, min_size=1, max_size=4))
def test_any_config_values_pass_or_fail_with_a_config_error_naming_the_key(changes):
    cfg = OmegaConf.create(default_config_yaml())
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    try:
        check_config(cfg)
        check_with_model(cfg, n_ctx=64, d_in=32)
    except ConfigError as e:
        message = str(e)
        assert any(key.split(".")[-1] in message for key in CHECKED_KEYS), message
        assert "=" in message  # key=value
    else:
        assert cfg.dict_ratio > 0 and cfg.l1_coef >= 0 and 2 <= cfg.ctx_len <= 64


def _valid_sae_bytes() -> bytes:
    torch.manual_seed(0)
    return safetensors_bytes({k: v.contiguous() for k, v in ReluSae(4, 8).tensors().items()})


def _damaged(valid: bytes):
    return st.one_of(
        st.binary(max_size=300),
        st.integers(0, len(valid) - 1).map(lambda n: valid[:n]),
        st.tuples(st.integers(0, len(valid) - 1), st.integers(1, 255)).map(
            lambda flip: valid[: flip[0]] + bytes([valid[flip[0]] ^ flip[1]]) + valid[flip[0] + 1 :]
        ),
    )


@FAST
@given(data=_damaged(_valid_sae_bytes()), cfg_bytes=st.one_of(st.none(), st.binary(max_size=100)))
def test_damaged_run_directories_load_or_raise_a_checkpoint_error(data, cfg_bytes):
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        (run / "sae_weights.safetensors").write_bytes(data)
        if cfg_bytes is None:
            (run / "cfg.json").write_text(json.dumps({"architecture": "relu_l1", "d_in": 4, "d_sae": 8}))
        else:
            (run / "cfg.json").write_bytes(cfg_bytes)
        try:
            sae = load_sae(run)
        except CheckpointError as e:
            assert str(e)
        else:  # a flipped bit inside a weight still loads: the shapes are right
            assert sae.W_dec.shape == (8, 4)


@FAST
@given(st.binary(max_size=200))
def test_random_pickle_bytes_are_refused_unread_without_the_trust_flag(data):
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        (run / "cfg.json").write_text(json.dumps({"architecture": "relu_l1", "d_in": 4, "d_sae": 8}))
        (run / "sae.pt").write_bytes(data)
        try:
            load_sae(run)
        except CheckpointError as e:
            assert "trust_pickle=True" in str(e)
        else:
            raise AssertionError("a pickle file was loaded without trust_pickle")


@FAST
@given(st.binary(max_size=200))
def test_random_cfg_json_is_a_checkpoint_error_or_a_dict(data):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cfg.json").write_bytes(data)
        try:
            assert isinstance(load_run_config(Path(tmp)), dict)
        except CheckpointError as e:
            assert "cfg.json" in str(e)


def _valid_shard_bytes() -> bytes:
    return safetensors_bytes({"activations": torch.arange(24, dtype=torch.float32).reshape(6, 4)})


@FAST
@given(_damaged(_valid_shard_bytes()))
def test_damaged_shards_with_a_matching_checksum_read_or_raise_store_corrupt(data):
    """The manifest entry is made to match the bytes, so the safetensors parser itself is exercised."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "shard_00000.safetensors").write_bytes(data)
        entry = {"file": "shard_00000.safetensors", "bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}
        try:
            rows = read_shard(Path(tmp), entry)
        except StoreCorruptError as e:
            assert "shard_00000.safetensors" in str(e)
        else:
            assert isinstance(rows, torch.Tensor)
