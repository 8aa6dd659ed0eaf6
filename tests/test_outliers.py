"""Outlier dimensions of the residual stream and features aligned with them."""

import torch

from saesweep.outliers import MagnitudeSums, basis_alignment


def test_a_dimension_far_above_the_rest_is_an_outlier_and_a_feature_along_it_is_aligned():
    torch.manual_seed(0)
    x = torch.randn(5000, 64)
    x[:, 7] *= 20  # one dimension with outlier magnitude
    x[:, 30] *= 12
    sums = MagnitudeSums(64)
    for chunk in x.split(1000):
        sums.update(chunk)
    outliers = sums.outliers()
    assert outliers.dimensions.tolist() == [7, 30]
    assert outliers.mean_magnitude[7] > outliers.threshold > outliers.mean_magnitude[0]

    W_dec = torch.randn(10, 64)
    W_dec[3] = 0.05 * torch.randn(64)
    W_dec[3, 7] = 1.0  # a feature written along dimension 7
    aligned = basis_alignment(W_dec, outliers)
    assert aligned.dimension[3] == 7 and aligned.cos[3] > 0.9 and aligned.on_outlier[3]
    assert aligned.cos[[0, 1, 2]].max() < 0.6


def test_isotropic_activations_have_no_outlier_dimension():
    sums = MagnitudeSums(128)
    sums.update(torch.randn(20000, 128, generator=torch.Generator().manual_seed(0)))
    assert len(sums.outliers().dimensions) == 0
