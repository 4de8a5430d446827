"""Pictures for TensorBoard: reconstructions and prior samples as image grids."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid


def tensorboard(trainer: L.Trainer):
    """The ``SummaryWriter`` of the first TensorBoard logger, or None."""
    for logger in trainer.loggers:
        writer = getattr(logger, "experiment", None)
        if writer is not None and hasattr(writer, "add_image"):
            return writer
    return None


class ImageLogger(L.Callback):
    """Every ``every_n_epochs`` validation epochs, log to TensorBoard

    - ``images/reconstructions``: validation images (top rows) above E[x|z = E_q z] (bottom rows);
    - ``images/samples``: E[x|z] for z ~ p(z) (a fixed set of draws, so epochs compare).

    Only for image data (``data_shape`` = (C, H, W)); for other shapes it does nothing. It uses
    the model's ``reconstruct`` and ``decoder``/``prior`` only, never its layers.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 32, seed: int = 0) -> None:
        if every_n_epochs < 1 or num_images < 1:
            raise ValueError("every_n_epochs and num_images must be positive integers, got "
                             f"{every_n_epochs} and {num_images}")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.seed = seed

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        shape = tuple(getattr(pl_module, "data_shape", ()))
        writer = tensorboard(trainer)
        dm = getattr(trainer, "datamodule", None)
        if writer is None or len(shape) != 3 or dm is None or not hasattr(dm, "tensors"):
            return
        x = dm.tensors("val")[0][: self.num_images].to(pl_module.device)
        step = trainer.global_step
        with torch.inference_mode():
            recon = pl_module.reconstruct(x).clamp(0, 1)
            nrow = min(8, x.shape[0])
            grid = make_grid(torch.cat([x, recon]).cpu(), nrow=nrow, pad_value=1.0)
            writer.add_image("images/reconstructions", grid, step)
            if hasattr(pl_module, "prior") and hasattr(pl_module, "decoder"):
                gen = torch.Generator().manual_seed(self.seed)
                z = torch.randn(self.num_images, pl_module.latent_dim, generator=gen)
                z = z.to(pl_module.device) * getattr(pl_module.prior, "scale", 1.0)
                samples = pl_module.decoder.mean(z).reshape(-1, *shape).clamp(0, 1)
                writer.add_image("images/samples", make_grid(samples.cpu(), nrow=8,
                                                             pad_value=1.0), step)
