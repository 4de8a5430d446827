"""Pictures of a model's images: reconstructions and prior samples as image grids, upscaled so
that small images (8×8 digits, 28×28 MNIST) are readable, sent to every logger that shows
pictures (:mod:`ilvae.loggers`)."""

from __future__ import annotations

import inspect
import math

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid

from ilvae import loggers
from ilvae.errors import check, check_int

#: Shorter side, in pixels, that an image reaches at least under the default upscaling.
READABLE_PIXELS = 112


def upscale_factor(shape: tuple[int, ...], factor: int | None = None) -> int:
    """``factor`` itself, or when None the smallest integer k with k·min(H, W) ≥ 112 pixels
    (4 for 28×28, 14 for 8×8; 1 for images already that large)."""
    if factor is not None:
        return factor
    return max(1, math.ceil(READABLE_PIXELS / min(shape[-2:])))


def upscale(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour upscaling of (N, C, H, W) images by an integer ``factor``: every pixel
    becomes a ``factor``×``factor`` block (no blur, so pixels stay visible as pixels)."""
    if factor == 1:
        return images
    return torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")


def image_grid(images: torch.Tensor, nrow: int = 8, factor: int | None = None) -> torch.Tensor:
    """(N, C, H, W) images in [0, 1] as one (3, H', W') grid, ``nrow`` images per row, each
    upscaled by :func:`upscale_factor` and separated by white lines."""
    k = upscale_factor(tuple(images.shape), factor)
    return make_grid(upscale(images.float().cpu(), k), nrow=nrow, padding=2, pad_value=1.0)


class ImageLogger(L.Callback):
    """Every ``every_n_epochs`` validation epochs, log to every logger that shows pictures
    (TensorBoard, MLflow, W&B; see :mod:`ilvae.loggers`)

    - ``images/reconstructions``: validation images (top rows) above their reconstructions
      (bottom rows), both from the model's ``reconstructions(batch)`` (x and E[x|z = E_q z];
      for a conditional model the targets y and E[y|x, z = E_q z]);
    - ``images/samples``: the model's ``sample(n)``, E[x|z] for z drawn from its own prior
      (N(0, η² I), a mixture, a hierarchy), from generators seeded by ``seed`` (the same draws
      every epoch, and the training's random streams untouched).

    Only for images (what the model reconstructs has the shape (C, H, W)); for other shapes it
    does nothing. It uses the model's ``reconstructions`` and ``sample`` only, never its layers;
    a model whose ``sample`` needs more than a count (a conditional model) shows no samples.

    Each image is enlarged by nearest-neighbour upscaling by the integer ``upscale`` (default:
    the smallest factor that makes it at least 112 pixels high and wide, 4 for 28×28 MNIST, 14
    for 8×8 digits), so that every logger's viewer shows readable digits.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 32, seed: int = 0,
                 upscale: int | None = None) -> None:
        check_int("every_n_epochs", every_n_epochs)
        check_int("num_images", num_images)
        if upscale is not None and (isinstance(upscale, bool) or not isinstance(upscale, int)
                                    or upscale < 1):
            check("upscale", upscale, "a positive integer, or null for the automatic factor")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.seed = seed
        self.upscale = upscale

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        dm = getattr(trainer, "datamodule", None)
        if not loggers.picture_loggers(trainer) or dm is None or not hasattr(dm, "tensors"):
            return
        batch = [t[: self.num_images].to(pl_module.device) for t in dm.tensors("val")]
        for tag, grid in self.grids(pl_module, batch).items():
            loggers.log_image(trainer, tag, grid, trainer.global_step)

    def grids(self, pl_module: L.LightningModule, batch: list[torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        """The pictures for a validation ``batch``: ``images/reconstructions`` (the batch's
        images above their reconstructions) and ``images/samples`` (``num_images`` seeded prior
        samples), as upscaled (3, H, W) grids; empty when the model's data are not images."""
        with torch.inference_mode():
            x, recon = pl_module.reconstructions(batch)
            if x.dim() != 4:
                return {}
            shape = tuple(x.shape[1:])
            x, recon = x.float(), recon.float().clamp(0, 1)
            nrow = min(8, x.shape[0])
            out = {"images/reconstructions": image_grid(torch.cat([x, recon]), nrow, self.upscale)}
            samples = self._samples(pl_module, shape)
            if samples is not None:
                out["images/samples"] = image_grid(samples, 8, self.upscale)
        return out

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
