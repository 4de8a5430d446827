"""Likelihoods: log p(x|θ) summed over data dimensions equals torch.distributions, data checks."""

from __future__ import annotations

import pytest
import torch
from torch import distributions as D

from ilvae import likelihoods
from ilvae.likelihoods import Bernoulli, Categorical, Gaussian, GaussianAdaptive, GaussianLearned

B, DIM = 6, 5


@pytest.fixture
def param() -> torch.Tensor:
    return torch.randn(B, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _data(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("binary", [True, False])
def test_bernoulli_log_prob_matches_torch(param: torch.Tensor, binary: bool) -> None:
    x = torch.rand(B, DIM, dtype=torch.float64)
    x = x.round() if binary else x  # grey levels: the continuous relaxation
    got = Bernoulli(DIM).log_prob(x, param)
    want = D.Bernoulli(logits=param, validate_args=False).log_prob(x).sum(-1)
    assert got.shape == (B,)
    torch.testing.assert_close(got, want)


def test_gaussian_log_prob_matches_torch(param: torch.Tensor) -> None:
    x = _data()
    got = Gaussian(DIM, sigma=0.7).log_prob(x, param)
    assert got.shape == (B,)
    torch.testing.assert_close(got, D.Normal(param, 0.7).log_prob(x).sum(-1))


@pytest.mark.parametrize("per_dimension", [False, True])
def test_gaussian_learned_log_prob_matches_torch(param: torch.Tensor, per_dimension: bool) -> None:
    lik = GaussianLearned(DIM, sigma=1.3, per_dimension=per_dimension).double()
    assert isinstance(lik.log_sigma, torch.nn.Parameter)
    assert lik.log_sigma.shape == ((DIM,) if per_dimension else ())
    torch.testing.assert_close(lik.log_sigma.detach(),
                               torch.full(lik.log_sigma.shape, 1.3, dtype=torch.float64).log())
    with torch.no_grad():
        lik.log_sigma.copy_(torch.randn(lik.log_sigma.shape, dtype=torch.float64) * 0.5)
    x = _data()
    got = lik.log_prob(x, param)
    want = D.Normal(param, lik.log_sigma.detach().exp()).log_prob(x).sum(-1)
    assert got.shape == (B,)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert lik.log_sigma.grad is not None and torch.isfinite(lik.log_sigma.grad).all()


@pytest.mark.parametrize("per_dimension", [False, True])
def test_gaussian_adaptive_eval_log_prob_matches_torch(param: torch.Tensor,
                                                       per_dimension: bool) -> None:
    lik = GaussianAdaptive(DIM, per_dimension=per_dimension).double()
    variance = torch.rand(lik.running_variance.shape, dtype=torch.float64) + 0.2
    lik.running_variance.copy_(variance)
    lik.eval()
    x = _data()
    got = lik.log_prob(x, param)
    assert got.shape == (B,)
    torch.testing.assert_close(got, D.Normal(param, variance.sqrt()).log_prob(x).sum(-1))


def test_categorical_one_hot_log_prob_matches_torch(param: torch.Tensor) -> None:
    labels = torch.randint(DIM, (B,))
    x = torch.nn.functional.one_hot(labels, DIM).double()
    got = Categorical(DIM).log_prob(x, param)
    assert got.shape == (B,)
    torch.testing.assert_close(got, D.OneHotCategorical(logits=param).log_prob(x))


@pytest.mark.parametrize("shape", [(B,), (B, 1)])
def test_categorical_integer_log_prob_matches_torch(param: torch.Tensor,
                                                    shape: tuple[int, ...]) -> None:
    labels = torch.randint(DIM, (B,))
    got = Categorical(DIM).log_prob(labels.reshape(shape).double(), param)
    assert got.shape == (B,)
    torch.testing.assert_close(got, D.Categorical(logits=param).log_prob(labels))


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_bernoulli_check_data_rejects_values_outside_unit_interval(bad: float) -> None:
    x = torch.rand(B, DIM)
    Bernoulli(DIM).check_data(x)  # valid grey levels pass
    x[2, 3] = bad
    with pytest.raises(ValueError, match="bernoulli"):
        Bernoulli(DIM).check_data(x)


def test_check_data_rejects_non_finite_values_naming_the_likelihood() -> None:
    x = torch.rand(B, DIM)
    x[0, 0] = float("nan")
    for lik in (Bernoulli(DIM), Gaussian(DIM)):
        with pytest.raises(ValueError, match=lik.name):
            lik.check_data(x)


def test_categorical_check_data_rejects_out_of_range_labels() -> None:
    Categorical(DIM).check_data(torch.tensor([0.0, DIM - 1.0]))
    with pytest.raises(ValueError, match="categorical"):
        Categorical(DIM).check_data(torch.tensor([0.0, float(DIM)]))


def test_dynamic_binarisation_draws_bernoulli_in_training_only() -> None:
    torch.manual_seed(0)
    lik = Bernoulli(DIM, binarize=True)
    x = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]).expand(4000, DIM)
    lik.train()
    drawn = lik.prepare(x)
    assert set(drawn.unique().tolist()) <= {0.0, 1.0}
    # 4000 draws: standard error ≤ 0.5/√4000 ≈ 0.008, so 0.04 is five standard errors.
    torch.testing.assert_close(drawn.mean(0), x[0], rtol=0, atol=0.04)
    assert not torch.equal(lik.prepare(x), drawn)  # a fresh draw every batch
    lik.eval()
    assert torch.equal(lik.prepare(x), x)
    lik.train()
    assert torch.equal(Bernoulli(DIM, binarize=False).prepare(x), x)


def test_build_passes_only_the_options_each_likelihood_takes() -> None:
    lik = likelihoods.build("gaussian", DIM, sigma=2.0, binarize=True)
    assert isinstance(lik, Gaussian)
    torch.testing.assert_close(lik.variance, torch.tensor(4.0))
    assert likelihoods.build("bernoulli", DIM, sigma=2.0, binarize=True).binarize
    assert isinstance(likelihoods.build("gaussian_adaptive", DIM, sigma=2.0), GaussianAdaptive)


def test_build_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="nope") as info:
        likelihoods.build("nope", 3)
    for name in ("bernoulli", "gaussian", "gaussian_learned", "gaussian_adaptive", "categorical"):
        assert name in str(info.value)


def test_fixed_binarisation_is_the_seeded_threshold_and_ignores_the_global_random_state() -> None:
    from ilvae.datamodules.base import seeded_generator

    x = torch.rand(64, 10, dtype=torch.float64)
    u = torch.rand(x.shape, generator=seeded_generator(likelihoods.BINARIZE_SEED, "binarize"))
    expected = (u.double() < x).double()
    torch.manual_seed(1)
    first = likelihoods.binarize_fixed(x)
    torch.manual_seed(2)
    torch.rand(1000)
    second = likelihoods.binarize_fixed(x)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    # the same binary images for float32 data, and batch by batch with one generator
    assert torch.equal(likelihoods.binarize_fixed(x.float()), expected.float())
    gen = likelihoods.binarization_generator()
    parts = [likelihoods.binarize_fixed(x[a:b], gen) for a, b in ((0, 7), (7, 40), (40, 64))]
    assert torch.equal(torch.cat(parts), expected)


def test_fixed_binarisation_is_binary_with_the_mean_of_the_grey_levels() -> None:
    x = torch.rand(2000, 50, generator=torch.Generator().manual_seed(0))
    x[:, 0], x[:, 1] = 0.0, 1.0
    x_bin = likelihoods.binarize_fixed(x)
    assert x_bin.dtype == x.dtype and set(x_bin.unique().tolist()) == {0.0, 1.0}
    assert x_bin[:, 0].eq(0).all() and x_bin[:, 1].eq(1).all()
    # E[x_bin] = x: the mean differs by at most 5 standard errors √(Σ x(1 − x))/n
    std_error = float((x * (1 - x)).sum().sqrt() / x.numel())
    assert abs(float(x_bin.mean() - x.mean())) < 5 * std_error
    assert float((x_bin - x).abs().mean()) > 0.1  # not the grey levels themselves
