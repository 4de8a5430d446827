"""LinearVAE: its loss is the β-ELBO with the exact expectation over q, its blocks have no biases
and an input-independent posterior variance, and, trained on data with a chosen spectrum, it
shows the collapsed dimensions and decoder singular values of the closed form (Dang et al.
2024) on a grid of β, η_dec and η_enc that crosses the thresholds."""

import math

import lightning as L
import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ilvae import theory
from ilvae.datamodules.synthetic import LinearGaussianData
from ilvae.errors import ConfigurationError
from ilvae.models.linear import LinearVAE, fit_full_batch

torch.set_num_threads(1)

SPECTRUM = [3.0, 2.0, 1.2, 0.5, 0.25]


def _data(spectrum=SPECTRUM, data_dim=6, num_samples=1000, seed=0):
    dm = LinearGaussianData(spectrum=spectrum, data_dim=data_dim, num_samples=num_samples,
                            exact_spectrum=True, val_fraction=0.0, seed=seed)
    return dm.tensors("fit")[0]


def _train(model, x, rounds=6):
    return fit_full_batch(model, x, rounds)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return LinearVAE(**({"data_shape": (6,), "latent_dim": 5} | kw))


# --------------------------------------------------------------------------- the model itself
def test_encoder_and_decoder_are_linear_without_bias_and_scale_is_input_independent():
    model = _model()
    x = torch.randn(7, 6)
    posterior = model.encode(x)
    assert isinstance(posterior, Normal) and posterior.loc.shape == (7, 5)
    assert torch.allclose(posterior.loc, x @ model.encoder.weight.T)
    assert torch.equal(posterior.scale, model.encoder.scale.expand(7, 5))
    assert torch.allclose(model.encode(2 * x).loc, 2 * posterior.loc)
    z = torch.randn(3, 5)
    assert torch.allclose(model.decode(z), z @ model.decoder.weight.T)
    assert torch.equal(model.decode(torch.zeros(1, 5)), torch.zeros(1, 6))
    names = {n for n, _ in model.named_parameters()}
    assert names == {"encoder.weight", "encoder.log_scale", "decoder.weight"}
    fixed = _model(learnable_variance=False, encoder_std=[0.5, 1, 1, 2, 1])
    assert {n for n, _ in fixed.named_parameters()} == {"encoder.weight", "decoder.weight"}
    assert torch.allclose(fixed.encode(x).scale[0], torch.tensor([0.5, 1, 1, 2, 1]))
    assert float(model.prior.scale) == 1.0 and model.decoder.likelihood.name == "gaussian"


def test_analytic_expectation_equals_a_monte_carlo_average_over_q():
    model = _model(eta_dec=0.7)
    with torch.no_grad():
        model.encoder.log_scale.copy_(torch.linspace(-1.0, 0.5, 5))
    x = torch.randn(4, 6)
    posterior = model.encode(x)
    exact = model.decoder.expected_log_prob(x, posterior).detach()
    torch.manual_seed(1)
    z = posterior.sample((200_000,)).double()  # (K, B, m)
    residual = ((x.double() - z @ model.decoder.weight.T.detach().double()) ** 2).sum(-1)
    samples = -0.5 * (residual / 0.49 + 6 * math.log(2 * math.pi * 0.49))
    stderr = samples.std(0) / math.sqrt(samples.shape[0])
    assert ((exact.double() - samples.mean(0)).abs() < 4 * stderr).all()


@pytest.mark.parametrize("analytic", [True, False])
def test_loss_equals_hand_computed_beta_elbo(analytic):
    model = _model(beta=0.7, eta_enc=1.3, eta_dec=0.8, analytic_expectation=analytic)
    x = torch.randn(9, 6)
    torch.manual_seed(2)
    loss, terms = model.loss(x)
    torch.manual_seed(2)
    w, u = model.encoder.weight, model.decoder.weight
    s = model.encoder.log_scale.exp()
    q = Normal(x @ w.T, s.expand(9, 5))
    if analytic:
        sq = ((x - q.loc @ u.T) ** 2).sum(1) + sum(s[i] ** 2 * (u[:, i] ** 2).sum()
                                                  for i in range(5))
    else:
        sq = ((x - q.rsample() @ u.T) ** 2).sum(1)
    log_px = -0.5 * (sq / 0.64 + 6 * math.log(2 * math.pi * 0.64))
    kl = kl_divergence(q, Normal(torch.zeros(5), torch.full((5,), 1.3))).sum(1)
    assert torch.allclose(loss, (-log_px + 0.7 * kl).mean(), rtol=1e-5)
    assert torch.allclose(terms["elbo"], (log_px - kl).mean(), rtol=1e-5)


def test_hparams_rebuild_the_same_model():
    model = _model(beta=2.0, eta_enc=0.5, learnable_variance=False, encoder_std=0.3)
    rebuilt = LinearVAE(**model.hparams)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(5, 6)
    assert torch.equal(model.loss(x)[0], rebuilt.loss(x)[0])
    assert rebuilt.beta == 2.0 and not rebuilt.learnable_variance


def test_measured_collapse_is_mean_kl_below_eps_and_inactive_is_a_zero_encoder_row():
    model = _model(eta_enc=0.5)
    x = torch.randn(50, 6)
    with torch.no_grad():
        model.encoder.weight[1:3] = 0
        model.encoder.log_scale.copy_(torch.log(torch.tensor([1.0, 0.5, 0.9, 1.0, 0.5])))
    kl = kl_divergence(model.encode(x), Normal(0.0, 0.5)).mean(0).double()
    assert torch.allclose(model.kl_per_dimension(x), kl, rtol=1e-5)
    assert model.measured_collapse(x).tolist() == (kl < 0.01).tolist()
    assert model.measured_collapse(x).tolist() == [False, True, False, False, False]
    assert model.measured_inactive(x).tolist() == [False, True, True, False, False]


@pytest.mark.parametrize("kw,field", [({"beta": -1.0}, "beta"), ({"eta_dec": 0.0}, "eta_dec"),
                                      ({"eta_enc": float("nan")}, "eta_enc"),
                                      ({"latent_dim": 0}, "latent_dim"),
                                      ({"encoder_std": [1.0, 2.0]}, "encoder_std"),
                                      ({"learnable_variance": "yes"}, "learnable_variance")])
def test_bad_configuration_names_the_field(kw, field):
    with pytest.raises(ConfigurationError, match=field):
        LinearVAE(**({"data_shape": (6,), "latent_dim": 3} | kw))


def test_synthetic_data_have_the_chosen_spectrum():
    dm = LinearGaussianData(spectrum=[2.0, 1.0, 0.5], data_dim=5, num_samples=300,
                            exact_spectrum=True, val_fraction=0.0, seed=3)
    x, y = dm.tensors("fit")
    assert x.shape == (300, 5) and dm.data_shape == (5,) and (y == -1).all()
    assert torch.allclose(theory.second_moment(x), dm.second_moment, atol=1e-5)
    q = dm.directions
    assert torch.allclose(q.T @ q, torch.eye(3, dtype=torch.float64), atol=1e-12)
    theta = theory.linear_vae(x, latent_dim=3).theta
    assert torch.allclose(theta, torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64), atol=1e-5)
    again = LinearGaussianData(spectrum=[2.0, 1.0, 0.5], data_dim=5, num_samples=300,
                               exact_spectrum=True, val_fraction=0.0, seed=3)
    assert torch.equal(again.tensors("fit")[0], x)
    plain = LinearGaussianData(spectrum=[2.0, 1.0], num_samples=20000, rotate=False)
    xs, _ = plain.tensors("fit")
    assert torch.allclose(xs.std(0), torch.tensor([2.0, 1.0]), rtol=0.03)
    for bad in ([], [1.0, -1.0], [float("nan")]):
        with pytest.raises(ValueError, match="spectrum"):
            LinearGaussianData(spectrum=bad)
    with pytest.raises(ValueError, match="data_dim"):
        LinearGaussianData(spectrum=[1.0, 1.0, 1.0], data_dim=2)


# --------------------------------------------------------- trained models against the theory
def _compare(model, x, pred):
    """Measured vs predicted: counts, singular values, KL and variances (sorted)."""
    omega = model.decoder_singular_values()
    scale = float(pred.singular_values.max()) or 1.0  # absolute when everything collapses
    active = pred.singular_values > 0
    rel = ((omega - pred.singular_values).abs() / pred.singular_values)[active]
    kl = model.kl_per_dimension(x).sort(descending=True).values
    var = (model.encoder.scale.detach().double() ** 2).sort().values
    return {
        "predicted": pred.num_collapsed,
        "measured": int(model.measured_collapse(x).sum()),
        "active_rel_error": float(rel.max()) if active.any() else 0.0,
        "collapsed_omega": float(omega[~active].max() / scale) if (~active).any() else 0.0,
        "kl_error": float((kl - pred.kl.sort(descending=True).values).abs().max()),
        "variance_error": float((var - pred.encoder_variance.sort().values).abs().max()),
    }


# Thresholds √β·η_dec at 0.6, 0.75, 0.9 (below) and 1.1, 1.3, 1.5 (above) times θ₃ = 1.2, with
# η_enc varied too: the third direction turns from active to collapsed across the grid.
GRID = [(0.36, 1.0, 1.2), (0.5625, 0.5, 1.2), (1.0, 2.0, 1.08),
        (1.21, 1.0, 1.2), (1.0, 0.7, 1.56), (3.24, 1.5, 1.0)]


@pytest.mark.parametrize("beta,eta_enc,eta_dec", GRID)
def test_trained_linear_vae_matches_the_closed_form_across_the_threshold(beta, eta_enc,
                                                                          eta_dec):
    x = _data()
    model = _train(_model(beta=beta, eta_enc=eta_enc, eta_dec=eta_dec), x)
    pred = model.theory_prediction(x)
    threshold = math.sqrt(beta) * eta_dec
    assert pred.num_collapsed == (2 if threshold < 1.2 else 3)
    out = _compare(model, x, pred)
    assert out["measured"] == out["predicted"], out
    assert theory.collapse_agreement(pred.collapsed, model.measured_collapse(x)) == 1.0
    assert out["active_rel_error"] < 0.02, out
    assert out["collapsed_omega"] < 0.02, out
    assert out["kl_error"] < 0.01 and out["variance_error"] < 0.01 * eta_enc**2, out


@pytest.mark.parametrize("encoder_std", [0.6, [0.4, 1.5, 0.8, 1.1, 2.0]])
def test_trained_fixed_variance_vae_has_the_predicted_inactive_but_no_collapsed_dimensions(
        encoder_std):
    x = _data()
    model = _train(_model(learnable_variance=False, encoder_std=encoder_std, eta_enc=1.0), x)
    pred = model.theory_prediction(x)
    assert pred.inactive.any() and not pred.collapsed.any()
    assert not model.measured_collapse(x).any()
    omega = model.decoder_singular_values()
    assert int((omega < 0.02 * omega.max()).sum()) == int(pred.inactive.sum())
    if not pred.exchangeable:  # the smallest σ take the largest θ, dimension by dimension
        assert model.measured_inactive(x).tolist() == pred.inactive.tolist()
    assert theory.singular_value_error(model.decoder_singular_values(),
                                       pred.singular_values) < 0.02


def test_lightning_fit_with_lbfgs_reaches_the_closed_form(tmp_path):
    dm = LinearGaussianData(spectrum=SPECTRUM, data_dim=6, num_samples=1000, batch_size=1000,
                            val_fraction=0.0, exact_spectrum=True)
    model = _model(beta=1.0, optimizer=lambda p: torch.optim.LBFGS(
        p, lr=1.0, max_iter=20, line_search_fn="strong_wolfe"))
    trainer = L.Trainer(max_epochs=15, default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, dm)
    x, _ = dm.tensors("fit")
    pred = model.theory_prediction(x)
    assert int(model.measured_collapse(x).sum()) == pred.num_collapsed == 2
    assert theory.singular_value_error(model.decoder_singular_values(),
                                       pred.singular_values) < 0.01
    assert "train/beta" in trainer.callback_metrics


# ----------------------------------------------------------------------------------- slow
# Thresholds √β·η_dec from 0.13 to 3.5, each at least 5 % away from every θ.
WIDE = [(b, ee, ed) for b in (0.05, 0.3, 1.0, 2.0, 6.0, 12.0) for ee, ed in ((1.0, 1.0),
                                                                            (0.5, 0.6))]


@pytest.mark.slow
@pytest.mark.parametrize("beta,eta_enc,eta_dec", WIDE)
def test_wide_grid_of_trained_linear_vaes_matches_the_closed_form(beta, eta_enc, eta_dec):
    x = _data(spectrum=[3.0, 2.2, 1.6, 1.1, 0.8, 0.5, 0.3], data_dim=9)
    model = _train(_model(data_shape=(9,), latent_dim=8, beta=beta, eta_enc=eta_enc,
                          eta_dec=eta_dec), x, rounds=10)
    pred = model.theory_prediction(x)
    assert ((pred.theta / (math.sqrt(beta) * eta_dec) - 1).abs() > 0.05).all()
    out = _compare(model, x, pred)
    assert out["measured"] == out["predicted"], out
    assert out["active_rel_error"] < 0.03 and out["collapsed_omega"] < 0.02, out


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_one_sample_training_with_adam_reaches_the_closed_form(beta):
    x = _data()
    model = _model(beta=beta, analytic_expectation=False)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 4000)
    for _ in range(4000):
        opt.zero_grad()
        model.loss(x)[0].backward()
        opt.step()
        sched.step()
    pred = model.theory_prediction(x)
    assert int(model.measured_collapse(x).sum()) == pred.num_collapsed
    assert theory.singular_value_error(model.decoder_singular_values(),
                                       pred.singular_values) < 0.03
    assert np.isfinite(float(model.loss(x)[0].detach()))
