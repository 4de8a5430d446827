import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ilvae.metrics import EpsilonCollapse


def _posterior(n: int = 200, seed: int = 0) -> Normal:
    """Dimension 0 equals the prior; 1 is slightly off everywhere; 2 is informative for a
    fraction of the examples only; 3 is informative everywhere."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.zeros(n, 4)
    scale = torch.ones(n, 4)
    loc[:, 1] = 0.05 * torch.randn(n, generator=g)
    informative = torch.rand(n, generator=g) < 0.03
    loc[informative, 2] = 1.5
    loc[:, 3] = 2.0 * torch.randn(n, generator=g)
    scale[:, 3] = 0.2
    return Normal(loc, scale)


def _brute_force(posterior: Normal, eps: float, delta: float, prior_scale: float):
    n, m = posterior.loc.shape
    prior = Normal(torch.tensor(0.0), torch.tensor(prior_scale))
    mean_kl = [0.0] * m
    below = [0] * m
    for row in range(n):
        for i in range(m):
            kl = float(kl_divergence(Normal(posterior.loc[row, i], posterior.scale[row, i]),
                                     prior))
            mean_kl[i] += kl / n
            below[i] += kl < eps
    probability = [b / n for b in below]
    return (sum(k < eps for k in mean_kl), sum(p >= 1 - delta for p in probability),
            probability)


@pytest.mark.parametrize("eps,delta,prior_scale", [(0.01, 0.01, 1.0), (0.01, 0.1, 1.0),
                                                   (0.05, 0.0, 1.0), (0.1, 0.05, 1.3)])
def test_counts_and_probabilities_match_a_brute_force_loop(eps, delta, prior_scale):
    posterior = _posterior()
    metric = EpsilonCollapse(eps=eps, delta=delta, prior_scale=prior_scale)
    metric.update(posterior)
    out = metric.compute()
    collapsed, delta_collapsed, probability = _brute_force(posterior, eps, delta, prior_scale)
    assert int(out["epsilon_collapsed"]) == collapsed
    assert int(out["epsilon_delta_collapsed"]) == delta_collapsed
    torch.testing.assert_close(out["collapse_probability"],
                               torch.tensor(probability, dtype=torch.float64))


def test_the_two_forms_differ_on_a_partly_informative_dimension():
    # Dimension 2 carries information for ~3% of x: collapsed by its mean KL < 0.05 but not
    # (0.05, 0.01)-collapsed in probability; (0.05, 0.1)-collapsed again.
    posterior = _posterior()
    strict = EpsilonCollapse(eps=0.05, delta=0.01)
    loose = EpsilonCollapse(eps=0.05, delta=0.1)
    for metric in (strict, loose):
        metric.update(posterior)
    probability = strict.compute()["collapse_probability"]
    assert 0.9 < float(probability[2]) < 0.99
    assert int(strict.compute()["epsilon_collapsed"]) == 3
    assert int(strict.compute()["epsilon_delta_collapsed"]) == 2
    assert int(loose.compute()["epsilon_delta_collapsed"]) == 3


def test_updates_accumulate_like_one_update_on_all_data():
    posterior = _posterior(seed=1)
    whole, parts = EpsilonCollapse(eps=0.05), EpsilonCollapse(eps=0.05)
    whole.update(posterior)
    for idx in torch.tensor_split(torch.arange(200), [50, 51, 120]):
        parts.update(Normal(posterior.loc[idx], posterior.scale[idx]))
    for key, value in whole.compute().items():
        torch.testing.assert_close(parts.compute()[key], value)


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="eps"):
        EpsilonCollapse(eps=0.0)
    with pytest.raises(ValueError, match="delta"):
        EpsilonCollapse(delta=1.0)
