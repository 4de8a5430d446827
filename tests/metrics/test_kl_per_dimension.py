import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ilvae.metrics import KLPerDimension


def _posterior(n: int, m: int, seed: int) -> Normal:
    g = torch.Generator().manual_seed(seed)
    return Normal(torch.randn(n, m, generator=g), torch.rand(n, m, generator=g) + 0.1)


@pytest.mark.parametrize("prior_scale", [1.0, 2.5])
def test_kl_matches_torch_distributions_closed_form(prior_scale):
    posterior = _posterior(40, 3, 0)
    metric = KLPerDimension(prior_scale=prior_scale)
    metric.update(posterior)
    out = metric.compute()
    prior = Normal(torch.zeros(3), torch.full((3,), prior_scale))
    expected = kl_divergence(posterior, prior).double().mean(0)
    torch.testing.assert_close(out["kl_per_dim"], expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["kl"], expected.sum(), rtol=1e-6, atol=1e-7)
    assert out["kl_per_dim"].shape == (3,) and out["kl"].shape == ()


def test_posterior_equal_to_prior_has_zero_kl():
    metric = KLPerDimension()
    metric.update(Normal(torch.zeros(7, 4), torch.ones(7, 4)))
    assert float(metric.compute()["kl"]) == 0.0


def test_updates_accumulate_like_one_update_on_all_data():
    posterior = _posterior(30, 5, 1)
    whole = KLPerDimension()
    whole.update(posterior)
    parts = KLPerDimension()
    for idx in torch.tensor_split(torch.arange(30), [4, 17]):
        parts.update(Normal(posterior.loc[idx], posterior.scale[idx]))
    for key in ("kl", "kl_per_dim"):
        torch.testing.assert_close(parts.compute()[key], whole.compute()[key])


def test_invalid_prior_scale_is_rejected():
    with pytest.raises(ValueError, match="prior_scale"):
        KLPerDimension(prior_scale=0.0)
