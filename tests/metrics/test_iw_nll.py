import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import MultivariateNormal, Normal

from ilvae.decoders.ar_elbo import ARELBODecoder
from ilvae.decoders.mlp import MLPDecoder
from ilvae.encoders import MLPEncoder
from ilvae.metrics import ImportanceWeightedNLL
from ilvae.priors import StandardNormal

D, M, SIGMA = 5, 2, 0.5


class StandIn(nn.Module):
    """The model interface the metrics use: encode, decoder, prior, latent_dim."""

    def __init__(self, encoder: MLPEncoder, decoder: nn.Module, prior: StandardNormal) -> None:
        super().__init__()
        self.encoder, self.decoder, self.prior = encoder, decoder, prior
        self.latent_dim = prior.latent_dim

    def encode(self, x: torch.Tensor) -> Normal:
        return self.encoder(x)


def _linear_gaussian(decoder: MLPDecoder, variance: float, loc_shift: float = 0.0,
                     scale_factor: float = 1.0) -> tuple[StandIn, torch.Tensor, torch.Tensor]:
    """Decoder f(z) = Wz + b with orthogonal columns of W, so the exact posterior
    N(Σ Wᵀ(x − b)/σ², Σ), Σ = (I + WᵀW/σ²)⁻¹, is diagonal and a linear encoder represents it
    (optionally shifted and widened). Returns the model, W and b."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D, M, generator=g))
    weight = q * torch.tensor([1.5, 0.7])
    bias = torch.randn(D, generator=g)
    cov = torch.diag(1.0 / (1.0 + (weight**2).sum(0) / variance))
    encoder = MLPEncoder((D,), M, hidden=[])
    with torch.no_grad():
        decoder.net[0].weight.copy_(weight)
        decoder.net[0].bias.copy_(bias)
        gain = cov @ weight.T / variance
        layer = encoder.net[0]
        layer.weight.zero_()
        layer.weight[:M].copy_(gain)
        layer.bias[:M].copy_(-gain @ bias + loc_shift)
        std = scale_factor * cov.diagonal().sqrt() - encoder.min_scale
        layer.bias[M:].copy_(torch.log(torch.expm1(std)))
    return StandIn(encoder, decoder, StandardNormal(M)), weight, bias


def _exact_nll(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, variance: float):
    """−log p(x) with p(x) = N(b, WWᵀ + σ²I), averaged over x."""
    marginal = MultivariateNormal(bias, weight @ weight.T + variance * torch.eye(D))
    return -float(marginal.log_prob(x).double().mean())


def _data(n: int = 300, seed: int = 1) -> torch.Tensor:
    return 1.5 * torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_samples,chunk_size", [(1, 1), (7, 3), (50, 50)])
def test_exact_posterior_gives_exact_nll_for_any_k(num_samples, chunk_size):
    decoder = MLPDecoder(M, D, hidden=[], likelihood="gaussian", sigma=SIGMA)
    model, weight, bias = _linear_gaussian(decoder, SIGMA**2)
    x = _data()
    metric = ImportanceWeightedNLL(num_samples=num_samples, chunk_size=chunk_size)
    metric.update(x, model)
    assert float(metric.compute()) == pytest.approx(_exact_nll(x, weight, bias, SIGMA**2),
                                                    abs=1e-4)


def test_imperfect_encoder_approaches_the_exact_nll_from_above_as_k_grows():
    torch.manual_seed(0)
    decoder = MLPDecoder(M, D, hidden=[], likelihood="gaussian", sigma=SIGMA)
    model, weight, bias = _linear_gaussian(decoder, SIGMA**2, loc_shift=0.3, scale_factor=1.8)
    x = _data()
    exact = _exact_nll(x, weight, bias, SIGMA**2)
    values = []
    for k in (1, 10, 500):
        metric = ImportanceWeightedNLL(num_samples=k, chunk_size=128)
        metric.update(x, model)
        values.append(float(metric.compute()))
    # E[NLL_K] ≥ −log p(x), decreasing in K; K = 500 is within Monte Carlo error of the limit.
    assert values[0] > values[1] > values[2]
    assert values[0] - exact > 1.0 and values[1] - exact > 0.03
    assert abs(values[2] - exact) < 0.01


@pytest.mark.parametrize("likelihood", ["bernoulli", "categorical"])
def test_matches_quadrature_for_discrete_likelihoods(likelihood):
    # m = 1: log p(x) = log ∫ p(x|z) N(z; 0, 1) dz by the trapezoid rule on a dense grid.
    torch.manual_seed(0)
    decoder = MLPDecoder(1, 4, hidden=[8], activation="tanh", likelihood=likelihood)
    encoder = MLPEncoder((4,), 1, hidden=[8])
    model = StandIn(encoder, decoder, StandardNormal(1))
    if likelihood == "bernoulli":
        x = torch.bernoulli(torch.full((40, 4), 0.5))
    else:
        x = F.one_hot(torch.randint(0, 4, (40,)), 4).float()
    grid = torch.linspace(-9, 9, 4001).unsqueeze(1)
    with torch.no_grad():
        log_joint = torch.stack([decoder.log_prob(row.expand(4001, 4), grid) for row in x])
    log_joint = log_joint.double() + Normal(0.0, 1.0).log_prob(grid.squeeze(1)).double()
    log_px = torch.logsumexp(log_joint, 1) + math.log(float(grid[1] - grid[0]))
    metric = ImportanceWeightedNLL(num_samples=500, chunk_size=200)
    metric.update(x, model)
    assert float(metric.compute()) == pytest.approx(-float(log_px.mean()), abs=0.02)


def test_adaptive_variance_decoder_uses_its_frozen_running_variance():
    variance = 0.3
    decoder = ARELBODecoder(M, D, hidden=[])
    decoder.likelihood.running_variance.fill_(variance)
    decoder.likelihood.num_batches.fill_(5)
    model, weight, bias = _linear_gaussian(decoder, variance)
    model.train()
    x = _data()
    metric = ImportanceWeightedNLL(num_samples=5)
    metric.update(x, model)
    assert float(metric.compute()) == pytest.approx(_exact_nll(x, weight, bias, variance),
                                                    abs=1e-4)
    assert model.training and decoder.training and decoder.likelihood.training
    assert int(decoder.likelihood.num_batches) == 5
    assert float(decoder.likelihood.running_variance) == pytest.approx(variance)


def test_data_are_processed_together_and_samples_in_chunks():
    decoder = MLPDecoder(M, D, hidden=[], likelihood="gaussian", sigma=SIGMA)
    model, _, _ = _linear_gaussian(decoder, SIGMA**2)
    batch_sizes = []
    decoder.register_forward_hook(lambda mod, args, out: batch_sizes.append(out.shape[0]))
    metric = ImportanceWeightedNLL(num_samples=23, chunk_size=10)
    metric.update(_data(n=64), model)
    assert batch_sizes == [640, 640, 192]


def test_works_under_inference_mode_and_accumulates_like_one_update():
    decoder = MLPDecoder(M, D, hidden=[], likelihood="gaussian", sigma=SIGMA)
    model, weight, bias = _linear_gaussian(decoder, SIGMA**2)
    x = _data(n=90)
    whole, parts = ImportanceWeightedNLL(num_samples=4), ImportanceWeightedNLL(num_samples=4)
    whole.update(x, model)
    with torch.inference_mode():
        for chunk in x.split([10, 41, 39]):
            parts.update(chunk.clone(), model)
    assert float(parts.count) == 90
    assert float(parts.compute()) == pytest.approx(float(whole.compute()), abs=1e-5)
    assert float(whole.nll_sum) == pytest.approx(90 * _exact_nll(x, weight, bias, SIGMA**2),
                                                 rel=1e-5)
