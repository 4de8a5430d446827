"""The conditional VAE: its loss equals the β-ELBO computed by hand, and a trained linear CVAE
collapses exactly the latent dimensions the closed form of Dang et al. (2024) predicts, with the
predicted decoder singular values.

The closed form used here is derived (and checked by brute-force minimisation below) as follows.
Write u = [x; y] and r = y − A x with A = E[yxᵀ]E[xxᵀ]⁻¹, so E[r xᵀ] = 0 and E[r rᵀ] = E. Any
encoder mean W₁x + W₂y equals Bx + Cr for some B, C, and the reconstruction error splits as

    E‖y − U₁μ − U₂x‖² = E‖(I − U₁C) r‖² + E‖(A − U₁B − U₂) x‖²,

the cross term vanishing because r and x are uncorrelated. U₂ = A − U₁B removes the second term,
and B = 0 lowers the KL term (E μ_i² = E(Bx)_i² + E(Cr)_i²). What is left is the β-ELBO of a
linear VAE with learnable diagonal encoder variance on data r with second moment E, whose global
optimum is probabilistic PCA with noise variance β η_dec² in the units of a prior N(0, η_enc² I)
(Lucas et al. 2019): with θ_i the eigenvalues of E, latent i collapses iff θ_i < β η_dec² and U₁
has singular values ω_i = (1/η_enc)·√max(0, θ_i − β η_dec²).
"""

import functools
import math
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ilvae import cli
from ilvae.datamodules.conditional import LinearConditionalData
from ilvae.errors import ConfigurationError
from ilvae.models.conditional import ConditionalVAE

REPO = Path(__file__).resolve().parents[2]


def closed_form(x, y, beta, eta_dec, eta_enc):
    """(θ descending, number of collapsed latents, ω descending) from the data's moments."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    n = len(x)
    sxx, sxy, syy = x.T @ x / n, x.T @ y / n, y.T @ y / n
    e = syy - sxy.T @ torch.linalg.solve(sxx, sxy)
    theta = torch.linalg.eigvalsh(e).flip(0)
    tau = beta * eta_dec**2
    return theta, int((theta < tau).sum()), (theta - tau).clamp(min=0).sqrt() / eta_enc


def _model(**kw):
    torch.manual_seed(0)
    args = {"data_shape": (3,), "target_shape": (5,), "latent_dim": 2, "hidden": [8]} | kw
    return ConditionalVAE(**args)


def _batch(n=6, dx=3, dy=5):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, dx, generator=g), torch.randn(n, dy, generator=g), torch.full((n,), -1)


def _step(model, batch):
    with warnings.catch_warnings():  # self.log without a Trainer only warns
        warnings.simplefilter("ignore")
        return model.training_step(batch, 0)["loss"]


# -- the loss -------------------------------------------------------------------------------------


def test_encode_and_decode_have_the_documented_shapes():
    model = _model()
    x, y, _ = _batch()
    posterior = model.encode(x, y)
    assert isinstance(posterior, Normal) and posterior.loc.shape == (6, 2)
    assert model.decode(posterior.loc, x).shape == (6, 5)
    assert model.reconstruct(x, y).shape == model.predict(x).shape == model.sample(x).shape
    assert model.target_shape == (5,) and model.data_shape == (3,)


def test_loss_equals_hand_computed_beta_elbo_with_standard_prior():
    model = _model(beta=0.7, eta_dec=0.3, eta_enc=1.5)
    x, y, label = _batch()
    torch.manual_seed(3)
    loss = _step(model, (x, y, label))
    # Independent computation: Gaussian log-likelihood written out, KL by torch.distributions,
    # both summed over dimensions and averaged over the batch.
    torch.manual_seed(3)
    posterior = model.encoder(torch.cat([x, y], 1))
    z = posterior.rsample()
    mean = model.decoder(torch.cat([z, x], 1))
    log_py = (-0.5 * ((y - mean) / 0.3) ** 2 - math.log(0.3) - 0.5 * math.log(2 * math.pi)).sum(1)
    kl = kl_divergence(posterior, Normal(torch.zeros(2), torch.full((2,), 1.5))).sum(1)
    assert torch.allclose(loss, (-log_py + 0.7 * kl).mean(), atol=1e-5)


def test_learned_prior_kl_is_the_closed_form_between_diagonal_gaussians():
    model = _model(prior="learned", beta=2.0)
    x, y, label = _batch()
    torch.manual_seed(4)
    out = model(x, y)
    q, p = model.encoder(torch.cat([x, y], 1)), model.prior(x)
    s, r = q.scale, p.scale
    kl = torch.log(r / s) + (s**2 + (q.loc - p.loc) ** 2) / (2 * r**2) - 0.5
    assert torch.allclose(out["kl"], kl, atol=1e-6)
    assert not torch.allclose(p.loc, torch.zeros_like(p.loc))  # a function of x, not N(0, I)
    torch.manual_seed(4)
    loss = _step(model, (x, y, label))
    log_py = (-0.5 * (y - model.decoder(torch.cat([out["z"], x], 1))) ** 2
              - 0.5 * math.log(2 * math.pi)).sum(1)
    assert torch.allclose(loss, (-log_py + 2.0 * kl.sum(1)).mean(), atol=1e-5)


def test_linear_variant_is_dangs_linear_cvae():
    model = _model(linear=True, eta_enc=0.5)
    x, y, _ = _batch()
    assert not [n for n, _ in model.named_parameters() if "bias" in n]
    w = model.encoder.weight.weight
    posterior = model.encode(x, y)
    assert torch.allclose(posterior.loc, torch.cat([x, y], 1) @ w.T, atol=1e-6)
    assert torch.equal(posterior.scale, posterior.scale[:1].expand(6, 2))  # input-independent
    assert torch.allclose(posterior.scale[0], torch.full((2,), 0.5))
    u = model.decoder.weight.weight
    u1, u2 = u[:, :2], u[:, 2:]
    z = torch.randn(6, 2)
    assert torch.allclose(model.decode(z, x), z @ u1.T + x @ u2.T, atol=1e-6)
    assert torch.allclose(model.decoder_singular_values(), torch.linalg.svdvals(u1.double()))


def test_kl_per_dimension_and_measured_collapse_use_the_closed_form_kl():
    model = _model(eta_enc=2.0)
    x, y, _ = _batch()
    q = model.encode(x, y)
    expected = kl_divergence(q, Normal(0.0, 2.0)).detach().double().mean(0)
    assert torch.allclose(model.kl_per_dimension(x, y), expected, atol=1e-6)
    eps = float(expected.mean())
    assert torch.equal(model.measured_collapse(x, y, eps=eps), expected < eps)
    with pytest.raises(ValueError, match="needs data"):
        model.measured_collapse()
    with pytest.raises(ValueError, match="both x and y"):
        model.measured_collapse(x)


# -- configuration --------------------------------------------------------------------------------


def test_hparams_rebuild_an_identical_model():
    for kw in ({"linear": True, "prior": "learned"}, {"decoder": "mlp"}, {"eta_dec": 0.2}):
        model = _model(**kw)
        rebuilt = ConditionalVAE(**model.hparams)
        rebuilt.load_state_dict(model.state_dict())
        x, y, _ = _batch()
        z = torch.randn(6, 2)
        assert torch.equal(model.decode(z, x), rebuilt.decode(z, x))
        assert torch.equal(model.encode(x, y).loc, rebuilt.encode(x, y).loc)


def test_a_plugin_decoder_sees_z_and_x():
    model = _model(decoder={"class_path": "mlp", "init_args": {"likelihood": "gaussian"}})
    assert model.decoder.latent_dim == 2 + 3 and model.decoder.data_dim == 5
    assert model.eta_dec is None
    with pytest.raises(ValueError, match="linear=True"):
        model.decoder_singular_values()


@pytest.mark.parametrize(("kw", "field"), [
    ({"prior": "flat"}, "prior"),
    ({"prior": "learned", "eta_enc": 2.0}, "eta_enc"),
    ({"decoder": "mlp", "eta_dec": 0.5}, "eta_dec"),
    ({"linear": True, "decoder": "mlp"}, "linear"),
    ({"beta": -1.0}, "beta"),
    ({"eta_dec": 0.0}, "eta_dec"),
    ({"target_shape": ()}, "target_shape"),
    ({"likelihood": "poisson"}, "poisson"),
])
def test_bad_configuration_names_the_field(kw, field):
    with pytest.raises(ConfigurationError, match=field):
        _model(**kw)


def test_batches_without_targets_are_rejected():
    model = _model()
    with pytest.raises(ConfigurationError, match="target_shape"):
        _step(model, (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)))


# -- the closed form, by brute force --------------------------------------------------------------


def _expected_loss(params, moment, dx, beta, eta_dec, eta_enc):
    """β-ELBO loss of the linear CVAE in expectation over data with E[uuᵀ] = moment, u = [x; y],
    up to constants: (E‖y − U₁μ − U₂x‖² + tr(U₁ diag(s²) U₁ᵀ)) / (2η_dec²) + β Σ_i KL_i."""
    w, log_s, u1, u2 = params
    d = moment.shape[0]
    select_y = torch.eye(d, dtype=moment.dtype)[dx:]
    g = select_y - u1 @ w - u2 @ torch.eye(d, dtype=moment.dtype)[:dx]
    s2 = torch.exp(2 * log_s)
    recon = torch.trace(g @ moment @ g.T) + torch.trace(u1 @ torch.diag(s2) @ u1.T)
    ratio = s2 / eta_enc**2
    kl = 0.5 * (torch.diagonal(w @ moment @ w.T) / eta_enc**2 + ratio - torch.log(ratio) - 1)
    return recon / (2 * eta_dec**2) + beta * kl.sum(), kl


@pytest.mark.parametrize(("beta", "eta_dec", "eta_enc", "collapsed"), [
    (0.1, 1.0, 1.0, 0), (1.0, 0.5, 2.0, 1), (0.5, 1.0, 0.7, 2), (1.0, 1.0, 1.0, 3),
    (1.0, 2.0, 1.5, 4)])
def test_closed_form_agrees_with_brute_force_minimisation(beta, eta_dec, eta_enc, collapsed):
    dx, dy, m = 3, 4, 4
    g = torch.Generator().manual_seed(7)
    a = torch.randn(dx + dy, dx + dy, generator=g, dtype=torch.float64)
    moment = a @ a.T / (dx + dy) + 0.1 * torch.eye(dx + dy, dtype=torch.float64)
    sxx, sxy, syy = moment[:dx, :dx], moment[:dx, dx:], moment[dx:, dx:]
    theta = torch.linalg.eigvalsh(syy - sxy.T @ torch.linalg.solve(sxx, sxy)).flip(0)
    tau = beta * eta_dec**2
    omega = (theta - tau).clamp(min=0).sqrt() / eta_enc
    torch.manual_seed(0)
    params = [torch.randn(m, dx + dy, dtype=torch.float64).mul_(0.3).requires_grad_(),
              torch.zeros(m, dtype=torch.float64, requires_grad=True),
              torch.randn(dy, m, dtype=torch.float64).mul_(0.3).requires_grad_(),
              torch.randn(dy, dx, dtype=torch.float64).mul_(0.3).requires_grad_()]
    opt = torch.optim.LBFGS(params, lr=1, max_iter=200, tolerance_grad=1e-12,
                            tolerance_change=1e-15, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _expected_loss(params, moment, dx, beta, eta_dec, eta_enc)[0]
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        _, kl = _expected_loss(params, moment, dx, beta, eta_dec, eta_enc)
        sv = torch.linalg.svdvals(params[2])
    assert int((theta < tau).sum()) == collapsed  # θ = 3.58, 0.65, 0.37, 0.15: the grid crosses
    assert torch.allclose(sv, omega, atol=1e-4), (sv, omega)
    assert int((kl < 1e-6).sum()) == collapsed


def test_independent_closed_form_agrees_with_ilvae_theory():
    dm = LinearConditionalData(correlation=0.6, num_samples=3000, val_fraction=0.0)
    x, y, _ = dm.tensors("train")
    for beta, eta_dec, eta_enc in ((1.0, 1.0, 1.0), (0.25, 1.0, 2.0), (4.0, 0.5, 0.5)):
        theta, collapsed, omega = closed_form(x, y, beta, eta_dec, eta_enc)
        model = _model(data_shape=(4,), target_shape=(4,), latent_dim=4, linear=True,
                       beta=beta, eta_dec=eta_dec, eta_enc=eta_enc)
        pred = model.theory_prediction(x, y)
        assert torch.allclose(pred.theta.double(), theta, rtol=1e-6)
        assert int(pred.collapsed.sum()) == collapsed
        assert torch.allclose(pred.singular_values.double(), omega, rtol=1e-6, atol=1e-9)
    with pytest.raises(NotImplementedError, match="linear=True"):
        _model().theory_prediction(torch.randn(4, 3), torch.randn(4, 5))


# -- a trained linear CVAE reproduces the closed form ---------------------------------------------

# variances 8, 2, 0.5, 0.125 with thresholds β η_dec² at 1/16, 1/4, 1, 4, 16 put every
# eigenvalue of E a factor ≥ 1.28 away from the threshold, so no case sits on the boundary.
# Training time grows as the threshold shrinks: the rotation of the active latents into the
# eigenbasis of E is driven by the posterior variances, s_i² = η_enc² β η_dec²/θ_i, which are small
# then. Measured with this set-up: at β η_dec² ≥ 1, 400 steps give ω within 1%; at 1/4 (ρ = 0),
# 400 steps leave the two largest ω mixed (2.50, 1.56 against 2.82, 1.33) and 1500 steps give
# 0.1%; at 1/16, 1500 steps still miss the weakest mode (collapsed instead of ω = 0.14) and
# 5000 steps give 0.2%. The fast tests use thresholds ≥ 1; the slow grid covers the others with
# the longer budgets.
STEPS, LR, N = 400, 0.05, 4000


@functools.cache
def _trained(rho, beta, eta_dec, eta_enc):
    dm = LinearConditionalData(correlation=rho, num_samples=N, val_fraction=0.0, seed=0)
    x, y, label = dm.tensors("train")
    torch.manual_seed(0)
    model = ConditionalVAE(data_shape=dm.data_shape, target_shape=dm.target_shape, latent_dim=4,
                           linear=True, beta=beta, eta_dec=eta_dec, eta_enc=eta_enc)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=LR * 1e-3)
    for i in range(STEPS):  # full batch: the exact empirical objective up to the sampled z
        opt.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = model.training_step((x, y, label), i)["loss"]
        loss.backward()
        opt.step()
        schedule.step()
    return model, x, y


def _check_against_closed_form(model, x, y, beta, eta_dec, eta_enc):
    theta, collapsed, omega = closed_form(x, y, beta, eta_dec, eta_enc)
    measured = int(model.measured_collapse(x, y, eps=0.01).sum())
    sv = model.decoder_singular_values()
    active = omega > 0
    scale = math.sqrt(float(theta[0])) / eta_enc  # largest possible ω
    report = f"θ={theta.numpy().round(3)} ω={omega.numpy().round(4)} ω̂={sv.numpy().round(4)}"
    assert measured == collapsed, report
    assert torch.allclose(sv[active], omega[active], rtol=0.05, atol=0), report
    assert bool((sv[~active] < 0.03 * scale).all()), report
    return collapsed


FAST_GRID = [  # (β, η_dec, η_enc) → β η_dec² = 1, 4, 16 at ρ = 0: 2, 3 and 4 collapsed latents
    (1.0, 1.0, 1.0), (4.0, 1.0, 2.0), (1.0, 4.0, 1.0)]


@pytest.mark.parametrize(("beta", "eta_dec", "eta_enc"), FAST_GRID)
def test_trained_linear_cvae_matches_closed_form(beta, eta_dec, eta_enc):
    model, x, y = _trained(0.0, beta, eta_dec, eta_enc)
    _check_against_closed_form(model, x, y, beta, eta_dec, eta_enc)


def test_stronger_correlation_collapses_more_latents():
    counts = []
    for rho in (0.0, 0.866, 0.968):
        model, x, y = _trained(rho, 1.0, 1.0, 1.0)
        counts.append(_check_against_closed_form(model, x, y, 1.0, 1.0, 1.0))
    assert counts == [2, 3, 4]


# -- the full Lightning path ----------------------------------------------------------------------


def _fit_with_trainer(rho, beta, eta_dec, eta_enc, epochs, n=5000):
    dm = LinearConditionalData(correlation=rho, num_samples=n, val_fraction=0.2,
                               batch_size=int(0.8 * n), seed=0)
    torch.manual_seed(0)
    model = ConditionalVAE(
        data_shape=dm.data_shape, target_shape=dm.target_shape, latent_dim=4, linear=True,
        beta=beta, eta_dec=eta_dec, eta_enc=eta_enc,
        optimizer=lambda p: torch.optim.Adam(p, lr=LR),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(
            o, T_max=epochs, eta_min=LR * 1e-3))
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        check_val_every_n_epoch=max(1, epochs // 2), accelerator="cpu",
                        num_sanity_val_steps=0)
    trainer.fit(model, dm)
    return model, dm, trainer


def test_trainer_fit_logs_the_elbo_terms_and_collapse():
    model, dm, trainer = _fit_with_trainer(0.6, 1.0, 1.0, 1.0, epochs=4, n=400)
    logged = trainer.callback_metrics
    for name in ("train/loss", "train/recon", "train/kl", "train/elbo", "train/beta",
                 "val/loss", "val/recon", "val/kl", "val/elbo", "val/epsilon_collapsed"):
        assert name in logged, name
    assert float(logged["val/elbo"]) == pytest.approx(
        -(float(logged["val/recon"]) + float(logged["val/kl"])), rel=1e-5)
    x, y, _ = dm.tensors("val")
    assert torch.allclose(model.kl_per_dim, model.kl_per_dimension(x, y), atol=1e-5)
    assert float(logged["val/epsilon_collapsed"]) == int(model.measured_collapse().sum())


def test_fit_rejects_a_datamodule_without_targets():
    from ilvae.datamodules import TwoGaussians

    model = _model(data_shape=(2,))
    with pytest.raises(ConfigurationError, match="conditional datamodule"):
        model.check_data(TwoGaussians(num_samples=20))


SLOW_GRID = [  # (ρ, β, η_dec, η_enc, epochs): thresholds 1/16 … 16 at ρ = 0.6, then ρ at β = η = 1
    (0.6, 1.0, 0.25, 1.0, 5000), (0.6, 0.25, 1.0, 1.0, 1500), (0.6, 1.0, 0.5, 2.0, 1500),
    (0.6, 1.0, 1.0, 1.0, 400), (0.6, 0.25, 2.0, 2.0, 400), (0.6, 4.0, 1.0, 1.0, 400),
    (0.6, 1.0, 2.0, 0.5, 400), (0.6, 16.0, 1.0, 1.0, 400),
    (0.0, 1.0, 1.0, 1.0, 400), (0.5, 1.0, 1.0, 1.0, 400), (0.866, 1.0, 1.0, 1.0, 400),
    (0.968, 1.0, 1.0, 1.0, 400), (0.99, 1.0, 1.0, 1.0, 400)]


@pytest.mark.slow
@pytest.mark.parametrize(("rho", "beta", "eta_dec", "eta_enc", "epochs"), SLOW_GRID)
def test_trainer_fit_matches_closed_form_on_a_wide_grid(rho, beta, eta_dec, eta_enc, epochs):
    model, dm, _ = _fit_with_trainer(rho, beta, eta_dec, eta_enc, epochs=epochs)
    x, y, _ = dm.tensors("train")
    collapsed = _check_against_closed_form(model, x, y, beta, eta_dec, eta_enc)
    # the collapse seen on held-out pairs at the last validation epoch is the same
    assert int(model.measured_collapse().sum()) == collapsed


@pytest.mark.slow
def test_slow_grid_counts_grow_with_threshold_and_correlation():
    counts = {}
    for rho, beta, eta_dec, eta_enc, _ in SLOW_GRID:
        dm = LinearConditionalData(correlation=rho, num_samples=5000, val_fraction=0.2, seed=0)
        x, y, _ = dm.tensors("train")
        counts[rho, beta * eta_dec**2] = closed_form(x, y, beta, eta_dec, eta_enc)[1]
    by_tau = [counts[0.6, tau] for tau in (1 / 16, 1 / 4, 1, 4, 16)]
    by_rho = [counts[rho, 1.0] for rho in (0.0, 0.5, 0.6, 0.866, 0.968, 0.99)]
    assert by_tau == [0, 1, 2, 3, 4] and by_rho == [2, 2, 2, 3, 4, 4]


# -- configs through the CLI ----------------------------------------------------------------------


class _LinkedCLI(cli.ILVAECLI):
    """The CLI with the target-shape link this model needs (harmless if already present)."""

    def add_arguments_to_parser(self, parser):
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.target_shape", "model.init_args.target_shape",
                              apply_on="instantiate")


FAST_CLI = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.logger=false"]


def test_linear_cvae_config_runs_with_the_shapes_linked(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "ILVAECLI", _LinkedCLI)
    config = str(REPO / "configs" / "conditional" / "linear_cvae.yaml")
    run = cli.run(["fit", "--config", config, f"--trainer.default_root_dir={tmp_path}",
                   "--data.num_samples=300", *FAST_CLI])
    model, dm = run.model, run.datamodule
    assert isinstance(model, ConditionalVAE) and model.linear
    assert model.data_shape == dm.data_shape and model.target_shape == dm.target_shape


def test_mnist_quarters_config_runs_on_local_idx_files(tmp_path, monkeypatch):
    import gzip
    import struct

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 10)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28))),
                            ("labels-idx1", rng.integers(0, 10, n))):
            header = struct.pack(">I", {3: 2051, 1: 2049}[array.ndim])
            header += struct.pack(f">{array.ndim}I", *array.shape)
            with gzip.open(raw / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + array.astype(np.uint8).tobytes())
    monkeypatch.setattr(cli, "ILVAECLI", _LinkedCLI)
    config = str(REPO / "configs" / "conditional" / "cvae_mnist_quarters.yaml")
    run = cli.run(["fit", "--config", config, f"--trainer.default_root_dir={tmp_path}",
                   f"--data.root={tmp_path}", "--data.download=false", "--data.subsample=null",
                   "--data.batch_size=8", *FAST_CLI])
    assert run.model.data_shape == (1, 14, 14) and run.model.target_shape == (588,)
