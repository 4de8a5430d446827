"""Skip-VAE decoder: every layer's pre-activation depends on z directly through its skip weight
(autograd), the output keeps depending on z when the main path is cut (unlike the plain MLP),
it owns its likelihood, is registered under ``skip_mlp`` and trains in every model family."""

import lightning as L
import pytest
import torch
from torch.autograd.functional import jacobian
from torch.utils.data import DataLoader, TensorDataset

from ilvae import decoders
from ilvae.cli import main
from ilvae.decoders.mlp import MLPDecoder
from ilvae.decoders.skip_mlp import SkipMLPDecoder
from ilvae.models import VAE, HierarchicalVAE, MixtureVAE

M = 3


def _decoder(**kw):
    torch.manual_seed(0)
    return SkipMLPDecoder(M, 7, hidden=[6, 5], activation="tanh", **kw).double()


@pytest.mark.parametrize("k", [2, 3])
def test_each_layer_sees_z_through_its_skip_weight(k):
    dec = _decoder()
    z = torch.randn(M, dtype=torch.float64)
    # Autograd through the whole network: d(pre_k)/dz = W_k d(h_{k-1})/dz + G_k.
    pre_k = jacobian(lambda v: dec.pre_activations(v)[k - 1], z)
    h_below = jacobian(lambda v: dec.activation(dec.pre_activations(v)[k - 2]), z)
    main_weight = dec.layers[k - 1].weight[:, :-M]
    skip = pre_k - main_weight @ h_below
    torch.testing.assert_close(skip, dec.skip_weight(k).detach(), rtol=1e-10, atol=1e-12)
    assert skip.abs().min() > 0  # a dense, non-trivial direct dependence


def test_the_output_depends_on_z_when_the_main_path_is_cut():
    dec = SkipMLPDecoder(M, 4, hidden=[5]).double()
    plain = MLPDecoder(M, 4, hidden=[5]).double()
    for net_first in (dec.layers[0], plain.net[0]):
        with torch.no_grad():
            net_first.weight.zero_()  # h₁ = relu(b₁) no longer depends on z
    z = torch.randn(M, dtype=torch.float64)
    torch.testing.assert_close(jacobian(dec, z), dec.skip_weight(2).detach())
    assert jacobian(plain, z).abs().max() == 0


def test_forward_matches_the_pre_activations_and_the_likelihood_is_owned():
    dec = SkipMLPDecoder(M, 4, hidden=[5], likelihood="gaussian", sigma=0.5)
    z, x = torch.randn(6, M), torch.randn(6, 4)
    theta = dec(z)
    torch.testing.assert_close(theta, dec.pre_activations(z)[-1])
    expected = torch.distributions.Normal(theta, 0.5).log_prob(x).sum(-1)
    torch.testing.assert_close(dec.log_prob(x, z), expected)


def test_registered_and_listed_by_the_decoders_command(capsys):
    assert decoders.resolve("skip_mlp") is SkipMLPDecoder
    assert decoders.SkipMLPDecoder is SkipMLPDecoder
    assert isinstance(decoders.build("skip_mlp", latent_dim=2, data_dim=3, hidden=[4]),
                      SkipMLPDecoder)
    assert main(["decoders"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines()
                if row.startswith("skip_mlp"))
    assert "ilvae.decoders.skip_mlp.SkipMLPDecoder" in line


def test_bad_layer_index_is_refused():
    with pytest.raises(ValueError, match=r"^k=1 is not allowed"):
        _decoder().skip_weight(1)


@pytest.mark.parametrize("family", [VAE, HierarchicalVAE, MixtureVAE])
def test_trains_in_every_model_family(family):
    torch.manual_seed(0)
    extra = {"num_components": 3, "classifier_hidden": [8]} if family is MixtureVAE else {}
    model = family(data_shape=(12,), latent_dim=3, decoder="skip_mlp", **extra)
    x = torch.rand(48, 12)
    data = TensorDataset(x, torch.arange(48) % 3) if family is MixtureVAE else TensorDataset(x)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, DataLoader(data, batch_size=16))
    assert trainer.global_step == 2 and isinstance(model.decoder, SkipMLPDecoder)
