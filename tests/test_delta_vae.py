"""δ-VAE: σ_l agrees with an independent root finder, and the KL of every example to N(0, I)
stays above the committed rate δ on random, extreme and trained encoders."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from ilvae.cli import run
from ilvae.delta_vae import max_scale
from ilvae.encoders import MLPEncoder
from ilvae.errors import ConfigurationError
from ilvae.priors import StandardNormal

REPO = Path(__file__).resolve().parents[1]


def _g(sigma):
    """½(σ² − ln σ² − 1): the KL of N(0, σ²) to N(0, 1)."""
    return 0.5 * (sigma ** 2 - math.log(sigma ** 2) - 1)


@pytest.mark.parametrize("rate", [1e-3, 0.05, 0.125, 1.0, 5.0])
def test_max_scale_is_the_root_below_one_found_by_bisection(rate):
    root = brentq(lambda s: _g(s) - rate, 1e-12, 1.0, xtol=1e-15)
    assert max_scale(rate) == pytest.approx(root, rel=1e-9)
    assert max_scale(rate) < 1


def _kl_per_example(encoder, x):
    with torch.no_grad():
        posterior = encoder(x)
        ours = StandardNormal(encoder.latent_dim).kl(posterior).sum(-1)
    loc = posterior.loc.double().numpy()
    scale = posterior.scale.double().numpy()
    reference = 0.5 * (loc ** 2 + scale ** 2 - np.log(scale ** 2) - 1).sum(-1)
    return ours.numpy(), reference, scale


@pytest.mark.parametrize("delta", [0.1, 2.0, 10.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_encoders_never_go_below_the_committed_rate(delta, seed):
    torch.manual_seed(seed)
    encoder = MLPEncoder((12,), 8, hidden=[32], committed_rate=delta)
    x = torch.cat([torch.randn(200, 12), 1e4 * torch.randn(50, 12),  # extreme inputs saturate
                   torch.zeros(1, 12)])
    ours, reference, scale = _kl_per_example(encoder, x)
    sigma_l = max_scale(delta / 8)
    assert scale.max() <= sigma_l and scale.min() >= encoder.min_scale * (1 - 1e-6)
    assert ours.min() >= delta and reference.min() >= delta
    # The extreme inputs saturate the map at both ends of the allowed range.
    assert np.isclose(scale, sigma_l, rtol=1e-3).any()
    assert np.isclose(scale, encoder.min_scale, rtol=1e-3).any()


def test_the_floor_is_reached_at_zero_mean_and_the_largest_scale():
    # With μ = 0 and σ = σ_max the KL is m·g(σ_max): just above δ, by the margin only.
    encoder = MLPEncoder((4,), 5, hidden=[8], committed_rate=1.5)
    with torch.no_grad():
        last = encoder.net[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0] * 5 + [50.0] * 5))  # μ = 0, sigmoid(50) = 1
    ours, reference, _ = _kl_per_example(encoder, torch.randn(3, 4))
    assert reference == pytest.approx(1.5, rel=1e-3)
    assert ours.min() >= 1.5


def test_trained_encoder_from_the_config_keeps_every_example_above_delta(tmp_path):
    cli = run(["fit", "--config", str(REPO / "configs/remedies/delta_vae.yaml"),
               f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1",
               "--trainer.limit_train_batches=5", "--trainer.limit_val_batches=0",
               "--trainer.callbacks=[]", "--summary.enabled=false",
               "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
               "--model.init_args.encoder.init_args.hidden=[16]",
               "--model.init_args.decoder.init_args.hidden=[16]"])
    encoder = cli.model.encoder.eval()
    delta = encoder.committed_scale.committed_rate
    assert cli.trainer.global_step == 5 and delta == 2.0
    x = torch.cat([cli.datamodule.tensors("train")[0], cli.datamodule.tensors("test")[0]])
    ours, reference, _ = _kl_per_example(encoder, x)
    assert ours.min() >= delta and reference.min() >= delta


def test_composes_with_batch_normalised_means():
    torch.manual_seed(0)
    encoder = MLPEncoder((6,), 4, hidden=[16], committed_rate=1.0, mean_batch_norm_gamma=0.5)
    ours, reference, _ = _kl_per_example(encoder.train(), torch.randn(64, 6))
    assert ours.min() >= 1.0 and reference.min() >= 1.0
    assert reference.mean() >= 1.0 + 4 * 0.5 ** 2 / 2 * 0.99  # BN's batch-mean floor on top


@pytest.mark.parametrize("kw, field", [({"committed_rate": 0.0}, "committed_rate"),
                                       ({"committed_rate": -1.0}, "committed_rate"),
                                       ({"committed_rate": 80.0}, "min_scale"),
                                       ({"committed_rate": 1.0, "min_scale": 0.0}, "min_scale")])
def test_bad_committed_rate_is_refused_in_one_line(kw, field):
    with pytest.raises(ConfigurationError, match=rf"^{field}=.* is not allowed: expected"):
        MLPEncoder((5,), 4, **kw)
