"""Pictures for TensorBoard: reconstructions and prior samples as image grids."""

from __future__ import annotations

import inspect

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid

from ilvae.errors import check_int


def tensorboard(trainer: L.Trainer):
    """The ``SummaryWriter`` of the first TensorBoard logger, or None."""
    for logger in trainer.loggers:
        writer = getattr(logger, "experiment", None)
        if writer is not None and hasattr(writer, "add_image"):
            return writer
    return None


class ImageLogger(L.Callback):
    """Every ``every_n_epochs`` validation epochs, log to TensorBoard

    - ``images/reconstructions``: validation images (top rows) above their reconstructions
      (bottom rows), both from the model's ``reconstructions(batch)`` (x and E[x|z = E_q z];
      for a conditional model the targets y and E[y|x, z = E_q z]);
    - ``images/samples``: the model's ``sample(n)``, E[x|z] for z drawn from its own prior
      (N(0, η² I), a mixture, a hierarchy), from generators seeded by ``seed`` (the same draws
      every epoch, and the training's random streams untouched).

    Only for images (what the model reconstructs has the shape (C, H, W)); for other shapes it
    does nothing. It uses the model's ``reconstructions`` and ``sample`` only, never its layers;
    a model whose ``sample`` needs more than a count (a conditional model) shows no samples.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 32, seed: int = 0) -> None:
        check_int("every_n_epochs", every_n_epochs)
        check_int("num_images", num_images)
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.seed = seed

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        writer = tensorboard(trainer)
        dm = getattr(trainer, "datamodule", None)
        if writer is None or dm is None or not hasattr(dm, "tensors"):
            return
        batch = [t[: self.num_images].to(pl_module.device) for t in dm.tensors("val")]
        step = trainer.global_step
        with torch.inference_mode():
            x, recon = pl_module.reconstructions(batch)
            if x.dim() != 4:
                return
            shape = tuple(x.shape[1:])
            x, recon = x.float(), recon.float().clamp(0, 1)
            nrow = min(8, x.shape[0])
            grid = make_grid(torch.cat([x, recon]).cpu(), nrow=nrow, pad_value=1.0)
            writer.add_image("images/reconstructions", grid, step)
            samples = self._samples(pl_module, shape)
            if samples is not None:
                writer.add_image("images/samples", make_grid(samples.cpu(), nrow=8,
                                                             pad_value=1.0), step)

    def _samples(self, pl_module: L.LightningModule, shape: tuple) -> torch.Tensor | None:
        """The model's own ``sample(n)`` (its prior: a mixture, a hierarchy, N(0, η² I)) with the
        random generators seeded by ``seed`` inside a fork, so that every epoch shows the same
        draws and the training's random streams are left as they were."""
        sample = getattr(pl_module, "sample", None)
        if not callable(sample) or _needs_more_than_a_count(sample):
            return None  # e.g. a conditional model, whose samples need the condition
        device = pl_module.device
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            return sample(self.num_images).reshape(-1, *shape).clamp(0, 1)


def _needs_more_than_a_count(fn) -> bool:
    """Whether ``fn(n)`` cannot be called with the number of samples alone."""
    signature = inspect.signature(fn)
    params = list(signature.parameters.values())
    if not params or params[0].name not in ("n", "num_samples", "count"):
        return True
    try:
        signature.bind(1)
    except TypeError:
        return True
    return False
