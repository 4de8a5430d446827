"""FID callback: Fréchet distance between samples from the prior and real data, every N epochs.

    FID = ‖μ_r − μ_g‖² + tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2})        (Heusel et al. 2017)

computed by torchmetrics' ``FrechetInceptionDistance`` over a torch-fidelity feature network
(see :mod:`ilvae.fid` for the networks and image conversion) and logged as ``val/fid``.
"""

from __future__ import annotations

import math
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance

from ilvae.errors import ConfigurationError, check, check_int
from ilvae.fid import (
    CLASSIFIER_EXTRACTOR,
    INCEPTION_EXTRACTOR,
    check_feature_extractor,
    fid_metric,
    load_feature_classifier,
    to_uint8,
    train_feature_classifier,
)

_STAGES = ("train", "fit", "val", "validate", "test")


class FID(Callback):
    """Log ``val/fid`` between ``num_samples`` draws E[x|z], z ~ p(z), and real data.

    At the end of every ``every_n_epochs``-th validation epoch of ``fit`` (and of every
    ``validate`` run) the callback draws ``pl_module.sample(n)`` in eval mode under
    ``torch.inference_mode()``, with the random state forked and seeded by ``seed`` (the same
    z every time, so successive scores differ only through the model, and training's random
    stream is untouched), and compares the samples with real images of the datamodule's
    ``stage`` split (``datamodule.tensors(stage)``; a fixed random subset of ``num_samples``
    when the split is larger). Images must have shape (C, H, W) with values in [0, 1].

    The statistics are torchmetrics' ``FrechetInceptionDistance`` (:func:`ilvae.fid.fid_metric`):
    the real images' are computed at the first score of a ``fit``/``validate`` run and kept,
    so later scores extract features of the samples only.

    Distributed runs: every process draws the same seeded samples, and process r of W extracts
    features of samples and real images r, r + W, r + 2W, …; torchmetrics sums the statistics
    over the processes, so every rank logs the same number, the single-process FID (up to
    float64 rounding). With ``train_classifier``, rank 0 trains the classifier and the others
    wait at a barrier, so ``weights_path`` must be on a file system every rank sees.

    Args:
        every_n_epochs: score after validation of epochs N, 2N, … (1-based).
        num_samples: number of prior samples (and at most as many real images).
        feature_extractor: torch-fidelity registry name: ``"inception-v3-compat"`` (standard
            FID; torch-fidelity downloads its weights unless ``weights_path`` is given) or
            ``"ilvae-classifier"`` (offline; needs ``weights_path``), or another registered one.
        weights_path: local weights: the Inception file or the classifier file made by
            ``ilvae fid-classifier --data NAME --out PATH``.
        stage: split of the real data: ``train``, ``val`` or ``test``.
        train_classifier: with ``"ilvae-classifier"`` and no file at ``weights_path``, train
            the classifier on the datamodule's training split at setup and save it there.
        batch_size: images per sampling and feature-extraction batch.
        seed: seed of the prior draws and of the real-data subset.

    Example::

        trainer = Trainer(callbacks=[FID(every_n_epochs=5, feature_extractor="ilvae-classifier",
                                         weights_path="digits_classifier.pt")])
    """

    metric_name = "val/fid"

    def __init__(self, every_n_epochs: int = 5, num_samples: int = 1000,
                 feature_extractor: str = INCEPTION_EXTRACTOR, weights_path: str | None = None,
                 stage: str = "val", train_classifier: bool = False, batch_size: int = 256,
                 seed: int = 0) -> None:
        for field, value, minimum in (("every_n_epochs", every_n_epochs, 1),
                                      ("num_samples", num_samples, 2),
                                      ("batch_size", batch_size, 1), ("seed", seed, 0)):
            check_int(field, value, minimum)
        if stage not in _STAGES:
            check("stage", stage, f"one of {', '.join(_STAGES)}")
        if feature_extractor == CLASSIFIER_EXTRACTOR and weights_path is None:
            check("weights_path", weights_path, "a classifier file made by `ilvae fid-classifier "
                  f"--data NAME --out PATH` with feature_extractor={CLASSIFIER_EXTRACTOR!r} (or "
                  "set train_classifier=True to make it at setup)")
        self.weights_path = check_feature_extractor(feature_extractor, weights_path)
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.feature_extractor = feature_extractor
        self.stage = stage
        self.train_classifier = bool(train_classifier)
        self.batch_size = batch_size
        self.seed = seed
        self._real: Tensor | None = None
        self._metric: FrechetInceptionDistance | None = None

    # ------------------------------------------------------------------ set-up checks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate"):
            return
        self._real = self._metric = None
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "tensors"):
            raise ConfigurationError("FID needs a datamodule with tensors(stage) (every ilvae "
                                     "datamodule has one) to read the real images")
        data_shape = tuple(getattr(pl_module, "data_shape", ()))
        if len(data_shape) != 3:
            raise ConfigurationError(f"FID needs image data of shape (C, H, W); the model's "
                                     f"data_shape is {data_shape}")
        if len(datamodule.tensors(self.stage)[0]) < 2:
            check("stage", self.stage, "a split with at least 2 images")
        path = self.weights_path
        if path is not None and not os.path.isfile(path):
            if self.feature_extractor != CLASSIFIER_EXTRACTOR or not self.train_classifier:
                check("weights_path", path, "an existing file (or train_classifier=True with "
                      f"feature_extractor={CLASSIFIER_EXTRACTOR!r})")
            if trainer.is_global_zero:
                x, y = datamodule.tensors("train")
                train_feature_classifier(x, y, num_classes=getattr(datamodule, "num_classes",
                                                                   None), path=path)
            trainer.strategy.barrier("ilvae-fid-classifier")
        if self.feature_extractor == CLASSIFIER_EXTRACTOR:
            trained_on = load_feature_classifier(path).input_shape
            channels = {trained_on[0], data_shape[0]}
            if len(channels) > 1 and channels != {1, 3}:
                check("weights_path", path, f"a classifier of images with the data's "
                      f"{data_shape[0]} channels (1 and 3 convert); it takes {trained_on}")
            if trained_on != data_shape:
                rank_zero_warn(f"FID classifier {path!r} was trained on images {trained_on}, the "
                               f"data are {data_shape}: images will be converted")

    # ------------------------------------------------------------------------ scoring
    def on_validation_epoch_end(self, trainer: pl.Trainer,
                                pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        value = self.score(pl_module, self._real_images(trainer.datamodule),
                           rank=trainer.global_rank, world_size=trainer.world_size)
        pl_module.log(self.metric_name, value, on_step=False, on_epoch=True, batch_size=1)

    def score(self, pl_module: pl.LightningModule, real: Tensor, rank: int = 0,
              world_size: int = 1) -> float:
        """FID between ``num_samples`` prior samples of ``pl_module`` and images ``real``.

        Process ``rank`` of ``world_size`` extracts features of its share of both sets; every
        process must call it (the statistics are summed across processes). ``real`` is read
        at the first call only: later calls reuse its statistics.
        """
        samples = self.sample(pl_module)
        if not bool(torch.isfinite(samples).all()):
            # Every rank draws the same samples, so all of them return here together.
            rank_zero_warn("FID: the model's samples contain NaN or infinite values; "
                           "logging val/fid = nan")
            return math.nan
        device = pl_module.device
        with torch.inference_mode():
            if self._metric is None:
                self._metric = fid_metric(self.feature_extractor, self.weights_path,
                                          real.shape[1:], reset_real_features=False).to(device)
                self._update(real[rank::world_size], real=True, device=device)
            self._update(samples[rank::world_size], real=False, device=device)
            value = float(self._metric.compute())
            self._metric.reset()  # keeps the real statistics
        return value

    def _update(self, images: Tensor, real: bool, device: torch.device) -> None:
        for chunk in images.split(self.batch_size):
            if len(chunk):
                self._metric.update(to_uint8(chunk).to(device), real=real)

    def sample(self, pl_module: pl.LightningModule) -> Tensor:
        """``num_samples`` draws E[x|z], z ~ p(z), in eval mode, seeded by ``seed``, on CPU."""
        device = pl_module.device
        forked = [device.index or 0] if device.type == "cuda" else []
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.inference_mode(), torch.random.fork_rng(devices=forked):
                torch.manual_seed(self.seed)
                chunks = [pl_module.sample(min(self.batch_size, self.num_samples - start)).cpu()
                          for start in range(0, self.num_samples, self.batch_size)]
        finally:
            pl_module.train(was_training)
        samples = torch.cat(chunks)
        return samples.reshape(len(samples), *pl_module.data_shape).float()

    def _real_images(self, datamodule: pl.LightningDataModule) -> Tensor:
        if self._real is None:
            x, _ = datamodule.tensors(self.stage)
            if len(x) > self.num_samples:
                generator = torch.Generator().manual_seed(self.seed)
                x = x[torch.randperm(len(x), generator=generator)[:self.num_samples].sort().values]
            self._real = to_uint8(x.cpu())
        return self._real
