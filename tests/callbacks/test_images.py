"""ImageLogger's samples come from the model's own prior, with fixed draws and the training's
random streams untouched; its grids enlarge every pixel into a block (nearest neighbour)."""

import pytest
import torch

from ilvae.callbacks import ImageLogger
from ilvae.callbacks.images import image_grid, upscale, upscale_factor
from ilvae.errors import ConfigurationError
from ilvae.models import VAE, ConditionalVAE, MixtureVAE


def test_vae_samples_are_the_decoder_mean_at_seeded_prior_draws():
    torch.manual_seed(1)
    model = VAE(data_shape=(1, 8, 8), latent_dim=4,
                prior={"class_path": "ilvae.priors.StandardNormal", "init_args": {"scale": 0.5}})
    logger = ImageLogger(num_images=6, seed=3)
    state = torch.get_rng_state()
    samples = logger._samples(model, (1, 8, 8))
    assert torch.equal(torch.get_rng_state(), state)  # training's stream untouched
    z = 0.5 * torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    expected = torch.sigmoid(model.decoder.net(z)).reshape(6, 1, 8, 8)
    torch.testing.assert_close(samples, expected)
    assert torch.equal(logger._samples(model, (1, 8, 8)), samples)  # same draws every epoch


def test_mixture_samples_come_from_the_mixture_prior():
    torch.manual_seed(1)
    model = MixtureVAE(data_shape=(1, 8, 8), latent_dim=2, num_components=3)
    with torch.no_grad():  # components far apart, so a draw from N(0, I) would be visible
        model.prior.mean_map.weight.copy_(torch.tensor([[40.0, 0.0], [0.0, 40.0], [-40.0, -40.0]]))
    logger = ImageLogger(num_images=5, seed=0)
    samples = logger._samples(model, (1, 8, 8))
    torch.manual_seed(0)
    expected = model.sample(5).clamp(0, 1)
    torch.testing.assert_close(samples, expected)
    standard = torch.sigmoid(model.decoder.net(torch.randn(5, 2))).reshape(5, 1, 8, 8)
    assert not torch.allclose(samples, standard, atol=1e-3)


def test_a_conditional_model_has_no_unconditional_samples():
    model = ConditionalVAE(data_shape=(4,), target_shape=(4,), latent_dim=2)
    assert ImageLogger()._samples(model, (1, 2, 2)) is None


def test_upscaling_repeats_every_pixel_into_a_block():
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = x.repeat_interleave(14, dim=2).repeat_interleave(14, dim=3)
    assert torch.equal(upscale(x, 14), expected)
    # default factor: the smallest k with k · min(H, W) ≥ 112 pixels
    assert [upscale_factor((1, s, s)) for s in (8, 28, 32, 112, 200)] == [14, 4, 4, 1, 1]
    assert upscale_factor((1, 8, 8), 3) == 3


def test_grid_tiles_are_the_upscaled_images_between_white_lines():
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    grid = image_grid(x, nrow=2, factor=5)
    assert grid.shape == (3, 2 + 40 + 2, 2 + 2 * (40 + 2))
    for i in range(2):
        tile = grid[:, 2:42, 2 + 42 * i:42 + 42 * i]
        expected = x[i, 0].repeat_interleave(5, 0).repeat_interleave(5, 1)
        for channel in range(3):
            assert torch.equal(tile[channel], expected)
    assert torch.all(grid[:, :2] == 1.0) and torch.all(grid[:, :, 42:44] == 1.0)


def test_upscale_must_be_a_positive_integer():
    with pytest.raises(ConfigurationError, match=r"^upscale=0 is not allowed: expected a positive"):
        ImageLogger(upscale=0)
