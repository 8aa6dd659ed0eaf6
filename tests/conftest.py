"""Shared fixtures: a random tiny GPT-NeoX (the Pythia architecture) with its own BPE tokenizer,
built in the test session, and a small synthetic corpus; plus the offline reference data."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
REFERENCE_MODEL = REFERENCE / "model"
REFERENCE_CORPUS = REFERENCE / "corpus" / "train.jsonl.gz"

_WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "fast", "slow", "red", "blue", "green", "house", "tree", "river", "stone", "code", "def", "return", "import", "class", "print", "value", "list", "dict", "und", "der", "die", "das", "ist", "nicht", "ein", "eine", "Katze", "Hund"]


def synthetic_documents(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(40, 120))) + "." for _ in range(n_docs)]


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_documents(300)))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_model")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        synthetic_documents(200, seed=1),
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    ).save_pretrained(out)
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, rotary_pct=0.25, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=False,
    )
    GPTNeoXForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from saesweep.lm import load_model

    return load_model(None, str(tiny_model_dir), torch.device("cpu"))


def requires_reference():
    return pytest.mark.skipif(not REFERENCE_MODEL.is_dir(), reason=f"no reference data at {REFERENCE}")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "interop: against SAELens itself, in an environment with the bench extra (make test-interop)"
    )
    config.addinivalue_line(
        "markers", "slow: minutes of multi-process runs (make test-slow; CI runs them as a step of their own)"
    )
    config.addinivalue_line(
        "markers", "browser: opens report pages in headless Chromium (make test-browser; skipped without Chromium)"
    )
