"""BN-VAE: with batch statistics the batch mean of μ̂_i² is exactly γ² v_i/(v_i + ε) + β_i²
(checked against numpy), so the batch-mean KL never falls below ½ Σ_i of it, on random and on
trained encoders, in every model family that takes an encoder; in evaluation mode the running
statistics give the affine map of the module docstring."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ilvae.cli import run
from ilvae.encoders import MLPEncoder
from ilvae.errors import ConfigurationError
from ilvae.models import VAE, HierarchicalVAE, MixtureVAE

REPO = Path(__file__).resolve().parents[1]
GAMMA = 0.7


def _raw_and_normalised(encoder, x):
    """Raw means (before the normalisation) and the encoder's posterior, float64 numpy."""
    with torch.no_grad():
        raw = encoder.net(x.flatten(1)).chunk(2, dim=-1)[0].double().numpy()
        posterior = encoder(x)
    return raw, posterior.loc.double().numpy(), posterior.scale.double().numpy()


def _numpy_kl(loc, scale):
    """½(μ² + s² − ln s² − 1) per example and dimension."""
    return 0.5 * (loc ** 2 + scale ** 2 - np.log(scale ** 2) - 1)


def _check_batch_identity(encoder, x):
    raw, loc, scale = _raw_and_normalised(encoder, x)
    eps = encoder.mean_batch_norm.norm.eps
    shift = encoder.mean_batch_norm.shift.detach().double().numpy()
    v = raw.var(0)  # biased, as batch normalisation uses
    expected_loc = GAMMA * (raw - raw.mean(0)) / np.sqrt(v + eps) + shift
    np.testing.assert_allclose(loc, expected_loc, rtol=1e-4, atol=1e-5)
    mean_term = GAMMA ** 2 * v / (v + eps) + shift ** 2
    np.testing.assert_allclose((loc ** 2).mean(0), mean_term, rtol=1e-4, atol=1e-6)
    bound = 0.5 * mean_term.sum()
    kl = _numpy_kl(loc, scale).sum(1).mean()
    variance_part = 0.5 * (scale ** 2 - np.log(scale ** 2) - 1).sum(1).mean()
    assert kl == pytest.approx(bound + variance_part, rel=1e-4)
    assert kl >= bound and bound >= 0.5 * len(v) * GAMMA ** 2 * 0.99  # v ≫ ε here
    with torch.no_grad():
        computed = float(encoder.mean_batch_norm.kl_lower_bound(
            torch.as_tensor(raw, dtype=torch.float32)))
    assert computed == pytest.approx(bound, rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_encoder_batch_mean_of_squared_means_is_gamma_squared_plus_shift_squared(seed):
    torch.manual_seed(seed)
    encoder = MLPEncoder((20,), 6, hidden=[32], mean_batch_norm_gamma=GAMMA).train()
    with torch.no_grad():
        encoder.mean_batch_norm.shift.normal_()  # a non-zero learned shift
    _check_batch_identity(encoder, 3 * torch.randn(64, 20) + 1)


def test_trained_encoder_from_the_config_keeps_the_kl_above_the_bound(tmp_path):
    cli = run(["fit", "--config", str(REPO / "configs/remedies/bn_vae.yaml"),
               f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1",
               "--trainer.limit_train_batches=5", "--trainer.limit_val_batches=0",
               "--trainer.callbacks=[]", "--summary.enabled=false",
               "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
               "--model.init_args.encoder.init_args.hidden=[16]",
               "--model.init_args.encoder.init_args.mean_batch_norm_gamma=0.7",
               "--model.init_args.decoder.init_args.hidden=[16]"])
    encoder = cli.model.encoder
    assert cli.trainer.global_step == 5
    assert encoder.mean_batch_norm.gamma == GAMMA
    assert encoder.mean_batch_norm.shift.abs().max() > 0  # the shift trained
    x = cli.datamodule.tensors("train")[0][:128]
    # The checkpoint rebuilds the option and restores the shift and the running statistics.
    ckpt = next(tmp_path.rglob("last.ckpt"))
    loaded = VAE.load_from_checkpoint(ckpt, map_location="cpu").encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).loc, encoder.eval()(x).loc)
    assert loaded.mean_batch_norm.norm.num_batches_tracked == 5
    _check_batch_identity(encoder.train(), x)  # (a training-mode call moves the running stats)


def test_gamma_is_fixed_and_the_shift_is_learned():
    encoder = MLPEncoder((5,), 3, hidden=[8], mean_batch_norm_gamma=GAMMA)
    names = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert "mean_batch_norm.shift" in names
    assert not any("mean_batch_norm" in n and n != "mean_batch_norm.shift" for n in names)


def test_evaluation_mode_is_the_affine_map_of_the_running_statistics():
    torch.manual_seed(3)
    encoder = MLPEncoder((10,), 4, hidden=[16], mean_batch_norm_gamma=GAMMA).train()
    for _ in range(30):  # running estimates of the raw means' statistics
        encoder(torch.randn(32, 10) + 0.5)
    with torch.no_grad():
        encoder.mean_batch_norm.shift.normal_()
    encoder.eval()
    x = 2 * torch.randn(50, 10)  # other statistics than the training batches
    raw, loc, _ = _raw_and_normalised(encoder, x)
    norm = encoder.mean_batch_norm.norm
    mean_bar = norm.running_mean.double().numpy()
    var_bar = norm.running_var.double().numpy()
    shift = encoder.mean_batch_norm.shift.detach().double().numpy()
    denom = np.sqrt(var_bar + norm.eps)
    np.testing.assert_allclose(loc, GAMMA * (raw - mean_bar) / denom + shift, rtol=1e-4,
                               atol=1e-5)
    a, c = raw.mean(0), raw.var(0)
    expected = GAMMA ** 2 * c / denom ** 2 + (GAMMA * (a - mean_bar) / denom + shift) ** 2
    np.testing.assert_allclose((loc ** 2).mean(0), expected, rtol=1e-4)


def _fit_two_steps(model, x, y=None):
    data = TensorDataset(x) if y is None else TensorDataset(x, y)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, DataLoader(data, batch_size=16))
    assert trainer.global_step == 2


@pytest.mark.parametrize("family", [VAE, HierarchicalVAE, MixtureVAE])
def test_composes_with_every_model_family_that_takes_an_encoder(family):
    torch.manual_seed(0)
    encoder = {"class_path": "ilvae.encoders.MLPEncoder",
               "init_args": {"hidden": [16], "mean_batch_norm_gamma": GAMMA}}
    extra = {"num_components": 3, "classifier_hidden": [8]} if family is MixtureVAE else {}
    model = family(data_shape=(12,), latent_dim=3, encoder=encoder, **extra)
    x = torch.rand(48, 12)
    _fit_two_steps(model, x, torch.arange(48) % 3 if family is MixtureVAE else None)
    assert model.encoder.mean_batch_norm.gamma == GAMMA
    assert model.hparams["encoder"]["init_args"]["mean_batch_norm_gamma"] == GAMMA
    model.train()
    # The level-1 posterior obeys the batch identity whatever the model around the encoder.
    loc = model.latent_terms((x, torch.arange(48) % 3))[0].posterior.loc
    if family is not MixtureVAE:  # the mixture's q(z|x) is a moment match over components
        raw = model.encoder.net(x).chunk(2, dim=-1)[0].detach().double().numpy()
        v = raw.var(0)
        shift = model.encoder.mean_batch_norm.shift.detach().double().numpy()
        np.testing.assert_allclose((loc.detach().double().numpy() ** 2).mean(0),
                                   GAMMA ** 2 * v / (v + 1e-5) + shift ** 2, rtol=1e-4)


@pytest.mark.parametrize("gamma", [0.0, -1.0, float("nan")])
def test_bad_gamma_is_refused_in_one_line(gamma):
    with pytest.raises(ConfigurationError, match=r"^mean_batch_norm_gamma=.* expected a finite"):
        MLPEncoder((5,), 3, mean_batch_norm_gamma=gamma)
