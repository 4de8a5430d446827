"""LinearTheoryMonitor logs the predicted and measured collapse counts, their agreement and the
decoder singular values' deviation, checked against a direct computation from the training data
and the final weights; the shipped configs train to the predicted collapse."""

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.distributions import Normal, kl_divergence

from ilvae.callbacks.linear_theory import LinearTheoryMonitor
from ilvae.cli import run
from ilvae.datamodules.synthetic import LinearGaussianData
from ilvae.errors import ConfigurationError
from ilvae.models import VAE
from ilvae.models.linear import LinearHVAE, LinearVAE

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
SPECTRUM = [3.0, 2.0, 1.2, 0.5, 0.25]


def _dm():
    return LinearGaussianData(spectrum=SPECTRUM, data_dim=6, num_samples=500, batch_size=500,
                              val_fraction=0.1, seed=1)


def _trainer(tmp_path, epochs, callbacks, logger=False):
    return L.Trainer(max_epochs=epochs, default_root_dir=tmp_path, callbacks=callbacks,
                     logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, log_every_n_steps=1)


def _theta(x):
    x = x.double()
    a = x.T @ x / len(x)
    return torch.linalg.eigvalsh(a).flip(0).clamp(min=0).sqrt()


def _sv_error(measured, predicted):
    measured = measured.sort(descending=True).values
    predicted = predicted.sort(descending=True).values
    return float((measured - predicted).abs().max() / predicted.max())


def _assert_logged(logged, predicted, measured, error, latent_dim):
    assert float(logged["val/predicted_collapsed"]) == predicted
    assert float(logged["val/measured_collapsed"]) == measured
    agreement = 1 - abs(predicted - measured) / latent_dim
    assert math.isclose(float(logged["val/collapse_agreement"]), agreement, abs_tol=1e-6)
    assert math.isclose(float(logged["val/singular_value_error"]), error, rel_tol=1e-4,
                        abs_tol=1e-6)


def test_vae_values_equal_a_direct_computation_on_the_training_data(tmp_path):
    torch.manual_seed(0)
    dm = _dm()
    beta, eta_enc, eta_dec = 1.5, 0.8, 1.0
    # Few Adam steps: the model is still on its way, so the numbers are not trivially 1 and 0.
    model = LinearVAE(data_shape=(6,), latent_dim=5, beta=beta, eta_enc=eta_enc, eta_dec=eta_dec,
                      optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    monitor = LinearTheoryMonitor(eps=0.05)
    trainer = _trainer(tmp_path, 25, [monitor])
    trainer.fit(model, dm)

    x, _ = dm.tensors("fit")
    theta = _theta(x)[:5]
    predicted = int((theta <= math.sqrt(beta) * eta_dec).sum())
    with torch.no_grad():
        q = Normal(x @ model.encoder.weight.T, model.encoder.log_scale.exp())
        kl = kl_divergence(q, Normal(0.0, eta_enc)).mean(0)
    measured = int((kl < 0.05).sum())
    omega_pred = (theta**2 - beta * eta_dec**2).clamp(min=0).sqrt() / eta_enc
    error = _sv_error(torch.linalg.svdvals(model.decoder.weight.detach().double()), omega_pred)
    _assert_logged(trainer.callback_metrics, predicted, measured, error, 5)
    assert predicted == 3 and error > 1e-3  # not converged yet: a real comparison
    assert monitor.last["predicted_collapsed"] == predicted


def test_hvae_values_use_the_z2_dimensions_and_the_z2_decoder(tmp_path):
    torch.manual_seed(1)
    dm = _dm()
    b1, b2, eta_enc, eta_dec, s1 = 1.0, 1.0, 1.0, 1.0, 0.6
    model = LinearHVAE(data_shape=(6,), latent_dim=5, latent_dim_2=4, beta_1=b1, beta_2=b2,
                       eta_enc=eta_enc, eta_dec=eta_dec, sigma_1=s1,
                       optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    trainer = _trainer(tmp_path, 25, [LinearTheoryMonitor()])
    trainer.fit(model, dm)

    x, _ = dm.tensors("fit")
    theta = _theta(x)[:4]
    a0 = b2 / b1 * eta_dec**2
    collapsed = (s1**2 < a0) & (s1**2 * theta**2 / (b2 * eta_dec**2) < a0)
    with torch.no_grad():
        w2 = model.encoder_z2.weight.double()
        mu2 = x.double() @ model.encoder.weight.double().T @ w2.T
        mean_sq = (mu2**2).mean(0) + s1**2 * (w2**2).sum(1)
        ratio = model.encoder_z2.log_scale.double().exp() ** 2 / eta_enc**2
        kl = 0.5 * (mean_sq / eta_enc**2 + ratio - ratio.log() - 1)
        v = model.decoder_z1.weight.double()
    # predicted ω of z₂ → z₁ from the case analysis of METHODS §6 (here σ₁² < a₀)
    a_star = torch.where(collapsed, torch.clamp(theta * s1 / math.sqrt(b1), min=s1**2),
                         theta**2 * s1**2 / (b2 * eta_dec**2))
    omega_pred = ((a_star - a0).clamp(min=0)).sqrt() / eta_enc
    error = _sv_error(torch.linalg.svdvals(v), omega_pred)
    _assert_logged(trainer.callback_metrics, int(collapsed.sum()), int((kl < 0.01).sum()),
                   error, 4)


def test_logs_only_every_n_validation_epochs(tmp_path):
    torch.manual_seed(0)
    logger = CSVLogger(tmp_path)
    model = LinearVAE(data_shape=(6,), latent_dim=5)
    trainer = _trainer(tmp_path, 5, [LinearTheoryMonitor(every_n_epochs=2)], logger=logger)
    trainer.fit(model, _dm())
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/collapse_agreement")]
    assert [int(r["epoch"]) for r in rows] == [0, 2, 4]


def test_rejects_models_without_a_closed_form(tmp_path):
    dm = _dm()
    vae = VAE(data_shape=(6,), latent_dim=2, decoder={"class_path": "mlp",
                                                      "init_args": {"likelihood": "gaussian"}})
    with pytest.raises(ConfigurationError, match="theory_prediction"):
        _trainer(tmp_path, 1, [LinearTheoryMonitor()]).fit(vae, dm)
    hvae = LinearHVAE(data_shape=(6,), latent_dim=2, learnable_sigma_1=True)
    with pytest.raises(ConfigurationError, match="sigma_1"):
        _trainer(tmp_path, 1, [LinearTheoryMonitor()]).fit(hvae, dm)
    with pytest.raises(ValueError, match="every_n_epochs"):
        LinearTheoryMonitor(every_n_epochs=0)


def _fit_config(root, config, epochs):
    cli = run(["fit", "--config", str(REPO / "configs" / "linear" / config),
               f"--trainer.default_root_dir={root}", f"--trainer.max_epochs={epochs}",
               "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    return cli.trainer.callback_metrics


@pytest.mark.parametrize("config,collapsed", [("linear_vae.yaml", 4), ("linear_hvae.yaml", 5)])
def test_shipped_configs_run_and_log_the_comparison(tmp_path, config, collapsed):
    logged = _fit_config(tmp_path, config, 5)
    assert float(logged["val/predicted_collapsed"]) == collapsed
    for name in ("measured_collapsed", "collapse_agreement", "singular_value_error"):
        assert math.isfinite(float(logged[f"val/{name}"]))


@pytest.mark.slow
@pytest.mark.parametrize("config,collapsed", [("linear_vae.yaml", 4), ("linear_hvae.yaml", 5)])
def test_shipped_configs_train_to_the_predicted_collapse(tmp_path, config, collapsed):
    logged = _fit_config(tmp_path, config, 20)
    assert float(logged["val/predicted_collapsed"]) == collapsed
    assert float(logged["val/measured_collapsed"]) == collapsed
    assert float(logged["val/collapse_agreement"]) == 1.0
    assert float(logged["val/singular_value_error"]) < 0.01
