"""CollapseMonitor logs the collapse metrics of the whole validation set; checked against a
direct computation on the final model."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ilvae.callbacks import CollapseMonitor
from ilvae.cli import main
from ilvae.datamodules import Digits
from ilvae.models import VAE

REPO = Path(__file__).resolve().parents[2]


def test_logged_metrics_equal_a_direct_computation_on_the_validation_set(tmp_path):
    torch.manual_seed(0)
    dm = Digits(batch_size=50)
    model = VAE(data_shape=dm.data_shape, latent_dim=6, beta=4.0,
                encoder={"class_path": "ilvae.encoders.MLPEncoder",
                         "init_args": {"hidden": [32]}},
                decoder={"class_path": "mlp", "init_args": {"hidden": [32]}})
    monitor = CollapseMonitor(num_iw_samples=8, max_examples=None)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=5, default_root_dir=tmp_path,
                        callbacks=[monitor], enable_progress_bar=False,
                        enable_model_summary=False, logger=False, enable_checkpointing=False)
    trainer.fit(model, dm)
    logged = trainer.callback_metrics

    x, _ = dm.tensors("val")
    model.eval()
    with torch.no_grad():
        posterior = model.encode(x)
    loc = posterior.loc.double().numpy()
    expected_au = int((np.var(loc, axis=0, ddof=1) > 0.01).sum())
    assert int(logged["val/active_units"]) == expected_au
    kl = kl_divergence(posterior, Normal(torch.zeros(6), torch.ones(6))).mean(0)
    assert int(logged["val/epsilon_collapsed"]) == int((kl < 0.01).sum())
    assert torch.allclose(monitor.last_kl_per_dim.float(), kl, rtol=1e-4, atol=1e-6)
    # the model's own val/kl is the total of the same per-dimension values
    assert abs(float(logged["val/kl"]) - kl.sum().item()) < 1e-4
    assert torch.isfinite(logged["val/iw_nll"]) and torch.isfinite(logged["val/mutual_info"])
    # the IW bound with K samples is no worse than the one-sample ELBO on average
    assert float(logged["val/iw_nll"]) <= -float(logged["val/elbo"]) + 0.5


@pytest.mark.parametrize("config,model", [
    ("configs/mixture/gmvae_toy.yaml", "MixtureVAE"),
    ("configs/hierarchical/digits.yaml", "HierarchicalVAE"),
    ("configs/linear/linear_hvae.yaml", "LinearHVAE"),
    ("configs/conditional/cvae_digits_quarters.yaml", "ConditionalVAE"),
])
def test_models_it_cannot_measure_are_refused_before_training(tmp_path, capsys, config, model):
    """Their latent code's prior is not N(0, η² I) (or q(z|x) needs more than x): one line,
    no training step, no checkpoint."""
    code = main(["fit", "--config", str(REPO / config), f"--trainer.default_root_dir={tmp_path}",
                 "--trainer.callbacks+=ilvae.callbacks.CollapseMonitor",
                 "--trainer.enable_progress_bar=false"])
    assert code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ilvae: error")]
    assert len(err) == 1 and f"CollapseMonitor cannot measure {model}" in err[0]
    assert not list(tmp_path.rglob("*.ckpt"))


def test_latent_plot_refuses_a_model_whose_posterior_needs_more_than_x(tmp_path, capsys):
    code = main(["fit", "--config", str(REPO / "configs/conditional/cvae_digits_quarters.yaml"),
                 f"--trainer.default_root_dir={tmp_path}",
                 "--trainer.callbacks+=ilvae.callbacks.LatentPlot",
                 "--trainer.enable_progress_bar=false"])
    assert code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ilvae: error")]
    assert len(err) == 1 and "LatentPlot cannot plot ConditionalVAE" in err[0]
    assert not list(tmp_path.rglob("*.ckpt"))


def _tiny_fit(tmp_path, monitor, **limits):
    """Fit a tiny VAE on 32 random 6-pixel images (4 batches per epoch); return the epochs at
    which ``val/active_units`` was logged, read back from the CSV logger's file."""
    import csv

    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x = torch.rand(32, 6)
    model = VAE(data_shape=(6,), latent_dim=2,
                encoder={"class_path": "ilvae.encoders.MLPEncoder", "init_args": {"hidden": [8]}},
                decoder={"class_path": "mlp", "init_args": {"hidden": [8]}})
    logger = CSVLogger(tmp_path, name="run", version="")
    trainer = L.Trainer(callbacks=[monitor], logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, **limits)
    trainer.fit(model, DataLoader(TensorDataset(x), batch_size=8),
                DataLoader(TensorDataset(x[:16]), batch_size=8))
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return [int(r["epoch"]) for r in rows if r.get("val/active_units")], trainer


def test_the_last_epoch_is_measured_besides_every_nth(tmp_path):
    monitor = CollapseMonitor(every_n_epochs=2, num_iw_samples=2, max_examples=8)
    epochs, trainer = _tiny_fit(tmp_path, monitor, max_epochs=3)
    assert epochs == [0, 2]
    # with every_n_epochs larger than the run, the first and the final model are both measured
    monitor = CollapseMonitor(every_n_epochs=40, num_iw_samples=2, max_examples=8)
    epochs, _ = _tiny_fit(tmp_path / "long", monitor, max_epochs=3)
    assert epochs == [0, 2]


def test_the_last_epoch_of_a_run_limited_by_max_steps_is_measured(tmp_path):
    monitor = CollapseMonitor(every_n_epochs=40, num_iw_samples=2, max_examples=8)
    epochs, trainer = _tiny_fit(tmp_path, monitor, max_steps=12)  # 4 steps per epoch
    assert trainer.current_epoch == 3 and trainer.global_step == 12
    assert epochs == [0, 2]
