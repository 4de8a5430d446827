"""Fréchet distance between model samples and real images, computed by torchmetrics.

    FID = ‖μ_r − μ_g‖² + tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2})        (Heusel et al. 2017)

with (μ, Σ) the mean and covariance of a feature network's activations on real (r) and
generated (g) images. torchmetrics' ``FrechetInceptionDistance`` accumulates the sums behind
(μ, Σ) batch by batch (float64) and synchronises them across processes; its feature network is
a torch-fidelity feature extractor named by its registry name (:class:`FeatureNetwork`):

- ``"inception-v3-compat"``: torch-fidelity's InceptionV3, the standard FID. torch-fidelity
  downloads its weights on first use; offline, pass ``weights_path`` (a local copy of
  torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``). That file is read with
  ``torch.load(weights_only=False)`` by torch-fidelity: give it only files you trust.
- ``"ilvae-classifier"`` (:data:`CLASSIFIER_EXTRACTOR`): the penultimate layer of a small CNN
  trained on the same data set (:mod:`ilvae.fid_classifier`). It needs no download, so tests
  and offline users get an FID-type score; it is comparable between runs that share a
  classifier file, not with published Inception FIDs. ``weights_path`` is the classifier file.

The extractor is also registered with torch-fidelity (:class:`ClassifierFeatureExtractor`), so
``torch_fidelity.calculate_metrics(..., feature_extractor="ilvae-classifier")`` gives KID,
precision/recall and the rest on the same features. ``python -m benchmarks --only fid``
compares both libraries' FID (values and speed).

Images become uint8 ``round(255 · clamp(x, 0, 1))`` for the feature network. torch-fidelity's
own extractors (Inception, VGG, CLIP, DINOv2) expect RGB, so 1-channel images are repeated to 3
channels for them; the classifier gets the channels it was trained on.

Train a classifier on any labelled ilvae datamodule::

    ilvae fid-classifier --data Digits --out digits_classifier.pt

then score with ``compute_fid(real, fake, weights_path="digits_classifier.pt")`` or the
``ilvae.callbacks.FID`` callback with ``feature_extractor="ilvae-classifier"``.

Example::

    >>> from ilvae.fid import compute_fid
    >>> compute_fid(x_real, x_fake, weights_path="clf.pt")             # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch_fidelity
from torch import Tensor, nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torchmetrics.image.fid import FrechetInceptionDistance

from ilvae.errors import ConfigurationError, check
from ilvae.fid_classifier import (
    COMMAND,
    FeatureClassifier,
    FeatureClassifierModule,
    classifier_accuracy,
    load_feature_classifier,
    save_feature_classifier,
    train_feature_classifier,
)

__all__ = [
    "CLASSIFIER_EXTRACTOR",
    "INCEPTION_EXTRACTOR",
    "ClassifierFeatureExtractor",
    "FeatureClassifier",
    "FeatureClassifierModule",
    "FeatureNetwork",
    "check_feature_extractor",
    "classifier_accuracy",
    "compute_fid",
    "fid_metric",
    "load_feature_classifier",
    "save_feature_classifier",
    "to_uint8",
    "train_feature_classifier",
]

CLASSIFIER_EXTRACTOR = "ilvae-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"
_RGB_PREFIXES = ("inception-", "vgg", "clip-", "dinov2-")


# ------------------------------------------------------------------ torch-fidelity plug-in
class ClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor over a :class:`FeatureClassifier` file.

    Registered as :data:`CLASSIFIER_EXTRACTOR`; torch-fidelity builds it with the
    ``feature_extractor_weights_path`` argument of ``calculate_metrics`` as the classifier file.

    Features: ``"features"`` (penultimate layer; the default for FID, KID and PRC) and
    ``"logits"`` (default for ISC), returned in float64 so that torch-fidelity's numpy
    statistics keep double precision.

    Input conversion: torch-fidelity feeds uint8 tensors (N, C, H, W) in [0, 255]; they become
    floats x / 255 in [0, 1], the range the classifier was trained on. When the channel count
    differs from the classifier's (torch-fidelity's image-folder input always loads RGB), 3
    channels are averaged to 1, which is exact for grey images stored as RGB, and 1 channel is
    repeated to 3. Images of another height or width are resized bilinearly (with
    anti-aliasing) to the classifier's size.
    """

    def __init__(self, name: str, features_list: Sequence[str],
                 feature_extractor_weights_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(name, list(features_list))
        vassert(feature_extractor_weights_path is not None,
                f'Feature extractor "{name}" needs feature_extractor_weights_path: a classifier '
                f"file made by `{COMMAND}`")
        self.classifier = load_feature_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits"}.get(metric, "features")

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8,
                "Expecting images as a torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4, f"Input is not BxCxHxW: {tuple(x.shape)}")
        channels, height, width = self.classifier.input_shape
        x = x.float() / 255.0
        if x.shape[1] != channels:
            if channels == 1 and x.shape[1] == 3:
                x = x.mean(1, keepdim=True)
            elif channels == 3 and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            else:
                raise ValueError(f"classifier expects {channels} channels, got {x.shape[1]}")
        if tuple(x.shape[-2:]) != (height, width):
            x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                              antialias=True)
        features = self.classifier.features(x)
        out = {"features": features, "logits": self.classifier.head(features)}
        return tuple(out[name].double() for name in self.features_list)


if CLASSIFIER_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(CLASSIFIER_EXTRACTOR, ClassifierFeatureExtractor)



# ------------------------------------------------------------------------- FID helpers
def to_uint8(images: Tensor) -> Tensor:
    """Images (N, C, H, W) — float in [0, 1] or already uint8 — as uint8 round(255·clamp(x)).

    (N, H, W) is read as one channel. Non-finite values are rejected.
    """
    images = torch.as_tensor(images).detach()
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    images = images.float()
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images contain NaN or infinite values")
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def check_feature_extractor(feature_extractor: str, weights_path: str | os.PathLike | None,
                            owner: str = "") -> str | None:
    """The checked ``weights_path`` (as a string) for a registered ``feature_extractor``;
    ``owner`` prefixes the field names of the error messages."""
    if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        check(f"{owner}feature_extractor", feature_extractor, "one of the extractors registered "
              f"with torch-fidelity: {', '.join(sorted(FEATURE_EXTRACTORS_REGISTRY))}")
    if weights_path is None:
        if feature_extractor == CLASSIFIER_EXTRACTOR:
            check(f"{owner}weights_path", weights_path, f"a classifier file made by `{COMMAND}` "
                  f"(feature_extractor={CLASSIFIER_EXTRACTOR!r} needs one)")
        return None
    return os.fspath(weights_path)


class FeatureNetwork(nn.Module):
    """A torch-fidelity feature extractor as the ``feature=`` module of torchmetrics' FID.

    ``forward(images)`` takes images (N, C, H, W), float in [0, 1] or uint8, converts them
    with :func:`to_uint8` (repeating 1 channel to 3 for the RGB extractors) and returns the
    extractor's FID layer (its ``get_default_feature_layer_for_metric("fid")``) as float64
    ``(N, d)``. No parameter trains.
    """

    def __init__(self, feature_extractor: str = CLASSIFIER_EXTRACTOR,
                 weights_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        weights_path = check_feature_extractor(feature_extractor, weights_path)
        cls = FEATURE_EXTRACTORS_REGISTRY[feature_extractor]
        self.layer = cls.get_default_feature_layer_for_metric("fid")
        self.rgb = feature_extractor.startswith(_RGB_PREFIXES)
        try:
            self.extractor = cls(feature_extractor, [self.layer],
                                 feature_extractor_weights_path=weights_path)
        except OSError as exc:
            if weights_path is not None or feature_extractor != INCEPTION_EXTRACTOR:
                raise
            raise ConfigurationError(
                f"could not get the Inception weights for feature_extractor="
                f"{INCEPTION_EXTRACTOR!r} ({type(exc).__name__}: {exc}). torch-fidelity "
                "downloads them on first use; offline, pass weights_path=<local copy of "
                "torch-fidelity's weights-inception-2015-12-05-6726825d.pth>, or use "
                f"feature_extractor={CLASSIFIER_EXTRACTOR!r} with a classifier made by "
                f"`{COMMAND}`") from exc
        self.extractor.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> FeatureNetwork:
        return super().train(False)  # a fixed network: never in training mode

    def forward(self, images: Tensor) -> Tensor:
        images = to_uint8(images)
        if self.rgb and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.extractor(images)[0].reshape(len(images), -1).double()


def fid_metric(feature_extractor: str = CLASSIFIER_EXTRACTOR,
               weights_path: str | os.PathLike | None = None,
               image_shape: Sequence[int] = (1, 28, 28),
               reset_real_features: bool = True) -> FrechetInceptionDistance:
    """torchmetrics' ``FrechetInceptionDistance`` over :class:`FeatureNetwork`.

    ``update(images, real=True|False)`` with images (B, C, H, W), float in [0, 1] or uint8;
    ``compute()`` gives the FID in float64. ``image_shape`` is one image's (C, H, W), used to
    find the feature size; ``reset_real_features=False`` keeps the real statistics across
    ``reset()`` (real images fixed over training).
    """
    network = FeatureNetwork(feature_extractor, weights_path)
    return FrechetInceptionDistance(feature=network, reset_real_features=reset_real_features,
                                    normalize=False, input_img_size=tuple(image_shape))


def _images(images: Tensor) -> Tensor:
    images = to_uint8(images)
    if len(images) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(images)}")
    return images


def compute_fid(images1: Tensor, images2: Tensor, *,
                feature_extractor: str = CLASSIFIER_EXTRACTOR,
                weights_path: str | os.PathLike | None = None, batch_size: int = 256,
                device: str | torch.device | None = None) -> float:
    """FID between two image sets (N, C, H, W), float in [0, 1] or uint8, by torchmetrics.

    Args:
        images1, images2: the two sets (typically real data and model samples).
        feature_extractor: a torch-fidelity registry name: :data:`CLASSIFIER_EXTRACTOR`
            (needs ``weights_path``), :data:`INCEPTION_EXTRACTOR` (downloads its weights
            unless ``weights_path`` is given) or any other registered extractor.
        weights_path: the extractor's weights file (torch-fidelity's
            ``feature_extractor_weights_path``).
        batch_size: images per feature-extraction batch.
        device: where features are computed; default CUDA when available, else CPU.

    Nothing is written to disk and no worker processes are started.
    """
    if weights_path is not None and not os.path.isfile(weights_path):
        check("weights_path", os.fspath(weights_path), "an existing file or None")
    images1, images2 = _images(images1), _images(images2)
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    metric = fid_metric(feature_extractor, weights_path, images1.shape[1:]).to(device)
    with torch.inference_mode():
        for real, images in ((True, images1), (False, images2)):
            for chunk in images.split(int(batch_size)):
                metric.update(chunk.to(device), real=real)
        return float(metric.compute())


def main(argv: Sequence[str] | None = None) -> int:
    """The former ``python -m ilvae.fid train``: points to ``ilvae fid-classifier``."""
    print(f"ilvae: `python -m ilvae.fid train` is now `{COMMAND}` (options --data.*, "
          "--model.*, --trainer.*; see --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
