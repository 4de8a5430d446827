"""The collapse remedies' configs (configs/remedies/) train through the CLI with tiny overrides,
and the pretrained-encoder recipe chains its two stages."""

import math
from pathlib import Path

import torch

from ilvae.checkpointing import load_checkpoint
from ilvae.cli import run
from ilvae.models import VAE

REPO = Path(__file__).resolve().parents[1]
REMEDIES = REPO / "configs" / "remedies"
TINY = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false"]


def _fit(config, root, *extra):
    return run(["fit", "--config", str(REMEDIES / config), f"--trainer.default_root_dir={root}",
                *TINY, *extra])


def test_mmd_vae_config_trains_and_logs_the_mmd(tmp_path):
    cli = _fit("mmd_vae.yaml", tmp_path)
    assert type(cli.model).__name__ == "MMDVAE"
    assert (cli.model.beta, cli.model.mmd_weight, cli.model.kernel) == (0.0, 1000.0, "rbf")
    assert cli.trainer.global_step == 2
    assert bool(torch.isfinite(cli.trainer.callback_metrics["train/mmd"]))


def test_pretrained_recipe_chains_the_autoencoder_into_the_free_bits_vae(tmp_path):
    ae = _fit("pretrained_ae.yaml", tmp_path / "ae")
    ckpt = Path(ae.trainer.log_dir) / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    # No training step: the VAE the CLI builds holds the autoencoder's encoder as saved.
    start = run(["validate", "--config", str(REMEDIES / "pretrained_free_bits.yaml"),
                 f"--trainer.default_root_dir={tmp_path / 'start'}", f"--model.init_from={ckpt}",
                 "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false"])
    encoder = start.model.encoder.state_dict()
    assert encoder.keys() == {k[len("encoder."):] for k in saved if k.startswith("encoder.")}
    assert all(torch.equal(v, saved[f"encoder.{k}"]) for k, v in encoder.items())
    # The paper resets the decoder: it is not the autoencoder's.
    assert not torch.equal(start.model.decoder.state_dict()["net.0.weight"],
                           saved["decoder.net.0.weight"])
    vae = _fit("pretrained_free_bits.yaml", tmp_path / "vae", f"--model.init_from={ckpt}")
    assert isinstance(vae.model, VAE) and vae.model.free_bits == 0.5
    assert vae.trainer.global_step == 2
    assert bool(torch.isfinite(vae.trainer.callback_metrics["train/loss_step"]))


def test_lagging_vae_config_trains_aggressively(tmp_path):
    cli = _fit("lagging_vae.yaml", tmp_path, "--model.max_inner_steps=3",
               "--trainer.callbacks=[]", "--trainer.limit_val_batches=1")
    assert type(cli.model).__name__ == "LaggingVAE"
    assert cli.model.aggressive  # one I_q measured: never a switch at the first
    assert math.isfinite(cli.model.last_mutual_info)
    # two batches, each: up to 3 encoder steps (at least 2·window = 20 capped to 3) + 1 decoder
    assert cli.trainer.global_step == 2 * (3 + 1)
    assert float(cli.trainer.callback_metrics["train/inner_steps"]) == 3.0


def test_lagging_vae_resumes_from_the_cli_checkpoint_in_its_phase(tmp_path):
    first = _fit("lagging_vae.yaml", tmp_path, "--model.max_inner_steps=3",
                 "--trainer.callbacks=[]", "--trainer.limit_val_batches=1")
    ckpt = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    # The checkpoint the CLI wrote (weights-only loading, digest checked) holds the phase.
    state = load_checkpoint(ckpt)["lagging_vae"]
    assert state == {"aggressive": True, "last_mutual_info": first.model.last_mutual_info}
    second = _fit("lagging_vae.yaml", tmp_path, "--model.max_inner_steps=3",
                  "--trainer.callbacks=[]", "--trainer.limit_val_batches=1",
                  "--trainer.max_epochs=2", "--ckpt_path=last")
    assert second.trainer.current_epoch == 2
    # Still aggressive in the second epoch: 3 encoder steps and 1 decoder step per batch.
    assert second.trainer.global_step == 2 * 2 * (3 + 1)
    assert float(second.trainer.callback_metrics["train/aggressive"]) == 1.0
