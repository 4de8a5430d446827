"""Fréchet distance between model samples and real images, computed by torch-fidelity.

    FID = ‖μ_r − μ_g‖² + tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2})        (Heusel et al. 2017)

with (μ, Σ) the mean and covariance of a feature network's activations on real (r) and
generated (g) images. Two feature networks are supported, both by their torch-fidelity
registry name:

- ``"inception-v3-compat"``: torch-fidelity's InceptionV3, the standard FID. torch-fidelity
  downloads its weights on first use; offline, pass ``weights_path`` (a local copy of
  torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``). That file is read with
  ``torch.load(weights_only=False)`` by torch-fidelity: give it only files you trust.
- ``"ilvae-classifier"`` (:data:`CLASSIFIER_EXTRACTOR`): the penultimate layer of a small CNN
  that this module trains on the same data set. It needs no download, so tests and offline
  users get an FID-type score; it is comparable between runs that share a classifier file, not
  with published Inception FIDs. ``weights_path`` is the classifier file.

Images go to torch-fidelity as uint8 tensors ``(N, C, H, W)``: a float image in [0, 1] becomes
``round(255 · clamp(x, 0, 1))``. torch-fidelity's own extractors (Inception, VGG, CLIP, DINOv2)
expect RGB, so 1-channel images are repeated to 3 channels for them; the classifier gets the
channels it was trained on (see :class:`ClassifierFeatureExtractor`).

Train and save a classifier on any ilvae datamodule (labels required)::

    python -m ilvae.fid train --data Digits --out digits_classifier.pt
    python -m ilvae.fid train --data MNIST --out mnist_classifier.pt --epochs 5 \\
        --data-arg root=data

then score with ``compute_fid(real, fake, weights_path="digits_classifier.pt")`` or the
``ilvae.callbacks.FID`` callback with ``feature_extractor="ilvae-classifier"``.

Example::

    >>> from ilvae.fid import compute_fid, train_feature_classifier
    >>> clf = train_feature_classifier(x, y, path="clf.pt")            # doctest: +SKIP
    >>> compute_fid(x_real, x_fake, weights_path="clf.pt")             # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import ast
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch_fidelity
from torch import Tensor, nn
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from ilvae.errors import ConfigurationError

__all__ = [
    "CLASSIFIER_EXTRACTOR",
    "INCEPTION_EXTRACTOR",
    "ClassifierFeatureExtractor",
    "FeatureClassifier",
    "classifier_accuracy",
    "compute_fid",
    "load_feature_classifier",
    "main",
    "save_feature_classifier",
    "to_uint8",
    "train_feature_classifier",
]

CLASSIFIER_EXTRACTOR = "ilvae-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"
_FORMAT = "ilvae.fid.FeatureClassifier"
_FORMAT_VERSION = 1
_RGB_PREFIXES = ("inception-", "vgg", "clip-", "dinov2-")


# --------------------------------------------------------------------------- classifier
class FeatureClassifier(nn.Module):
    """A small CNN classifier whose penultimate layer serves as FID features.

    conv3×3(C→w) → ReLU → conv3×3(w→2w, stride 2 when the image side is ≥ 16) → ReLU →
    adaptive average pool to 4×4 → linear(32w → feature_dim) → ReLU  = ``features(x)``,
    then linear(feature_dim → num_classes) = logits.

    Args:
        input_shape: ``(C, H, W)`` of the images, pixel values in [0, 1].
        num_classes: number of labels.
        feature_dim: size of the feature layer used by FID.
        width: channels of the first convolution, w.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, feature_dim: int = 64,
                 width: int = 32) -> None:
        super().__init__()
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) != 3 or min(input_shape) <= 0:
            raise ConfigurationError(f"input_shape={input_shape} is not allowed: expected image "
                                     "sizes (C, H, W)")
        _check_int("num_classes", num_classes, 2)
        _check_int("feature_dim", feature_dim, 1)
        _check_int("width", width, 1)
        self.input_shape = input_shape
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        self.width = int(width)
        c, h, w = input_shape
        stride = 2 if min(h, w) >= 16 else 1
        self.trunk = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=stride), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        self.metadata: dict[str, Any] = {}

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations, shape (B, feature_dim), for images (B, C, H, W) in [0, 1]."""
        return self.trunk(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits, shape (B, num_classes)."""
        return self.head(self.features(x))

    def config(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "feature_dim": self.feature_dim, "width": self.width}


def _check_int(field: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ConfigurationError(f"{field}={value!r} is not allowed: expected an integer >= "
                                 f"{minimum}")
    return int(value)


def _check_labelled(x: Tensor, y: Tensor, field: str) -> None:
    if x.ndim != 4:
        raise ConfigurationError(f"{field} images must have shape (N, C, H, W), got "
                                 f"{tuple(x.shape)}")
    if y.ndim != 1 or len(y) != len(x):
        raise ConfigurationError(f"{field} labels must have shape ({len(x)},), got "
                                 f"{tuple(y.shape)}")
    if len(y) and int(y.min()) < 0:
        raise ConfigurationError(f"{field} labels must be class indices >= 0: the feature "
                                 "classifier needs labelled data (got label "
                                 f"{int(y.min())})")


def _quantise(x: Tensor) -> Tensor:
    """The image exactly as the feature extractor will see it after torch-fidelity's uint8."""
    return to_uint8(x).float() / 255.0


@torch.no_grad()
def classifier_accuracy(classifier: FeatureClassifier, x: Tensor, y: Tensor,
                        batch_size: int = 1024) -> float:
    """Share of images (N, C, H, W) in [0, 1] whose arg-max logit equals the label."""
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    correct = 0
    for start in range(0, len(x), batch_size):
        xb = _quantise(x[start:start + batch_size]).to(device)
        correct += int((classifier(xb).argmax(1).cpu() == y[start:start + batch_size]).sum())
    classifier.train(was_training)
    return correct / max(len(x), 1)


def train_feature_classifier(x: Tensor, y: Tensor, *, num_classes: int | None = None,
                             x_val: Tensor | None = None, y_val: Tensor | None = None,
                             feature_dim: int = 64, width: int = 32, epochs: int = 15,
                             batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                             device: str | torch.device = "cpu",
                             path: str | os.PathLike | None = None,
                             metadata: dict[str, Any] | None = None) -> FeatureClassifier:
    """Train a :class:`FeatureClassifier` by cross-entropy with Adam and optionally save it.

    Images ``x`` (N, C, H, W) in [0, 1] are quantised to uint8 and back first, exactly as the
    feature extractor sees them. Training runs on ``device``; on a given device it is
    deterministic in ``seed`` and leaves the global random state untouched. The training
    accuracy is stored in ``classifier.metadata["train_accuracy"]`` (and in the saved file),
    and with ``x_val``/``y_val`` the held-out accuracy as ``val_accuracy``.

    Returns the classifier in eval mode, on the CPU.
    """
    x = torch.as_tensor(x).detach().cpu()
    y = torch.as_tensor(y).detach().cpu().long()
    _check_labelled(x, y, "training")
    if num_classes is None:
        num_classes = int(y.max()) + 1
    if int(y.max()) >= num_classes:
        raise ConfigurationError(f"num_classes={num_classes} is too small for label "
                                 f"{int(y.max())}")
    epochs, batch_size = _check_int("epochs", epochs, 1), _check_int("batch_size", batch_size, 1)
    device = torch.device(device)
    xq, y_dev = _quantise(x).to(device), y.to(device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        classifier = FeatureClassifier(x.shape[1:], num_classes, feature_dim, width).to(device)
        optimiser = torch.optim.Adam(classifier.parameters(), lr=lr)
        order = torch.Generator().manual_seed(seed)
        classifier.train()
        for _ in range(epochs):
            permutation = torch.randperm(len(xq), generator=order).to(device)
            for start in range(0, len(xq), batch_size):
                index = permutation[start:start + batch_size]
                loss = F.cross_entropy(classifier(xq[index]), y_dev[index])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
    classifier = classifier.cpu().eval()
    classifier.metadata = dict(metadata or {})
    classifier.metadata["train_accuracy"] = classifier_accuracy(classifier, x, y)
    if x_val is not None and y_val is not None:
        x_val, y_val = torch.as_tensor(x_val).cpu(), torch.as_tensor(y_val).cpu().long()
        _check_labelled(x_val, y_val, "validation")
        classifier.metadata["val_accuracy"] = classifier_accuracy(classifier, x_val, y_val)
    if path is not None:
        save_feature_classifier(classifier, path)
    return classifier


_PLAIN = (str, int, float, bool, type(None))


def save_feature_classifier(classifier: FeatureClassifier, path: str | os.PathLike,
                            **metadata: Any) -> None:
    """Save weights, sizes and metadata (plain str/int/float/bool values) to ``path``.

    The file holds only tensors and plain Python values, so it loads with
    ``torch.load(path, weights_only=True)``. It is written to a temporary file and renamed, so
    an existing file is never left half-written.
    """
    meta = {**classifier.metadata, **metadata}
    bad = [k for k, v in meta.items() if not isinstance(v, _PLAIN)]
    if bad:
        raise TypeError(f"classifier metadata must be str/int/float/bool/None; not so: {bad}")
    state = {k: v.detach().cpu() for k, v in classifier.state_dict().items()}
    payload = {"format": _FORMAT, "version": _FORMAT_VERSION, **classifier.config(),
               "metadata": meta, "state_dict": state}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_feature_classifier(path: str | os.PathLike,
                            map_location: str | torch.device = "cpu") -> FeatureClassifier:
    """Rebuild a classifier saved by :func:`save_feature_classifier` (``weights_only`` load)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigurationError(f"weights_path={path!r} is not a file: train a classifier with "
                                 "`python -m ilvae.fid train --data NAME --out PATH`")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ConfigurationError(f"weights_path={path!r} is not an ilvae feature classifier "
                                 "(saved by ilvae.fid.save_feature_classifier)")
    if payload.get("version", 0) > _FORMAT_VERSION:
        raise ConfigurationError(f"weights_path={path!r} has classifier format version "
                                 f"{payload['version']}, newer than this ilvae supports "
                                 f"({_FORMAT_VERSION})")
    classifier = FeatureClassifier(payload["input_shape"], payload["num_classes"],
                                   payload["feature_dim"], payload["width"])
    classifier.load_state_dict(payload["state_dict"])
    classifier.metadata = dict(payload.get("metadata", {}))
    return classifier.to(map_location).eval()


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
                "file made by `python -m ilvae.fid train --data NAME --out PATH`")
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


class _ImageTensors(Dataset):
    """uint8 images held in memory, one per item, as torch-fidelity's datasets return them."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


def _as_input(images: Tensor, feature_extractor: str) -> _ImageTensors:
    images = to_uint8(images).cpu()
    if len(images) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(images)}")
    if feature_extractor.startswith(_RGB_PREFIXES) and images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return _ImageTensors(images.contiguous())


def compute_fid(images1: Tensor, images2: Tensor, *,
                feature_extractor: str = CLASSIFIER_EXTRACTOR,
                weights_path: str | os.PathLike | None = None, batch_size: int = 256,
                device: str | torch.device | None = None, verbose: bool = False) -> float:
    """FID between two image sets (N, C, H, W), float in [0, 1] or uint8, by torch-fidelity.

    Args:
        images1, images2: the two sets (typically real data and model samples).
        feature_extractor: a torch-fidelity registry name: :data:`CLASSIFIER_EXTRACTOR`
            (needs ``weights_path``), :data:`INCEPTION_EXTRACTOR` (downloads its weights
            unless ``weights_path`` is given) or any other registered extractor.
        weights_path: the extractor's weights file (torch-fidelity's
            ``feature_extractor_weights_path``).
        batch_size: images per feature-extraction batch.
        device: where features are computed; default CUDA when available, else CPU.
        verbose: let torch-fidelity print progress.

    Nothing is cached on disk and no worker processes are started.
    """
    if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ConfigurationError(f"feature_extractor={feature_extractor!r} is not registered "
                                 f"with torch-fidelity; registered: "
                                 f"{sorted(FEATURE_EXTRACTORS_REGISTRY)}")
    if weights_path is not None:
        weights_path = os.fspath(weights_path)
        if not os.path.isfile(weights_path):
            raise ConfigurationError(f"weights_path={weights_path!r} is not a file")
    elif feature_extractor == CLASSIFIER_EXTRACTOR:
        raise ConfigurationError(f"feature_extractor={CLASSIFIER_EXTRACTOR!r} needs "
                                 "weights_path: a classifier file made by `python -m ilvae.fid "
                                 "train --data NAME --out PATH`")
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    kwargs = dict(input1=_as_input(images1, feature_extractor),
                  input2=_as_input(images2, feature_extractor), fid=True,
                  feature_extractor=feature_extractor,
                  feature_extractor_weights_path=weights_path, batch_size=int(batch_size),
                  cuda=device.type == "cuda", cache=False, save_cpu_ram=True, verbose=verbose)
    try:
        if device.type == "cuda":
            with torch.cuda.device(device):
                metrics = torch_fidelity.calculate_metrics(**kwargs)
        else:
            metrics = torch_fidelity.calculate_metrics(**kwargs)
    except OSError as exc:
        if weights_path is not None or feature_extractor != INCEPTION_EXTRACTOR:
            raise
        raise ConfigurationError(
            f"could not get the Inception weights for feature_extractor="
            f"{INCEPTION_EXTRACTOR!r} ({type(exc).__name__}: {exc}). torch-fidelity downloads "
            "them on first use; offline, pass weights_path=<local copy of torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth>, or use "
            f"feature_extractor={CLASSIFIER_EXTRACTOR!r} with a classifier made by "
            "`python -m ilvae.fid train --data NAME --out PATH`") from exc
    return float(metrics[torch_fidelity.KEY_METRIC_FID])


# ---------------------------------------------------------------------------- command
def _datamodule_class(name: str) -> type:
    import importlib
    import pkgutil

    from lightning.pytorch import LightningDataModule

    import ilvae.datamodules as package

    if ":" in name:
        module_name, _, class_name = name.partition(":")
        return getattr(importlib.import_module(module_name), class_name)
    found: dict[str, type] = {}
    candidates = [package] + [importlib.import_module(f"{package.__name__}.{info.name}")
                              for info in pkgutil.iter_modules(package.__path__)]
    for module in candidates:
        for attr, value in vars(module).items():
            if (isinstance(value, type) and issubclass(value, LightningDataModule)
                    and hasattr(value, "tensors") and not attr.startswith("_")):
                found.setdefault(attr, value)
    if name not in found:
        raise ConfigurationError(f"--data={name!r} is not an ilvae datamodule; available: "
                                 f"{sorted(found)} (or 'module:Class')")
    return found[name]


def _data_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ilvae.fid train --data NAME --out PATH``: train and save the classifier."""
    parser = argparse.ArgumentParser(prog="python -m ilvae.fid", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the FID feature classifier on a datamodule")
    train.add_argument("--data", required=True, help="datamodule class name, e.g. Digits, MNIST")
    train.add_argument("--data-arg", action="append", type=_data_arg, default=[],
                       metavar="KEY=VALUE", help="datamodule argument (repeatable)")
    train.add_argument("--out", required=True, help="where to save the classifier")
    train.add_argument("--epochs", type=int, default=15)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--feature-dim", type=int, default=64)
    train.add_argument("--width", type=int, default=32)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    args = parser.parse_args(argv)
    try:
        datamodule = _datamodule_class(args.data)(**dict(args.data_arg))
        x, y = datamodule.tensors("train")
        x_val, y_val = datamodule.tensors("val")
        if len(x_val) == 0:
            x_val = y_val = None
        classifier = train_feature_classifier(
            x, y, num_classes=getattr(datamodule, "num_classes", None), x_val=x_val,
            y_val=y_val, feature_dim=args.feature_dim, width=args.width, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
            path=args.out,
            metadata={"data": args.data})
    except ValueError as exc:  # ConfigurationError and the datamodules' argument checks
        parser.exit(2, f"error: {exc}\n")
    accuracy = {k: round(v, 4) for k, v in classifier.metadata.items() if k.endswith("accuracy")}
    print(f"saved feature classifier to {args.out} {accuracy}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
