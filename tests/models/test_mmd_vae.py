"""MMD-VAE: its loss is the InfoVAE objective computed by hand, ``mmd_weight`` is schedulable
by name, and the model round-trips through a checkpoint."""

import pytest
import torch

from ilvae.errors import ConfigurationError
from ilvae.models import MMDVAE, VAE
from ilvae.objectives import beta_vae_loss, mmd


def _model(**kw):
    torch.manual_seed(0)
    return MMDVAE(data_shape=(1, 4, 4), latent_dim=3, **kw)


@pytest.mark.parametrize("beta,weight,kernel", [(0.0, 1000.0, "rbf"), (1.0, 5.0, "imq")])
def test_loss_is_the_infovae_objective(beta, weight, kernel):
    model = _model(beta=beta, mmd_weight=weight, kernel=kernel)
    x = torch.rand(6, 1, 4, 4)
    out = model(x)
    torch.manual_seed(7)
    loss, terms = model.objective(out)
    torch.manual_seed(7)
    z_prior = model.prior.sample(6)  # the prior draws the objective made
    elbo_loss, _ = beta_vae_loss(out["log_px"], out["kl"], beta)
    divergence = mmd(out["z"], z_prior, kernel, 2.0 * 3)  # C = 2·m for N(0, I)
    assert float(loss.detach()) == pytest.approx(float(elbo_loss + weight * divergence),
                                                 rel=1e-5)
    assert float(terms["mmd"].detach()) == pytest.approx(float(divergence), rel=1e-5)
    terms["mmd"].backward()  # the MMD term trains the encoder, not the decoder
    assert all(p.grad is None for p in model.decoder.parameters())
    assert model.encoder.net[0].weight.grad.abs().sum() > 0
    assert {"loss", "recon", "kl", "elbo", "mmd"} <= set(terms)


def test_mmd_weight_is_schedulable_by_name():
    model = _model()
    assert model.schedulable == ("beta", "mmd_weight")
    model.set_hparam("mmd_weight", 3.0)
    assert model.mmd_weight == 3.0 and model.get_hparam("mmd_weight") == 3.0
    with pytest.raises(ConfigurationError, match="mmd_weight"):
        VAE(data_shape=(4,), latent_dim=2).set_hparam("mmd_weight", 1.0)


def test_a_schedule_sets_mmd_weight_by_name(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from ilvae.callbacks import KLAnnealing

    model = _model()
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(outputs["train/mmd_weight"])

    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[KLAnnealing(length=4, start=0.0, end=8.0,
                                               target="mmd_weight"), Record()])
    trainer.fit(model, DataLoader(TensorDataset(torch.rand(40, 1, 4, 4)), batch_size=10))
    assert seen == [0.0, 2.0, 4.0, 6.0]  # linear 0 → 8 over 4 steps, read at each step


def test_kernel_scale_default_follows_the_prior_variance():
    from ilvae.priors import StandardNormal
    model = MMDVAE(data_shape=(4,), latent_dim=5,
                   prior=lambda m: StandardNormal(m, scale=2.0))
    assert model.kernel_scale == pytest.approx(2 * 5 * 4.0)


@pytest.mark.parametrize("field,value", [("mmd_weight", -1.0), ("kernel", "cosine"),
                                         ("kernel_scale", 0.0)])
def test_bad_configuration_names_the_field(field, value):
    with pytest.raises(ConfigurationError, match=f"{field}="):
        _model(**{field: value})


def test_checkpoint_round_trip_keeps_the_mmd_settings(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    model = _model(mmd_weight=7.0, kernel="imq", free_bits=0.1)
    data = DataLoader(TensorDataset(torch.rand(20, 1, 4, 4)), batch_size=10)
    trainer = L.Trainer(max_epochs=1, default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = MMDVAE.load_from_checkpoint(path)
    assert (loaded.mmd_weight, loaded.kernel, loaded.free_bits, loaded.beta) == (7.0, "imq",
                                                                                 0.1, 0.0)
