"""The generic VAE: its loss equals the β-ELBO computed by hand, blocks round-trip through
hyper-parameters, and the Python API has the documented shapes and types."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ilvae.decoders.mlp import MLPDecoder
from ilvae.errors import ConfigurationError
from ilvae.models import VAE, Autoencoder
from ilvae.objectives import beta_vae_loss, kl_penalty


def _model(**kw):
    torch.manual_seed(0)
    return VAE(data_shape=(1, 4, 4), latent_dim=3, **kw)


def test_encode_returns_normal_and_decode_shape():
    model = _model()
    x = torch.rand(5, 1, 4, 4)
    posterior = model.encode(x)
    assert isinstance(posterior, Normal)
    assert posterior.loc.shape == (5, 3) and posterior.scale.shape == (5, 3)
    assert model.decode(posterior.loc).shape == (5, 16)
    assert model.latent_dim == 3 and model.beta == 1.0


def test_loss_equals_hand_computed_beta_elbo():
    model = _model(beta=0.7)
    x = torch.rand(6, 1, 4, 4)
    torch.manual_seed(1)
    out = model(x)
    loss, terms = beta_vae_loss(out["log_px"], out["kl"], model.beta)
    # Independent computation: Bernoulli log-likelihood by an explicit formula, KL by
    # torch.distributions, both summed over dimensions, averaged over the batch.
    torch.manual_seed(1)
    posterior = model.encode(x)
    z = posterior.rsample()
    p = torch.sigmoid(model.decode(z))
    xf = x.flatten(1)
    log_px = (xf * torch.log(p) + (1 - xf) * torch.log1p(-p)).sum(1)
    kl = kl_divergence(posterior, Normal(torch.zeros(3), torch.ones(3))).sum(1)
    expected = (-log_px + 0.7 * kl).mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(terms["elbo"], (log_px - kl).mean(), atol=1e-5)


def test_free_bits_clamps_batch_mean_kl_per_dimension():
    kl = torch.tensor([[0.1, 2.0, 0.0], [0.3, 1.0, 0.0]])
    # per-dimension batch means: 0.2, 1.5, 0.0 -> clamped at 0.5: 0.5 + 1.5 + 0.5
    assert math.isclose(kl_penalty(kl, 0.5).item(), 2.5, rel_tol=1e-6)
    assert math.isclose(kl_penalty(kl, 0.0).item(), kl.sum(1).mean().item(), rel_tol=1e-6)


def test_hparams_store_block_specs_and_rebuild_identically():
    model = _model(decoder="il_brenier")
    spec = model.hparams["decoder"]
    assert spec["class_path"] == "ilvae.decoders.il_brenier.ILBrenierDecoder"
    rebuilt = VAE(**model.hparams)
    rebuilt.load_state_dict(model.state_dict())
    z = torch.randn(4, 3)
    assert torch.equal(model.decode(z), rebuilt.decode(z))


def test_decoder_accepts_name_class_callable_and_instance():
    dec = MLPDecoder(3, 16, hidden=[7])
    for spec in ("mlp", MLPDecoder, lambda m, d: MLPDecoder(m, d, hidden=[7]), dec):
        assert isinstance(_model(decoder=spec).decoder, MLPDecoder)


@pytest.mark.parametrize("field,value", [("beta", -1.0), ("beta", float("nan")),
                                         ("free_bits", -0.1), ("latent_dim", 0)])
def test_bad_configuration_names_the_field(field, value):
    kw = {field: value}
    with pytest.raises(ConfigurationError, match=field):
        VAE(data_shape=(4,), **({"latent_dim": 2} | kw))


def test_unknown_decoder_lists_registered_names():
    with pytest.raises(ConfigurationError, match="il_brenier"):
        _model(decoder="no_such_decoder")


def test_autoencoder_uses_encoder_mean_and_logs_gamma_star():
    torch.manual_seed(0)
    ae = Autoencoder(data_shape=(6,), latent_dim=2, decoder={"class_path": "mlp", "init_args": {
        "likelihood": "gaussian", "hidden": [8]}})
    x = torch.randn(10, 6)
    out = ae(x)
    mu = ae.encode(x).loc
    assert torch.equal(out["z"], mu)
    expected = -0.5 * ((x - ae.decode(mu)) ** 2 + math.log(2 * math.pi)).sum(1)
    assert torch.allclose(out["log_px"], expected, atol=1e-5)


# ------------------------------------------------------------------ fast paths of the step


def test_step_loss_fast_path_equals_beta_vae_loss_with_gradients():
    torch.manual_seed(0)
    log_px = torch.randn(7, requires_grad=True)
    kl = torch.rand(7, 3, requires_grad=True)
    for beta in (1.0, 0.3, 0.0):
        model = _model(beta=beta)
        loss, terms = model._loss(log_px, kl)
        want, want_terms = beta_vae_loss(log_px, kl, beta)
        grads = torch.autograd.grad(loss, (log_px, kl))
        want_grads = torch.autograd.grad(want, (log_px, kl))
        torch.testing.assert_close(loss, want)
        for name in ("loss", "recon", "kl", "elbo"):
            torch.testing.assert_close(terms[name], want_terms[name])
        for got, ref in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_standard_normal_kl_equals_torch_distributions_with_gradients(scale):
    from ilvae.priors import StandardNormal

    torch.manual_seed(0)
    loc = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    raw = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    std = torch.nn.functional.softplus(raw) + 1e-4
    prior = StandardNormal(3, scale=scale).double()
    got = prior.kl(Normal(loc, std))
    want = kl_divergence(Normal(loc, std), Normal(torch.zeros(3, dtype=torch.float64),
                                                  torch.full((3,), scale, dtype=torch.float64)))
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got.sum(), (loc, raw), retain_graph=True),
                    torch.autograd.grad(want.sum(), (loc, raw)), strict=True):
        torch.testing.assert_close(g, w)


def test_encoder_posterior_validation_is_kept():
    from ilvae.encoders import MLPEncoder, finite_normal

    torch.manual_seed(0)
    encoder = MLPEncoder((4,), 2, hidden=[8])
    x = torch.rand(3, 4)
    posterior = encoder(x)
    h = encoder.net(x)
    torch.testing.assert_close(posterior.loc, h[:, :2])
    torch.testing.assert_close(posterior.scale, torch.nn.functional.softplus(h[:, 2:]) + 1e-4)
    # NaN data or weights: torch's own error, which the loss guard recognises
    from ilvae.loss_guard import is_nonfinite_parameter_error

    with pytest.raises(ValueError, match="Expected parameter loc") as info:
        encoder(torch.full((3, 4), math.nan))
    assert is_nonfinite_parameter_error(info.value)
    # a sum that overflows while every value is finite is not an error
    big = torch.full((2, 2), 3e38)
    assert finite_normal(big, big[:, :1], torch.ones(2, 1)).loc.shape == (2, 1)


# ------------------------------------------------------------------ training-step logging


class _Record(__import__("lightning").pytorch.loggers.Logger):
    """In-memory logger: every ``log_metrics`` call, as floats."""

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "record"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, {k: float(v) for k, v in metrics.items()}))


class _LossReader(__import__("lightning").pytorch.Callback):
    """A plain callback: what ``trainer.callback_metrics`` shows after each step, and the
    loss the step returned."""

    def __init__(self):
        self.seen, self.losses = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(float(trainer.callback_metrics["train/loss_step"]))
        self.losses.append(float(outputs["loss"]))


class _StopAt(__import__("lightning").pytorch.Callback):
    """Stops the run after a given training step (like a time limit would)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


def _fit_logged(tmp_path, callbacks=(), model=None, n=70, **trainer_kw):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    pl.seed_everything(0)
    model = model or VAE(data_shape=(6,), latent_dim=2, beta=0.5)
    x = torch.rand(n, 6, generator=torch.Generator().manual_seed(0))
    train = DataLoader(TensorDataset(x), batch_size=8)  # 9 batches, the last one of 6
    val = DataLoader(TensorDataset(x[:16]), batch_size=8)
    logger = _Record()
    options = dict(max_epochs=2, accelerator="cpu", devices=1, logger=logger,
                   enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=4,
                   default_root_dir=tmp_path, callbacks=list(callbacks))
    options.update(trainer_kw)
    trainer = pl.Trainer(**options)
    trainer.fit(model, train, val)
    return logger.rows, {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_a_plain_callback_sees_every_steps_loss(tmp_path):
    reader = _LossReader()
    _fit_logged(tmp_path, [reader], n=160, max_epochs=1, log_every_n_steps=5)
    assert len(reader.seen) == 20 and len(set(reader.seen)) == 20
    assert reader.seen == pytest.approx(reader.losses, rel=1e-6)


def test_training_terms_are_epoch_means_over_every_batch(tmp_path):
    """``train/kl`` etc. are batch-size-weighted means over the epoch's batches (the last
    batch is smaller), the loss's too (``train/loss``); the logger writes the loss's step values at
    its logging steps and the epoch means once per epoch."""

    class Terms(__import__("lightning").pytorch.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.rows.append((trainer.current_epoch, len(batch[0]),
                              {k: float(v) for k, v in outputs.items()}))

    terms = Terms()
    rows, metrics = _fit_logged(tmp_path, [terms])
    for name in ("loss", "kl", "recon", "elbo", "gamma_star"):
        epoch = [(n, t[f"train/{name}"]) for e, n, t in terms.rows if e == 1]
        want = sum(n * v for n, v in epoch) / sum(n for n, _ in epoch)
        assert metrics[f"train/{name}"] == pytest.approx(want, rel=1e-5), name
    steps = [step for step, row in rows if "train/loss_step" in row]
    assert steps == [3, 7, 11, 15]  # every 4th optimiser step
    epochs = [row for _, row in rows if "train/kl" in row]
    assert len(epochs) == 2 and all("train/loss" in row for row in epochs)
    assert {"train/beta"} <= {k for _, row in rows for k in row}


@pytest.mark.parametrize("model", ["VAE", "HierarchicalVAE"])
def test_a_mid_epoch_stop_keeps_the_training_logs(tmp_path, model):
    from ilvae.models import HierarchicalVAE

    built = (VAE(data_shape=(6,), latent_dim=2) if model == "VAE"
             else HierarchicalVAE(data_shape=(6,), latent_dim=2, latent_dim_2=2))
    rows, metrics = _fit_logged(tmp_path, [_StopAt(4)], model=built)
    written = {k for _, row in rows for k in row}
    assert {"train/loss", "train/recon", "train/elbo"} <= written
    assert {"train/loss", "train/recon", "train/elbo"} <= metrics.keys()


def _test_metrics(model, x, seed, batch_size=7):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    # the loader's own generator, so that the global stream feeds only the model's draws
    loader = DataLoader(TensorDataset(x), batch_size=batch_size, generator=torch.Generator())
    torch.manual_seed(seed)
    return trainer.test(model, loader, verbose=False)[0]


def test_test_stage_logs_the_elbo_on_the_fixed_binarisation_of_the_test_split():
    """Hand computation: the whole split binarised at once, and per batch the draws ε of the
    grey-level step then ε' of the binarised one (z = μ + s ε'), in the test loop's order."""
    import torch.nn.functional as F

    from ilvae.likelihoods import binarize_fixed

    torch.manual_seed(0)
    model = VAE(data_shape=(6,), latent_dim=2,
                encoder={"class_path": "ilvae.encoders.MLPEncoder", "init_args": {"hidden": [8]}},
                decoder={"class_path": "mlp", "init_args": {"hidden": [8]}})
    x = torch.rand(60, 6, generator=torch.Generator().manual_seed(1))
    logged = _test_metrics(model, x, seed=3)
    x_bin = binarize_fixed(x)
    torch.manual_seed(3)
    grey, binary = [], []
    with torch.no_grad():
        for start in range(0, 60, 7):
            n = len(x[start:start + 7])
            eps_grey, eps_bin = torch.randn(n, 2), torch.randn(n, 2)
            for data, eps, out in ((x, eps_grey, grey), (x_bin, eps_bin, binary)):
                batch = data[start:start + 7]
                posterior = model.encode(batch)
                theta = model.decoder(posterior.loc + posterior.scale * eps)
                log_px = (batch * F.logsigmoid(theta)
                          + (1 - batch) * F.logsigmoid(-theta)).sum(1)
                out.append(log_px - kl_divergence(posterior, Normal(0.0, 1.0)).sum(1))
    assert math.isclose(logged["test/elbo"], float(torch.cat(grey).mean()), rel_tol=1e-5)
    assert math.isclose(logged["test/elbo_binarized"], float(torch.cat(binary).mean()),
                        rel_tol=1e-5)
    # a second test run binarises the split the same way again
    assert _test_metrics(model, x, seed=3)["test/elbo_binarized"] == logged["test/elbo_binarized"]


def test_a_gaussian_model_logs_no_binarised_test_metric():
    torch.manual_seed(0)
    model = VAE(data_shape=(6,), latent_dim=2,
                decoder={"class_path": "mlp", "init_args": {"likelihood": "gaussian"}})
    logged = _test_metrics(model, torch.rand(20, 6), seed=0)
    assert "test/elbo" in logged and "test/elbo_binarized" not in logged
