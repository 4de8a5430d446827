"""HierarchicalVAE: its loss is the weighted two-level ELBO of Dang et al. (2024) computed from
the distributions, its IW-NLL is the two-level importance-weighted bound (exact at K = 1, above
and approaching the closed-form marginal likelihood of an affine-Gaussian model), and with
affine maps its z₂ collapse matches ilvae.theory.linear_hvae and a trained LinearHVAE on both
sides of the threshold σ₁² vs (β₂/β₁)η_dec²."""

import math

import lightning as L
import pytest
import torch
from torch.distributions import Bernoulli, MultivariateNormal, Normal, kl_divergence

from ilvae.datamodules.synthetic import LinearGaussianData
from ilvae.errors import ConfigurationError
from ilvae.models import HierarchicalVAE, LinearHVAE
from ilvae.models.linear import fit_full_batch

torch.set_num_threads(1)

SPECTRUM = [3.0, 2.0, 1.2, 0.5, 0.25]
AFFINE = {"hidden_2": [],
          "encoder": {"class_path": "ilvae.encoders.MLPEncoder", "init_args": {"hidden": []}},
          "decoder": {"class_path": "mlp",
                      "init_args": {"hidden": [], "likelihood": "gaussian", "sigma": 1.0}}}


def _model(seed=0, likelihood="gaussian", **kw):
    torch.manual_seed(seed)
    decoder = {"class_path": "mlp", "init_args": {"hidden": [16], "likelihood": likelihood,
                                                  "sigma": 0.7}}
    return HierarchicalVAE(**({"data_shape": (6,), "latent_dim": 4, "latent_dim_2": 3,
                               "encoder": {"class_path": "ilvae.encoders.MLPEncoder",
                                           "init_args": {"hidden": [16]}},
                               "decoder": decoder, "hidden_2": [8]} | kw))


def _data(num_samples=300, spectrum=SPECTRUM):
    dm = LinearGaussianData(spectrum=spectrum, data_dim=6, num_samples=num_samples,
                            exact_spectrum=True, val_fraction=0.0)
    return dm.tensors("fit")[0]


def _log_px(model, x, z1):
    theta = model.decoder(z1)
    if model.decoder.likelihood.name == "bernoulli":
        return Bernoulli(logits=theta, validate_args=False).log_prob(x).sum(-1)  # grey levels
    return Normal(theta, model.decoder.likelihood.variance.sqrt()).log_prob(x).sum(-1)


def _draw(model, x):
    """(q₁, z₁, q₂, z₂) drawn as a reader of the model's definition would draw them."""
    base = model.encoder(x)
    scale = base.scale if model.learnable_sigma_1 else torch.full_like(base.loc, model.sigma_1)
    q1 = Normal(base.loc, scale)
    z1 = q1.rsample()
    q2 = model.encoder_z2(z1)
    return q1, z1, q2, q2.rsample()


def _p_z1(model, z2):
    return Normal(model.decoder_z1(z2), model.eta_dec)


# ------------------------------------------------------------------------------------ objective
@pytest.mark.parametrize("likelihood,learnable", [("gaussian", False), ("bernoulli", True)])
def test_loss_equals_the_weighted_elbo_computed_from_the_distributions(likelihood, learnable):
    model = _model(likelihood=likelihood, learnable_sigma_1=learnable, beta_1=0.7, beta_2=1.6,
                   eta_enc=1.3, eta_dec=0.8, sigma_1=0.6)
    x = torch.rand(9, 6) if likelihood == "bernoulli" else torch.randn(9, 6)
    torch.manual_seed(3)
    loss, terms = model.loss(x)
    torch.manual_seed(3)
    q1, z1, q2, z2 = _draw(model, x)
    log_px = _log_px(model, x, z1)
    kl1 = (-q1.entropy() - _p_z1(model, z2).log_prob(z1)).sum(-1)  # E_q log q(z₁|x) exact
    kl2 = kl_divergence(q2, Normal(0.0, model.eta_enc)).sum(-1)
    assert torch.allclose(loss, (-log_px + 0.7 * kl1 + 1.6 * kl2).mean(), rtol=1e-5)
    assert torch.allclose(terms["kl_z1"], kl1.mean(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(terms["kl_z2"], kl2.mean(), rtol=1e-5)
    assert torch.allclose(terms["elbo"], (log_px - kl1 - kl2).mean(), rtol=1e-5)


@pytest.mark.parametrize("learnable", [False, True])
def test_elbo_is_the_expected_log_ratio_of_the_joint_to_the_posterior(learnable):
    """E_q[log p(x,z₁,z₂) − log q(z₁,z₂|x)] by brute force (every term sampled) equals the mean
    of the model's partly closed-form estimate: the decomposition is the ELBO itself."""
    model = _model(learnable_sigma_1=learnable, eta_enc=0.8, eta_dec=0.9, sigma_1=0.5)
    x = torch.randn(8, 6).repeat(4000, 1)
    torch.manual_seed(5)
    with torch.no_grad():
        out = model(x)
        estimate = (out["log_px"] - out["kl_z1"].sum(-1) - out["kl_z2"].sum(-1)).double()
        q1, z1, q2, z2 = _draw(model, x)
        brute = (_log_px(model, x, z1) + _p_z1(model, z2).log_prob(z1).sum(-1)
                 + Normal(0.0, model.eta_enc).log_prob(z2).sum(-1)
                 - q1.log_prob(z1).sum(-1) - q2.log_prob(z2).sum(-1)).double()
    stderr = math.sqrt(float(estimate.var() + brute.var()) / len(x))
    assert abs(float(estimate.mean() - brute.mean())) < 4 * stderr


# --------------------------------------------------------------------------------------- IW-NLL
def test_iw_nll_with_one_sample_is_the_negative_one_sample_elbo():
    model = _model(eta_enc=0.9, eta_dec=0.6, sigma_1=0.4)
    x = torch.randn(7, 6)
    torch.manual_seed(11)
    nll = model.iw_nll(x, num_samples=1)
    torch.manual_seed(11)
    with torch.no_grad():
        q1, z1, q2, z2 = _draw(model, x)
        elbo = (_log_px(model, x, z1) + _p_z1(model, z2).log_prob(z1).sum(-1)
                + Normal(0.0, 0.9).log_prob(z2).sum(-1)
                - q1.log_prob(z1).sum(-1) - q2.log_prob(z2).sum(-1))
    assert nll.dtype == torch.float64 and nll.shape == (7,)
    assert torch.allclose(nll, -elbo.double(), rtol=1e-5)


def _exact_nll(model, x):
    """−log p(x) of the affine-Gaussian model: z₂ ~ N(0, η_enc²I), z₁ = A₂z₂ + b₂ + η_dec·ε,
    x = A₁z₁ + b₁ + σ·ε, so x ~ N(A₁b₂ + b₁, A₁(η_enc²A₂A₂ᵀ + η_dec²I)A₁ᵀ + σ²I)."""
    (l1,), (l2,) = model.decoder.net, model.decoder_z1.net
    a1, b1, a2, b2 = (t.detach().double() for t in (l1.weight, l1.bias, l2.weight, l2.bias))
    cov_z1 = model.eta_enc**2 * a2 @ a2.T + model.eta_dec**2 * torch.eye(len(b2)).double()
    cov = a1 @ cov_z1 @ a1.T + float(model.decoder.likelihood.variance) * torch.eye(len(b1))
    return -MultivariateNormal(a1 @ b2 + b1, cov.double()).log_prob(x.double())


def test_iw_nll_decreases_with_k_towards_the_exact_marginal_likelihood():
    x = _data()
    torch.manual_seed(0)
    model = _train(HierarchicalVAE(data_shape=(6,), latent_dim=5, sigma_1=0.6, **AFFINE), x,
                   steps=200)
    exact = float(_exact_nll(model, x).mean())
    torch.manual_seed(0)
    nll = {k: float(model.iw_nll(x, num_samples=k).mean()) for k in (1, 10, 300)}
    assert nll[1] > nll[10] > nll[300] >= exact - 0.01
    assert nll[300] - exact < 0.25 * (nll[1] - exact)


# ----------------------------------------------------------------- linear theory, both regimes
def _train(model, x, steps=500, lr=2e-2):
    """Full-batch Adam with a cosine schedule on the one-sample loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr * 1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model.loss(x)[0].backward()
        optimizer.step()
        schedule.step()
    return model


@pytest.mark.parametrize("sigma_1,predicted", [(0.4, 4), (1.2, 0)])
def test_affine_hvae_collapses_the_z2_dimensions_the_closed_form_predicts(sigma_1, predicted):
    """σ₁ = 0.4: σ₁² < (β₂/β₁)η_dec² = 1 and θ_i ≤ β₂η_dec²/(√β₁σ₁) = 2.5 for four of the
    five θ = (3, 2, 1.2, 0.5, 0.25): four z₂ dimensions collapse. σ₁ = 1.2: σ₁² ≥ 1, none."""
    x = _data()
    torch.manual_seed(0)
    model = _train(HierarchicalVAE(data_shape=(6,), latent_dim=5, sigma_1=sigma_1, **AFFINE), x)
    torch.manual_seed(0)
    linear = fit_full_batch(LinearHVAE(data_shape=(6,), latent_dim=5, sigma_1=sigma_1), x)
    prediction = linear.theory_prediction(x)
    assert (sigma_1**2 < 1.0) == (predicted > 0)
    assert prediction.num_collapsed == predicted
    assert int(linear.measured_collapse(x).sum()) == predicted
    torch.manual_seed(1)
    kl = model.kl_per_dimension(x, num_samples=20)
    assert int(model.measured_collapse(x, num_samples=20).sum()) == predicted
    assert int((kl < 0.01).sum()) == predicted
    # Not only the count: the total z₂ KL is the closed-form optimum's (nonzero in both cases).
    assert float(kl.sum()) == pytest.approx(float(prediction.kl.sum()), rel=0.1)


def test_active_units_are_the_posterior_mean_variances_above_the_threshold():
    model = _model()
    x = torch.randn(200, 6)
    with torch.no_grad():
        mu1 = model.encoder(x).loc
        mu2 = model.encoder_z2(mu1).loc
    variances = mu1.var(0).sort().values
    threshold = float(variances[1:3].mean())  # two units below it, two above
    counts = model.active_units(x, threshold=threshold)
    assert counts == {"z1": int((mu1.var(0) > threshold).sum()),
                      "z2": int((mu2.var(0) > threshold).sum())}
    assert counts["z1"] == 2


# ----------------------------------------------------------------------- configuration, Lightning
@pytest.mark.parametrize("field,value", [
    ("beta_1", -1.0), ("beta_2", float("nan")), ("eta_enc", 0.0), ("eta_dec", -0.5),
    ("sigma_1", 0.0), ("latent_dim", 0), ("latent_dim_2", 1.5), ("hidden_2", [0]),
    ("activation_2", "nope"), ("learnable_sigma_1", "yes"), ("num_iw_samples", -1),
    ("eps", 0.0), ("decoder", "nosuch")])
def test_bad_configuration_is_a_one_line_error_naming_the_field(field, value):
    with pytest.raises(ConfigurationError) as error:
        HierarchicalVAE(**{"data_shape": (6,), "latent_dim": 3, field: value})
    message = str(error.value)
    assert field in message and "\n" not in message


def test_training_logs_both_levels_and_the_checkpoint_rebuilds_the_model(tmp_path):
    dm = LinearGaussianData(spectrum=SPECTRUM, data_dim=6, num_samples=200, batch_size=50,
                            val_fraction=0.25)
    model = _model(num_iw_samples=5, eps=0.05)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(model, dm)
    logged = trainer.callback_metrics
    for name in ("train/loss", "train/kl_z1", "train/kl_z2", "train/elbo", "train/beta_1",
                 "train/beta_2", "val/kl_z1", "val/kl_z2", "val/iw_nll",
                 "val/active_units_z1", "val/active_units_z2", "val/epsilon_collapsed_z2"):
        assert name in logged, name
    per_dim = torch.stack([logged[f"val/kl_z2_per_dim/{j}"] for j in range(3)])
    # The per-dimension KLs come from the same samples as val/kl_z2, averaged the same way.
    assert float(per_dim.sum()) == pytest.approx(float(logged["val/kl_z2"]), rel=1e-4)
    assert int(logged["val/epsilon_collapsed_z2"]) == int((per_dim < 0.05).sum())
    assert float(logged["val/elbo"]) == pytest.approx(
        -(float(logged["val/recon"]) + float(logged["val/kl"])), rel=1e-5)

    trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = HierarchicalVAE.load_from_checkpoint(tmp_path / "model.ckpt")
    assert dict(loaded.hparams) == dict(model.hparams)
    assert loaded.decoder.config == model.decoder.config and loaded.decoder.hidden == [16]
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    x = dm.tensors("val")[0]
    results = []
    for m in (model, loaded):
        m.eval()
        torch.manual_seed(2)
        results.append((m.loss(x)[0], m.iw_nll(x, num_samples=3)))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
