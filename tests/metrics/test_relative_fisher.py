import importlib.util
import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal

from ilvae.decoders.ar_elbo import ARELBODecoder
from ilvae.decoders.mlp import MLPDecoder
from ilvae.encoders import MLPEncoder
from ilvae.likelihoods import GaussianLearned
from ilvae.metrics import RelativeFisherDivergence
from ilvae.priors import StandardNormal

D, M, SIGMA = 6, 3, 0.5


class StandIn(nn.Module):
    """The model interface the metrics use: encode, decoder, prior, latent_dim."""

    def __init__(self, encoder: MLPEncoder, decoder: nn.Module, prior: StandardNormal) -> None:
        super().__init__()
        self.encoder, self.decoder, self.prior = encoder, decoder, prior
        self.latent_dim = prior.latent_dim

    def encode(self, x: torch.Tensor) -> Normal:
        return self.encoder(x)


def _weights(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D, M, generator=g), torch.randn(D, generator=g)


def _model(decoder: nn.Module, weight: torch.Tensor, bias: torch.Tensor, *, gain=None,
           offset=None, std: float | torch.Tensor | None = None) -> StandIn:
    """Linear decoder f(z) = Wz + b; linear encoder μ(x) = Ax + c with scale ``std``
    (``None``: scale ≈ 1e-12, so z = μ(x) to float precision)."""
    encoder = MLPEncoder((D,), M, hidden=[], min_scale=1e-12 if std is None else 1e-4)
    with torch.no_grad():
        decoder.net[0].weight.copy_(weight)
        decoder.net[0].bias.copy_(bias)
        layer = encoder.net[0]
        layer.weight.zero_()
        if gain is not None:
            layer.weight[:M].copy_(gain)
        layer.bias[:M].copy_(torch.zeros(M) if offset is None else offset)
        if std is None:
            layer.bias[M:].fill_(-60.0)
        else:
            layer.bias[M:].copy_(torch.log(torch.expm1(torch.as_tensor(std) - 1e-4)))
    return StandIn(encoder, decoder, StandardNormal(M))


def _gaussian_decoder(sigma: float = SIGMA) -> MLPDecoder:
    return MLPDecoder(M, D, hidden=[], likelihood="gaussian", sigma=sigma)


def _random_gain(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(M, D, generator=g), 0.1 * torch.randn(M, generator=g)


def _data(n: int, seed: int = 2) -> torch.Tensor:
    return 2.0 * torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def test_matches_closed_form_gradient_of_a_linear_gaussian_decoder():
    # ∇_z log N(x; Wz + b, σ²I) = Wᵀ(x − Wz − b)/σ², here at z = μ(x).
    weight, bias = _weights()
    gain, offset = _random_gain()
    model = _model(_gaussian_decoder(), weight, bias, gain=gain, offset=offset)
    x = _data(50)
    metric = RelativeFisherDivergence(num_samples=2)
    metric.update(x, model)
    z = x @ gain.T + offset
    expected = (((x - z @ weight.T - bias) @ weight) ** 2).sum(1).mean() / SIGMA**4
    assert float(metric.compute()["relative_fisher"]) == pytest.approx(float(expected), rel=1e-5)


def test_monte_carlo_over_the_posterior_matches_the_closed_form_expectation():
    # z ~ N(μ, S²): E‖Wᵀ(r − WSε)‖²/σ⁴ = (‖Wᵀr‖² + tr(WᵀW S² WᵀW))/σ⁴, r = x − Wμ − b.
    torch.manual_seed(0)
    weight, bias = _weights()
    gain, offset = _random_gain()
    std = torch.tensor([0.3, 0.6, 0.9])
    model = _model(_gaussian_decoder(), weight, bias, gain=gain, offset=offset, std=std)
    x = _data(40)
    metric = RelativeFisherDivergence(num_samples=500)
    metric.update(x, model)
    gram = weight.T @ weight
    residual = x - (x @ gain.T + offset) @ weight.T - bias
    expected = ((residual @ weight) ** 2).sum(1).mean() + torch.trace(gram @ torch.diag(std**2)
                                                                       @ gram)
    assert float(metric.compute()["relative_fisher"]) == pytest.approx(
        float(expected) / SIGMA**4, rel=0.02)


def test_on_model_data_with_exact_posterior_equals_trace_over_variance_above_the_bound():
    # x ~ p(x), z ~ p(z|x) is z ~ p(z), x ~ p(x|z): E‖Wᵀε‖²/σ⁴ = tr(WᵀW)/σ² ≥ m L²/σ² with
    # L = smallest singular value of W (a linear map is L-inverse-Lipschitz for that L).
    torch.manual_seed(0)
    weight, bias = _weights()
    cov = torch.linalg.inv(torch.eye(M) + weight.T @ weight / SIGMA**2)
    decoder = _gaussian_decoder()
    with torch.no_grad():
        decoder.net[0].weight.copy_(weight)
        decoder.net[0].bias.copy_(bias)
    decoder.L = float(torch.linalg.svdvals(weight).min())
    # The exact posterior is not mean-field here, so draw z ~ p(z|x) through a whitened encoder:
    # the stand-in returns the exact posterior as a Normal over its Cholesky coordinates.
    chol = torch.linalg.cholesky(cov)
    n = 4000
    z0 = torch.randn(n, M)
    x = z0 @ weight.T + bias + SIGMA * torch.randn(n, D)

    class ExactPosterior(StandIn):
        def encode(self, x):
            loc = (x - bias) @ weight @ cov / SIGMA**2
            return _CorrelatedNormal(loc, chol)

    model = ExactPosterior(MLPEncoder((D,), M, hidden=[]), decoder, StandardNormal(M))
    metric = RelativeFisherDivergence()
    metric.update(x, model)
    out = metric.compute()
    trace = float(torch.trace(weight.T @ weight)) / SIGMA**2
    assert float(out["relative_fisher"]) == pytest.approx(trace, rel=0.05)
    assert float(out["relative_fisher_bound"]) == pytest.approx(M * decoder.L**2 / SIGMA**2)
    assert float(out["relative_fisher_bound"]) <= trace <= float(out["relative_fisher"]) * 1.05


class _CorrelatedNormal:
    """Minimal N(loc, LLᵀ) with the ``loc`` / ``sample`` interface the metric uses."""

    def __init__(self, loc: torch.Tensor, chol: torch.Tensor) -> None:
        self.loc, self.chol = loc, chol

    def sample(self, shape=()):
        eps = torch.randn(*shape, *self.loc.shape)
        return self.loc + eps @ self.chol.T


def test_bound_uses_the_largest_variance_of_a_per_dimension_likelihood():
    weight, bias = _weights()
    decoder = _gaussian_decoder()
    decoder.likelihood = GaussianLearned(D, per_dimension=True)
    with torch.no_grad():
        decoder.likelihood.log_sigma.copy_(torch.linspace(-1.0, -0.5, D))
    decoder.L = 0.4
    metric = RelativeFisherDivergence()
    metric.update(_data(8), _model(decoder, weight, bias))
    expected = M * 0.4**2 / math.exp(2 * -0.5)
    assert float(metric.compute()["relative_fisher_bound"]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("likelihood,with_L", [("bernoulli", True), ("gaussian", False)])
def test_bound_is_nan_without_inverse_lipschitz_gaussian_decoder(likelihood, with_L):
    weight, bias = _weights()
    decoder = MLPDecoder(M, D, hidden=[], likelihood=likelihood)
    if with_L:
        decoder.L = 1.0
    metric = RelativeFisherDivergence()
    metric.update(torch.rand(8, D), _model(decoder, weight, bias))
    out = metric.compute()
    assert math.isnan(float(out["relative_fisher_bound"]))
    assert float(out["relative_fisher"]) > 0


def test_works_inside_inference_mode_without_touching_parameter_gradients():
    weight, bias = _weights()
    gain, offset = _random_gain()
    model = _model(_gaussian_decoder(), weight, bias, gain=gain, offset=offset, std=0.5)
    outside, inside = RelativeFisherDivergence(), RelativeFisherDivergence()
    torch.manual_seed(3)
    outside.update(_data(30), model)
    with torch.inference_mode():
        x = _data(30)
        torch.manual_seed(3)
        inside.update(x, model)
        result = inside.compute()
    assert float(result["relative_fisher"]) == pytest.approx(
        float(outside.compute()["relative_fisher"]), rel=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_adaptive_variance_decoder_uses_its_frozen_running_variance():
    weight, bias = _weights()
    gain, offset = _random_gain()
    decoder = ARELBODecoder(M, D, hidden=[])
    decoder.likelihood.running_variance.fill_(0.2)
    decoder.likelihood.num_batches.fill_(3)
    model = _model(decoder, weight, bias, gain=gain, offset=offset)
    model.train()
    x = _data(20)
    metric = RelativeFisherDivergence()
    metric.update(x, model)
    residual = x - (x @ gain.T + offset) @ weight.T - bias
    expected = ((residual @ weight) ** 2).sum(1).mean() / 0.2**2
    assert float(metric.compute()["relative_fisher"]) == pytest.approx(float(expected), rel=1e-5)
    assert model.training and decoder.likelihood.training
    assert int(decoder.likelihood.num_batches) == 3


def test_updates_accumulate_like_one_update_on_all_data():
    weight, bias = _weights()
    gain, offset = _random_gain()
    decoder = _gaussian_decoder()
    decoder.L = 0.25
    model = _model(decoder, weight, bias, gain=gain, offset=offset)
    x = _data(45)
    whole, parts = RelativeFisherDivergence(), RelativeFisherDivergence()
    whole.update(x, model)
    for chunk in x.split([5, 40]):
        parts.update(chunk, model)
    for key, value in whole.compute().items():
        torch.testing.assert_close(parts.compute()[key], value)


@pytest.mark.skipif(importlib.util.find_spec("ilvae.decoders.il_brenier") is None,
                    reason="ilvae.decoders.il_brenier is not available")
def test_estimate_exceeds_the_bound_on_an_inverse_lipschitz_decoder():
    # With q(z|x) independent of x and x = f(z₀) + σε from the model,
    # E‖J(z)ᵀ(f(z₀) − f(z) + σε)‖²/σ⁴ ≥ E tr(J(z)ᵀJ(z))/σ² ≥ m L²/σ².
    from ilvae import decoders

    torch.manual_seed(0)
    L, sigma, m, d = 1.5, 0.7, 2, 5
    decoder = decoders.build("il_brenier", latent_dim=m, data_dim=d, L=L, likelihood="gaussian",
                             sigma=sigma, hidden=[16])
    encoder = MLPEncoder((d,), m, hidden=[])
    with torch.no_grad():
        encoder.net[0].weight.zero_()
        encoder.net[0].bias.zero_()
    model = StandIn(encoder, decoder, StandardNormal(m))
    with torch.no_grad():
        x = decoder(torch.randn(400, m)) + sigma * torch.randn(400, d)
    metric = RelativeFisherDivergence(num_samples=4)
    metric.update(x, model)
    out = metric.compute()
    assert float(out["relative_fisher_bound"]) == pytest.approx(m * L**2 / sigma**2, rel=1e-5)
    assert float(out["relative_fisher"]) >= float(out["relative_fisher_bound"])
