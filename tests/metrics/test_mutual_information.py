import math

import pytest
import torch
from torch.distributions import Normal

from ilvae.metrics import KLPerDimension, MutualInformation


def _posterior(n: int, m: int, seed: int) -> Normal:
    g = torch.Generator().manual_seed(seed)
    return Normal(torch.randn(n, m, generator=g), 0.3 + 0.7 * torch.rand(n, m, generator=g))


def _brute_force(posterior: Normal, z: torch.Tensor) -> float:
    """(1/N) Σ_n mean_s [log q(z_ns|x_n) − log (1/N) Σ_j q(z_ns|x_j)], loops over n and j."""
    loc, scale = posterior.loc.double(), posterior.scale.double()
    n = loc.shape[0]
    total = 0.0
    for i in range(n):
        own = Normal(loc[i], scale[i]).log_prob(z[:, i]).sum(-1)
        mixture = torch.stack([Normal(loc[j], scale[j]).log_prob(z[:, i]).sum(-1)
                               for j in range(n)])
        total += float((own - (torch.logsumexp(mixture, 0) - math.log(n))).mean())
    return total / n


def test_posteriors_equal_to_the_prior_give_zero_information_and_zero_kl():
    posterior = Normal(torch.zeros(64, 3), torch.ones(64, 3))
    mi, kl = MutualInformation(), KLPerDimension()
    mi.update(posterior)
    kl.update(posterior)
    assert abs(float(mi.compute())) < 1e-12
    assert float(kl.compute()["kl"]) == 0.0


def test_well_separated_narrow_posteriors_give_log_n_over_the_whole_set():
    # Updated in batches of 10, the aggregate posterior is still that of all 200 examples: a
    # mini-batch mixture would cap the estimate near log 10.
    n = 200
    loc = torch.stack([torch.arange(n) * 10.0, -torch.arange(n) * 7.0], dim=1)
    metric = MutualInformation(num_samples=2)
    for chunk in loc.split(10):
        metric.update(Normal(chunk, torch.full_like(chunk, 0.05)))
    assert float(metric.compute()) == pytest.approx(math.log(n), abs=1e-6)


def test_matches_brute_force_double_loop_on_the_same_draws():
    posterior = _posterior(9, 2, 0)
    metric = MutualInformation(num_samples=5, chunk_size=4, seed=11)
    metric.update(posterior)
    eps = torch.randn(5, 9, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    z = posterior.loc.double() + posterior.scale.double() * eps
    assert float(metric.compute()) == pytest.approx(_brute_force(posterior, z), abs=1e-10)


def test_matches_brute_force_with_independent_draws():
    posterior = _posterior(12, 2, 1)
    metric = MutualInformation(num_samples=3000, chunk_size=4096)
    metric.update(posterior)
    z = posterior.sample((3000,)).double()
    expected = _brute_force(posterior, z)
    assert 0 < expected < math.log(12)
    assert float(metric.compute()) == pytest.approx(expected, abs=0.03)


def test_chunk_size_does_not_change_the_result():
    posterior = _posterior(30, 3, 2)
    values = []
    for chunk_size in (1, 7, 10_000):
        metric = MutualInformation(num_samples=4, chunk_size=chunk_size)
        metric.update(posterior)
        values.append(float(metric.compute()))
    assert values == pytest.approx([values[0]] * 3, abs=1e-12)


def test_updates_accumulate_like_one_update_on_all_data():
    posterior = _posterior(25, 4, 3)
    whole, parts = MutualInformation(num_samples=3), MutualInformation(num_samples=3)
    whole.update(posterior)
    for idx in torch.tensor_split(torch.arange(25), [6, 19]):
        parts.update(Normal(posterior.loc[idx], posterior.scale[idx]))
    assert float(parts.compute()) == pytest.approx(float(whole.compute()), abs=1e-12)
