"""evaluate(): grey-level and fixed-binarisation scores of a Bernoulli model, checked against
numerical integration over a one-dimensional latent; KL against the model's own prior."""

import math

import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from ilvae.likelihoods import binarize_fixed
from ilvae.models import VAE
from ilvae.reproduce.common import evaluate


def _model(latent_dim=1, likelihood="bernoulli", prior_scale=1.0):
    torch.manual_seed(0)
    model = VAE(data_shape=(6,), latent_dim=latent_dim,
                encoder={"class_path": "ilvae.encoders.MLPEncoder", "init_args": {"hidden": [8]}},
                decoder={"class_path": "mlp",
                         "init_args": {"hidden": [8], "likelihood": likelihood}},
                prior={"class_path": "ilvae.priors.StandardNormal",
                       "init_args": {"scale": prior_scale}})
    with torch.no_grad():  # a decoder whose output depends clearly on z
        for p in model.decoder.parameters():
            p.mul_(3.0)
    return model.eval()


# A fine grid of standardised latent values t and the N(0, 1) weights φ(t)·Δt (normalised):
# E_{N(μ, s²)} f(z) ≈ Σ_j w_j f(μ + s t_j). The decoder is piecewise linear in z (ReLU), so a
# fine grid is accurate where a few Gauss–Hermite nodes are not.
_GRID = torch.linspace(-8.0, 8.0, 1601, dtype=torch.float64)
_WEIGHTS = torch.softmax(Normal(0.0, 1.0).log_prob(_GRID), 0)


def _log_px_on_grid(model, x, loc, scale):
    """log p(x|z) at z = loc + scale·t for every grid value t, shape (N, grid)."""
    z = (loc.double() + scale.double() * _GRID).float()  # (N, grid)
    n, k = z.shape
    with torch.no_grad():
        log_px = model.decoder.log_prob(x.repeat_interleave(k, 0), z.reshape(-1, 1))
    return log_px.double().reshape(n, k)


def _integrated_elbo(model, x):
    """(E_x ELBO(x), standard error of a one-draw-per-example estimate of it)."""
    with torch.no_grad():
        posterior = model.encode(x)
    f = _log_px_on_grid(model, x, posterior.loc, posterior.scale)
    mean, second = f @ _WEIGHTS, f.square() @ _WEIGHTS
    kl = kl_divergence(posterior, Normal(0.0, 1.0)).sum(-1).double()
    return float((mean - kl).mean()), float((second - mean**2).sum().sqrt() / len(x))


def _integrated_nll(model, x):
    """−E_x log p(x) with p(x) = ∫ p(x|z) N(z; 0, 1) dz."""
    f = _log_px_on_grid(model, x, torch.zeros(len(x), 1), torch.ones(len(x), 1))
    return float(-torch.logsumexp(f + torch.log(_WEIGHTS), dim=1).mean())


def test_bernoulli_scores_on_the_fixed_binarisation_equal_numerical_integration():
    model = _model()
    x = torch.rand(2000, 6, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    out = evaluate(model, x, iw_samples=500, max_iw=1000)
    x_bin = binarize_fixed(x)
    elbo, std_error = _integrated_elbo(model, x_bin)
    assert abs(out["elbo_binarized"] - elbo) < 5 * std_error
    nll, nll_grey = _integrated_nll(model, x_bin[:1000]), _integrated_nll(model, x[:1000])
    assert abs(nll - nll_grey) > 0.05  # the check below tells the two data sets apart
    # the IW bound with K = 500 lies within a hundredth of a nat of −log p(x), never far below
    assert -0.005 < out["iw_nll_binarized"] - nll < 0.02
    # elbo and iw_nll stay the grey-level scores
    grey, grey_error = _integrated_elbo(model, x)
    assert abs(out["elbo"] - grey) < 5 * grey_error
    assert -0.005 < out["iw_nll"] - nll_grey < 0.02


def test_binarised_elbo_equals_the_hand_computed_elbo_with_the_same_draws():
    """evaluate draws ε for the grey-level ELBO, then ε' for the binarised one (z = μ + s ε')."""
    model = _model(latent_dim=3)
    x = torch.rand(200, 6, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    out = evaluate(model, x, iw_samples=0)
    torch.manual_seed(2)
    eps_grey, eps_bin = torch.randn(200, 3), torch.randn(200, 3)
    x_bin = binarize_fixed(x)
    with torch.no_grad():
        expected = []
        for data, eps in ((x, eps_grey), (x_bin, eps_bin)):
            posterior = model.encode(data)
            theta = model.decoder(posterior.loc + posterior.scale * eps)
            log_px = (data * F.logsigmoid(theta) + (1 - data) * F.logsigmoid(-theta)).sum(1)
            kl = kl_divergence(posterior, Normal(0.0, 1.0)).sum(1)
            expected.append(float((log_px - kl).mean()))
    assert math.isclose(out["elbo"], expected[0], rel_tol=1e-5)
    assert math.isclose(out["elbo_binarized"], expected[1], rel_tol=1e-5)
    assert "iw_nll_binarized" not in out  # no IW samples asked for


def test_a_gaussian_model_has_no_binarised_scores():
    model = _model(likelihood="gaussian")
    out = evaluate(model, torch.rand(50, 6), iw_samples=4)
    assert "elbo" in out and "iw_nll" in out
    assert not [k for k in out if "binarized" in k]


def test_kl_is_measured_against_the_models_own_prior_scale():
    eta = 0.5
    model = _model(latent_dim=4, prior_scale=eta)
    x = torch.rand(300, 6, generator=torch.Generator().manual_seed(3))
    out = evaluate(model, x, iw_samples=0)
    with torch.no_grad():
        posterior = model.encode(x)
    loc, scale = posterior.loc.double(), posterior.scale.double()
    # closed form ½(μ²/η² + s²/η² − log(s²/η²) − 1), summed over dimensions, mean over x
    per_dim = 0.5 * ((loc / eta) ** 2 + (scale / eta) ** 2 - torch.log((scale / eta) ** 2) - 1)
    assert math.isclose(out["kl"], float(per_dim.sum(1).mean()), rel_tol=1e-6)
    assert out["epsilon_collapsed"] == int((per_dim.mean(0) < 0.01).sum())
    unit = kl_divergence(posterior, Normal(0.0, 1.0)).sum(1).mean()
    assert abs(out["kl"] - float(unit)) > 0.1  # the unit-prior KL is a different number
