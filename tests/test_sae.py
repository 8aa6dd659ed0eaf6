import torch

from saesweep.sae import ReluSae, geometric_median


def test_decoder_rows_start_unit_norm_and_encoder_is_transpose():
    sae = ReluSae(16, 64)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)


def test_forward_is_relu_of_centred_input_then_linear_decode():
    torch.manual_seed(0)
    sae = ReluSae(8, 16)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(5, 8)
    out = sae(x)
    expected_f = torch.clamp((x - sae.b_dec) @ sae.W_enc + sae.b_enc, min=0)
    torch.testing.assert_close(out.feature_acts, expected_f)
    torch.testing.assert_close(out.x_hat, expected_f @ sae.W_dec + sae.b_dec)
    assert (out.feature_acts == 0).any() and (out.feature_acts > 0).any()


def test_parallel_gradient_removed_and_renormalised_step_keeps_unit_rows():
    torch.manual_seed(0)
    sae = ReluSae(8, 32)
    loss = sae(torch.randn(64, 8)).x_hat.pow(2).sum() + sae.W_dec.sum()
    loss.backward()
    sae.remove_parallel_decoder_grad()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    assert (parallel.abs() / sae.W_dec.grad.norm(dim=1)).max() < 1e-5
    torch.optim.SGD(sae.parameters(), lr=0.5).step()
    assert (sae.W_dec.norm(dim=1) - 1).abs().max() > 1e-4  # the step moved rows off the sphere
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


def test_rescaled_sae_on_raw_inputs_equals_normalised_sae_times_scale():
    torch.manual_seed(0)
    sae = ReluSae(8, 16)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.3)
    scale = 7.5
    x_raw = torch.randn(10, 8) * scale
    normalised = sae(x_raw / scale)
    raw_sae = sae.rescaled(scale)
    raw = raw_sae(x_raw)
    torch.testing.assert_close(raw.x_hat, normalised.x_hat * scale, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(raw.feature_acts, normalised.feature_acts * scale, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(raw_sae.W_dec.norm(dim=1), torch.ones(16))


def test_geometric_median_resists_outliers_where_mean_does_not():
    torch.manual_seed(0)
    points = torch.cat([torch.randn(95, 3) * 0.1, torch.full((5, 3), 100.0)])
    median = geometric_median(points)
    assert median.norm() < 0.2
    assert points.mean(dim=0).norm() > 8
