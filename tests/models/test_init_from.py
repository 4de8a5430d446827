"""VAE(init_from=...): the blocks start with exactly the checkpoint's weights, a mismatch is a
one-line error naming the field, and the file is not needed to load the VAE's own checkpoints."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ilvae.decoders.mlp import MLPDecoder
from ilvae.encoders import MLPEncoder
from ilvae.errors import CheckpointError, ConfigurationError
from ilvae.models import VAE, Autoencoder


def _blocks(width=8):
    return {"encoder": lambda s, m: MLPEncoder(s, m, hidden=[width]),
            "decoder": lambda m, d: MLPDecoder(m, d, hidden=[width])}


def _trained_autoencoder(tmp_path, width=8):
    torch.manual_seed(0)
    model = Autoencoder(data_shape=(1, 4, 4), latent_dim=3, **_blocks(width))
    data = DataLoader(TensorDataset(torch.rand(20, 1, 4, 4)), batch_size=10)
    trainer = L.Trainer(max_epochs=2, default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    path = tmp_path / "ae.ckpt"
    trainer.save_checkpoint(path)
    return model, path


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_vae_starts_with_exactly_the_autoencoders_weights(tmp_path):
    ae, path = _trained_autoencoder(tmp_path)
    torch.manual_seed(1)
    fresh = VAE(data_shape=(1, 4, 4), latent_dim=3, **_blocks())
    torch.manual_seed(1)
    vae = VAE(data_shape=(1, 4, 4), latent_dim=3, init_from=str(path), **_blocks())
    for block in ("encoder", "decoder"):
        ours, theirs = _state(getattr(vae, block)), _state(getattr(ae, block))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
        # and not by chance: a VAE built without init_from differs
        assert not all(torch.equal(v, getattr(fresh, block).state_dict()[k])
                       for k, v in ours.items())


def test_init_blocks_encoder_only_keeps_the_fresh_decoder(tmp_path):
    ae, path = _trained_autoencoder(tmp_path)
    torch.manual_seed(1)
    fresh = VAE(data_shape=(1, 4, 4), latent_dim=3, **_blocks())
    torch.manual_seed(1)
    vae = VAE(data_shape=(1, 4, 4), latent_dim=3, init_from=str(path), init_blocks=["encoder"],
              **_blocks())
    assert all(torch.equal(v, ae.encoder.state_dict()[k])
               for k, v in vae.encoder.state_dict().items())
    assert all(torch.equal(v, fresh.decoder.state_dict()[k])
               for k, v in vae.decoder.state_dict().items())


def test_a_mismatched_or_missing_checkpoint_is_a_one_line_error(tmp_path):
    _, path = _trained_autoencoder(tmp_path, width=8)
    with pytest.raises(ConfigurationError) as error:
        VAE(data_shape=(1, 4, 4), latent_dim=3, init_from=str(path), **_blocks(width=6))
    message = str(error.value)
    assert message.startswith(f"init_from={str(path)!r} does not fit this model: ")
    assert message.endswith("encoder.net.0.bias has shape (8,) in the checkpoint and (6,) here")
    assert "\n" not in message
    with pytest.raises(CheckpointError, match="does not exist"):
        VAE(data_shape=(1, 4, 4), latent_dim=3, init_from=str(tmp_path / "none.ckpt"))
    with pytest.raises(ConfigurationError, match="init_blocks=.*'encoder', 'decoder'"):
        VAE(data_shape=(1, 4, 4), latent_dim=3, init_from=str(path), init_blocks=["prior"])


def test_the_vaes_checkpoint_loads_without_the_initialising_file(tmp_path):
    _, path = _trained_autoencoder(tmp_path)
    vae = VAE(data_shape=(1, 4, 4), latent_dim=3, init_from=str(path), **_blocks())
    assert "init_from" not in vae.hparams
    trainer = L.Trainer(max_epochs=1, default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(vae, DataLoader(TensorDataset(torch.rand(20, 1, 4, 4)), batch_size=10))
    own = tmp_path / "vae.ckpt"
    trainer.save_checkpoint(own)
    path.unlink()
    loaded = VAE.load_from_checkpoint(own)
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in loaded.state_dict().items())
