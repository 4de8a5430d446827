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
