"""CollapseMonitor logs the collapse metrics of the whole validation set; checked against a
direct computation on the final model."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ilvae.callbacks import CollapseMonitor
from ilvae.cli import run
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


# One offline config per model family; (config, callbacks to add: the text config has its own
# CollapseMonitor).
FAMILIES = [
    ("configs/digits/mlp.yaml", True),
    ("configs/toy/il_brenier.yaml", True),
    ("configs/mixture/gmvae_toy.yaml", True),
    ("configs/hierarchical/digits.yaml", True),
    ("configs/linear/linear_vae.yaml", True),
    ("configs/linear/linear_hvae.yaml", True),
    ("configs/conditional/cvae_digits_quarters.yaml", True),
    ("configs/text/text_vae.yaml", False),
]


def _event_tags(root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in Path(root).rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0, "tensors": 0})
        accumulator.Reload()
        for kind in accumulator.Tags().values():
            if isinstance(kind, list):
                tags.update(kind)
    return tags


@pytest.mark.parametrize("config,add", FAMILIES)
def test_every_family_is_measured_per_latent_level_plotted_and_imaged(tmp_path, config, add):
    """CollapseMonitor, LatentPlot and ImageLogger run on every family through the model
    contract: val/kl and val/active_units (per level where there are levels) are logged."""

    extra = ["--trainer.callbacks+=ilvae.callbacks.CollapseMonitor",
             "--trainer.callbacks.num_iw_samples=4",
             "--trainer.callbacks+=ilvae.callbacks.LatentPlot",
             "--trainer.callbacks+=ilvae.callbacks.ImageLogger",
             "--trainer.callbacks.num_images=4"] if add else []
    cli = run(["fit", "--config", str(REPO / config), f"--trainer.default_root_dir={tmp_path}",
               *extra, "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
               "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1",
               "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    logged = cli.trainer.callback_metrics
    levels = cli.model.latent_levels
    suffixes = [""] if len(levels) == 1 else [f"_{level}" for level in levels]
    for suffix in suffixes:
        for name in (f"val/kl{suffix}", f"val/active_units{suffix}",
                     f"val/epsilon_collapsed{suffix}"):
            assert name in logged and bool(torch.isfinite(logged[name])), name
    for name in cli.model.schedulable:  # every declared hyper-parameter is logged
        assert f"train/{name}" in logged, name
    if add:
        tags = _event_tags(tmp_path)
        assert "latent/posterior_means" in tags
        if len(cli.model.reconstructions(
                [t[:2] for t in cli.datamodule.tensors("val")])[0].shape) == 4:
            assert "images/reconstructions" in tags


def _fit_one_epoch(model, dm, root, batches):
    """One short epoch with a CollapseMonitor on the whole validation set; (trainer, monitor)."""
    monitor = CollapseMonitor(num_iw_samples=4, max_examples=None)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=batches, default_root_dir=root,
                        callbacks=[monitor], enable_progress_bar=False,
                        enable_model_summary=False, logger=False, enable_checkpointing=False)
    trainer.fit(model, dm)
    return trainer, monitor


def test_mixture_val_kl_is_the_mixture_models_own_kl(tmp_path):
    """The KL is measured against the mixture prior: the logged val/kl and the KL per
    dimension equal the model's kl_terms on the same validation data."""
    from ilvae.datamodules import TwoGaussians
    from ilvae.models import MixtureVAE

    torch.manual_seed(0)
    dm = TwoGaussians(num_samples=400, batch_size=50)
    model = MixtureVAE(data_shape=dm.data_shape, latent_dim=3, num_components=2,
                       classifier_hidden=[16],
                       encoder={"class_path": "ilvae.encoders.MLPEncoder",
                                "init_args": {"hidden": [16]}},
                       decoder={"class_path": "mlp",
                                "init_args": {"hidden": [16], "likelihood": "gaussian"}})
    trainer, monitor = _fit_one_epoch(model, dm, tmp_path, batches=3)
    x = dm.tensors("val")[0]
    expected = model.kl_terms(x)
    assert float(trainer.callback_metrics["val/kl"]) == pytest.approx(float(expected["kl"]),
                                                                      rel=1e-5)
    torch.testing.assert_close(monitor.last_kl_per_dim, expected["kl_per_dim"].double(),
                               rtol=1e-5, atol=1e-7)
    # and it is not the KL against N(0, I) of the moment-matched q(z|x)
    with torch.no_grad():
        standard = kl_divergence(model.encode(x), Normal(0.0, 1.0)).sum(-1).mean()
    assert abs(float(standard) - float(expected["kl"])) > 1e-3


def _gaussian_kl(mu, s, nu, r):
    """KL(N(mu, s²) ‖ N(nu, r²)) elementwise, written out."""
    return 0.5 * (s**2 / r**2 + (mu - nu) ** 2 / r**2 - 1 - torch.log(s**2 / r**2))


def test_hierarchical_levels_are_measured_against_their_own_priors(tmp_path):
    """Per level: z1 against p(z1|z2) at z2 = E q(z2|E q(z1|x)), z2 against N(0, eta_enc² I);
    the callback's per-level KLs and active units equal that closed form on the data."""
    from ilvae.datamodules.synthetic import LinearGaussianData
    from ilvae.models import HierarchicalVAE

    torch.manual_seed(0)
    dm = LinearGaussianData(spectrum=[4.0, 2.0, 1.0, 0.5], data_dim=6, num_samples=200,
                            batch_size=50, val_fraction=0.25)
    model = HierarchicalVAE(data_shape=(6,), latent_dim=3, latent_dim_2=2, hidden_2=[8],
                            eta_enc=0.7, eta_dec=0.6, sigma_1=0.5, num_iw_samples=0,
                            encoder={"class_path": "ilvae.encoders.MLPEncoder",
                                     "init_args": {"hidden": [8]}},
                            decoder={"class_path": "mlp",
                                     "init_args": {"hidden": [8], "likelihood": "gaussian"}})
    trainer, monitor = _fit_one_epoch(model, dm, tmp_path, batches=2)

    x = dm.tensors("val")[0]
    with torch.no_grad():
        mu1 = model.encoder(x).loc
        s1 = torch.full_like(mu1, 0.5)
        q2 = model.encoder_z2(mu1)
        g = model.decoder_z1(q2.loc)
        kl1 = _gaussian_kl(mu1, s1, g, torch.tensor(0.6))
        kl2 = _gaussian_kl(q2.loc, q2.scale, torch.zeros(()), torch.tensor(0.7))
        terms = model.latent_terms((x,))
    torch.testing.assert_close(terms[0].kl, kl1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms[1].kl, kl2, rtol=1e-5, atol=1e-6)
    by_level = monitor.last_kl_per_dim_by_level
    torch.testing.assert_close(by_level["z1"], kl1.double().mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(by_level["z2"], kl2.double().mean(0), rtol=1e-5, atol=1e-7)
    logged = trainer.callback_metrics
    # The model's own per-level ELBO terms keep their names; the callback adds no second value.
    assert {"val/kl_z1", "val/kl_z2"} <= set(logged)
    for level, loc in (("z1", mu1), ("z2", q2.loc)):
        expected_au = int((np.var(loc.double().numpy(), axis=0, ddof=1) > 0.01).sum())
        assert int(logged[f"val/active_units_{level}"]) == expected_au


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
