"""Collapse metrics: the importance-weighted NLL (K = 500) and the whole ``CollapseMonitor`` pass
against the cost of K plain forward passes.

Floor: for every batch, the encoder once and then K forward passes of the decoder on the same
batch, each with its likelihood log p(x|z_k), i.e. what evaluating the reconstruction term K
times costs; no estimator can do less than compute log p(x|z_k) for K samples. The network-only
floor (decoder outputs without the likelihood) is recorded beside it. All under
``torch.inference_mode`` (as in a validation loop), MLP VAE 784-512-16, batches of 128.

The monitor pass is ``Trainer.validate`` with a ``CollapseMonitor`` computing every metric
(active units, mutual information, ε-collapse, KL per dimension, IW-NLL with K = 500, relative
Fisher divergence) over all validation examples, timed from the start to the end of the
validation epoch (the model's own validation steps, the TensorBoard logging and the KL bar chart
included).
"""

from __future__ import annotations

import os
import time
from typing import Any

import lightning as L
import torch
from torch import Tensor

from benchmarks._common import Settings, interleave, quiet, random_images, row, side

GROUP = "metrics"
DIM, LATENT, BATCH, K = 784, 16, 128, 500


def _datamodule(x: Tensor) -> Any:
    from ilvae.datamodules.base import VAEDataModule

    class RandomImages(VAEDataModule):
        """All of ``x`` as the validation split (half of the pool is the training split)."""

        def __init__(self) -> None:
            super().__init__(batch_size=BATCH, val_fraction=0.5)
            self._data_shape = (DIM,)

        def _load_train(self) -> tuple[Tensor, None]:
            return torch.cat([x, x]), None

    return RandomImages()


class _Clock(L.Callback):
    """Time of the start (first in the callback list) or end (last) of the validation epoch."""

    def __init__(self) -> None:
        self.start = self.end = 0.0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.end = time.perf_counter()


def run(settings: Settings) -> list[dict[str, Any]]:
    from lightning.pytorch.loggers import TensorBoardLogger

    from ilvae.callbacks import CollapseMonitor
    from ilvae.metrics import ImportanceWeightedNLL
    from ilvae.models import VAE

    n = settings.pick(128, 10_000)
    repeats = settings.pick(settings.repeats, min(settings.repeats, 3))
    torch.manual_seed(0)
    model = VAE(data_shape=(DIM,), latent_dim=LATENT).eval()
    x = random_images(n, DIM, seed=3)
    batches = x.split(BATCH)
    root = os.path.join(settings.scratch, "metrics")

    def floor() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for xb in batches:
                posterior = model.encode(xb)
                for _ in range(K):
                    model.decoder.log_prob(xb, posterior.sample())
        return time.perf_counter() - start

    def network_floor() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for xb in batches:
                posterior = model.encode(xb)
                for _ in range(K):
                    model.decoder(posterior.sample())
        return time.perf_counter() - start

    def iw_nll() -> float:
        metric = ImportanceWeightedNLL(num_samples=K)
        start = time.perf_counter()
        with torch.inference_mode():
            for xb in batches:
                metric.update(xb, model)
            metric.compute()
        return time.perf_counter() - start

    def monitor() -> float:
        first, last = _Clock(), _Clock()
        callbacks = [first, CollapseMonitor(num_iw_samples=K, max_examples=None), last]
        with quiet():
            trainer = L.Trainer(accelerator="cpu", devices=1, callbacks=callbacks,
                                logger=TensorBoardLogger(root), enable_progress_bar=False,
                                enable_model_summary=False, enable_checkpointing=False)
            trainer.validate(model, datamodule=_datamodule(x))
        return last.end - first.start

    samples = interleave({"floor": floor, "network_floor": network_floor, "iw_nll": iw_nll,
                          "monitor": monitor}, repeats, warmup=settings.pick(0, 1))
    how = f"{n} examples, K = {K}, batch {BATCH}, MLP VAE {DIM}-512-{LATENT}"
    base = side(f"K plain forward passes (encoder once, decoder + log p(x|z) {K} times)",
                samples["floor"], "s", examples=n)
    net = side(f"network only (encoder once, decoder {K} times, no likelihood)",
               samples["network_floor"], "s", examples=n)
    return [
        row("iw_nll_vs_forward_floor", GROUP, base,
            side("ImportanceWeightedNLL(num_samples=500)", samples["iw_nll"], "s", examples=n),
            higher_is_better=False, goal=1.2, notes=how),
        row("collapse_monitor_vs_forward_floor", GROUP, base,
            side("CollapseMonitor validation epoch (all metrics)", samples["monitor"], "s",
                 examples=n),
            higher_is_better=False, goal=1.2, notes=how),
        row("iw_nll_vs_network_floor", GROUP, net,
            side("ImportanceWeightedNLL(num_samples=500)", samples["iw_nll"], "s", examples=n),
            higher_is_better=False,
            notes=f"{how}; context: what the likelihood itself costs on top of the network"),
    ]
