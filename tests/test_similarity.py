"""Activation similarity between dictionaries: constructed cases with known answers."""

import pytest
import torch

from saesweep.errors import ConfigError
from saesweep.sae import ReluSae
from saesweep.similarity import activation_similarity, agreement_with_decoder_matching, check_same_tokenizer


def batches(x: torch.Tensor, size: int = 500):
    return [(chunk, chunk) for chunk in x.split(size)]


def test_a_permuted_copy_correlates_one_to_one_and_a_random_dictionary_at_chance():
    torch.manual_seed(0)
    x = torch.randn(4000, 16)
    a = ReluSae(16, 48, l1_coef=1.0)
    with torch.no_grad():
        a.W_enc.normal_()
    order = torch.randperm(48)
    b = ReluSae(16, 48)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        tensor = getattr(a, name).detach()
        getattr(b, name).data.copy_(tensor[:, order] if name == "W_enc" else tensor[order] if name in ("b_enc", "W_dec") else tensor)
    same = activation_similarity(a, b, batches(x))
    assert same.n_tokens == 4000
    torch.testing.assert_close(same.matched, torch.ones(48), atol=1e-4, rtol=0)
    assert torch.equal(order[same.matched_index], torch.arange(48))
    assert same.share_above(0.9) == (1.0, 0.0)  # shuffled tokens: nothing correlates
    assert agreement_with_decoder_matching(same, torch.argsort(order)) == 1.0

    unrelated = ReluSae(16, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        unrelated.W_enc.normal_(generator=torch.Generator().manual_seed(6))
    other = activation_similarity(a, unrelated, batches(x))
    # random features of the same inputs still correlate somewhat; well below a copy, above shuffled tokens
    assert other.matched.mean() < 0.6 and other.matched_chance.mean() < 0.1
    assert other.matched.mean() > other.matched_chance.mean()


def test_dead_features_correlate_zero_not_nan():
    a = ReluSae(8, 16)
    with torch.no_grad():
        a.b_enc[:4] = -100.0  # never fire
    result = activation_similarity(a, a, batches(torch.randn(1000, 8)))
    assert torch.isfinite(result.correlation).all() and (result.best[:4] == 0).all()


def test_different_tokenizers_are_refused_in_one_line(tiny_model):
    same = tiny_model.tokenizer
    check_same_tokenizer("a", same, "b", same)
    other = _shrunk(same)
    with pytest.raises(ConfigError, match=r"a and b have different tokenizers \(\d+ and \d+ tokens, \d+ entries differ\)"):
        check_same_tokenizer("a", same, "b", other)


class _shrunk:
    """A tokenizer whose vocabulary lacks one token of another's."""

    def __init__(self, tokenizer):
        self.vocab = dict(list(tokenizer.get_vocab().items())[:-1])

    def get_vocab(self):
        return self.vocab
