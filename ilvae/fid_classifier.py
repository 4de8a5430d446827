"""The feature classifier behind the offline FID-type score: a small CNN trained on labelled
images by Lightning, saved as a weights-only file.

Its penultimate layer is the feature network of :data:`ilvae.fid.CLASSIFIER_EXTRACTOR`: FID
computed on it needs no download and is comparable between runs that share a classifier file
(not with published Inception FIDs). Train and save one on any labelled ilvae datamodule::

    ilvae fid-classifier --data Digits --out digits_classifier.pt
    ilvae fid-classifier --data MNIST --data.root data --out mnist_classifier.pt \\
        --trainer.max_epochs 5 --model.width 16

(LightningCLI options: ``--data.*`` for the datamodule, ``--model.*`` for
:class:`FeatureClassifierModule`, ``--trainer.*``, ``--seed_everything``). From Python::

    >>> from ilvae.fid_classifier import train_feature_classifier
    >>> clf = train_feature_classifier(x, y, path="clf.pt")            # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from ilvae.errors import ConfigurationError, check, check_int, check_number

__all__ = [
    "FeatureClassifier",
    "FeatureClassifierModule",
    "classifier_accuracy",
    "load_feature_classifier",
    "main",
    "save_feature_classifier",
    "train_feature_classifier",
]

COMMAND = "ilvae fid-classifier --data NAME --out PATH"
_FORMAT = "ilvae.fid.FeatureClassifier"
_FORMAT_VERSION = 1
_PLAIN = (str, int, float, bool, type(None))


def quantise(x: Tensor) -> Tensor:
    """round(255 · clamp(x, 0, 1)) / 255: the image exactly as the FID feature network sees it
    after the uint8 conversion (:func:`ilvae.fid.to_uint8`)."""
    return x.clamp(0, 1).mul(255).round().div(255)


# --------------------------------------------------------------------------- network
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
            check("input_shape", input_shape, "image sizes (C, H, W)")
        if num_classes is None:
            check("num_classes", None, "an integer >= 2: the feature classifier needs labelled "
                  "data")
        self.input_shape = input_shape
        self.num_classes = check_int("num_classes", num_classes, 2)
        self.feature_dim = check_int("feature_dim", feature_dim, 1)
        self.width = check_int("width", width, 1)
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


def _check_labelled(x: Tensor, y: Tensor, split: str, num_classes: int | None = None) -> None:
    if x.ndim != 4:
        check(f"{split} images shape", tuple(x.shape), "(N, C, H, W)")
    if y.ndim != 1 or len(y) != len(x):
        check(f"{split} labels shape", tuple(y.shape), f"({len(x)},)")
    if len(y) and int(y.min()) < 0:
        check(f"{split} label", int(y.min()), "class indices >= 0: the feature classifier needs "
              "labelled data")
    if num_classes is not None and len(y) and int(y.max()) >= num_classes:
        check("num_classes", num_classes, f"more than the largest {split} label {int(y.max())}")


# ----------------------------------------------------------------------- LightningModule
class FeatureClassifierModule(LightningModule):
    """Trains a :class:`FeatureClassifier` by cross-entropy on ``(x, y)`` batches, with Adam.

    Images in [0, 1] are quantised to 256 grey levels first (:func:`quantise`), exactly as the
    FID feature network sees them. Logs ``train/loss``, and ``val/loss`` and ``val/accuracy``
    on a validation split. The network is :attr:`classifier`; save it with
    :func:`save_feature_classifier`.

    Args:
        input_shape: ``(C, H, W)`` of the images (linked from the datamodule by the CLI).
        num_classes: number of labels (linked from the datamodule by the CLI).
        feature_dim: size of the feature layer used by FID.
        width: channels of the first convolution.
        lr: Adam's learning rate.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int | None,
                 feature_dim: int = 64, width: int = 32, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.classifier = FeatureClassifier(input_shape, num_classes, feature_dim, width)
        self.lr = check_number("lr", lr, strict=True)
        self.val_accuracy = MulticlassAccuracy(self.classifier.num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(quantise(x))

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "tensors"):
            _check_labelled(*datamodule.tensors("train"), "training",
                            self.classifier.num_classes)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_accuracy.update(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), batch_size=len(y))
        self.log("val/accuracy", self.val_accuracy, batch_size=len(y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.classifier.parameters(), lr=self.lr)


@torch.no_grad()
def classifier_accuracy(classifier: FeatureClassifier, x: Tensor, y: Tensor,
                        batch_size: int = 1024) -> float:
    """Share of images (N, C, H, W) in [0, 1] whose arg-max logit equals the label."""
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    correct = 0
    for start in range(0, len(x), batch_size):
        xb = quantise(x[start:start + batch_size].float()).to(device)
        correct += int((classifier(xb).argmax(1).cpu() == y[start:start + batch_size]).sum())
    classifier.train(was_training)
    return correct / max(len(x), 1)


def _accuracies(classifier: FeatureClassifier, splits: dict[str, tuple[Tensor, Tensor]]
                ) -> dict[str, float]:
    return {f"{name}_accuracy": classifier_accuracy(classifier, x.cpu(), y.cpu())
            for name, (x, y) in splits.items() if len(x)}


def _loader(x: Tensor, y: Tensor, batch_size: int, seed: int | None) -> DataLoader:
    from ilvae.datamodules.base import EpochShuffleSampler, InMemoryDataset, collate_batch

    dataset = InMemoryDataset(x, y)
    sampler = None if seed is None else EpochShuffleSampler(dataset, seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_batch)


def _devices(device: str | torch.device) -> dict[str, Any]:
    device = torch.device(device)
    if device.type == "cpu":
        return {"accelerator": "cpu", "devices": 1}
    return {"accelerator": "gpu" if device.type == "cuda" else device.type,
            "devices": [device.index or 0]}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """A Trainer inside a function (or inside another run's callback): without Lightning's
    banners (devices, tips) and its note that a classifier without validation data skips
    validation."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*`validation_step` but have no")
            yield
    finally:
        logger.setLevel(level)


def train_feature_classifier(x: Tensor, y: Tensor, *, num_classes: int | None = None,
                             x_val: Tensor | None = None, y_val: Tensor | None = None,
                             feature_dim: int = 64, width: int = 32, epochs: int = 15,
                             batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                             device: str | torch.device = "cpu",
                             path: str | os.PathLike | None = None,
                             metadata: dict[str, Any] | None = None) -> FeatureClassifier:
    """Train a :class:`FeatureClassifier` on tensors with :class:`FeatureClassifierModule`
    (a Lightning ``Trainer``, ``epochs`` epochs on ``device``) and optionally save it.

    Deterministic in ``seed`` on a given device (initial weights and batch order); the global
    random state is left untouched. The training accuracy is stored in
    ``classifier.metadata["train_accuracy"]`` (and in the saved file), and with
    ``x_val``/``y_val`` the held-out accuracy as ``val_accuracy``.

    Returns the classifier in eval mode, on the CPU.
    """
    x = torch.as_tensor(x).detach().cpu().float()
    y = torch.as_tensor(y).detach().cpu().long()
    _check_labelled(x, y, "training")
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    _check_labelled(x, y, "training", num_classes)
    epochs, batch_size = check_int("epochs", epochs, 1), check_int("batch_size", batch_size, 1)
    splits = {"train": (x, y)}
    if x_val is not None and y_val is not None:
        splits["val"] = (torch.as_tensor(x_val).cpu().float(), torch.as_tensor(y_val).cpu().long())
        _check_labelled(*splits["val"], "validation", num_classes)
    where = _devices(device)
    forked = where["devices"] if where["accelerator"] == "gpu" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        module = FeatureClassifierModule(x.shape[1:], num_classes, feature_dim, width, lr)
        val = _loader(*splits["val"], 1024, None) if "val" in splits else None
        with _quiet():
            trainer = Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False,
                              enable_progress_bar=False, enable_model_summary=False,
                              num_sanity_val_steps=0, limit_val_batches=None if val else 0,
                              **where)
            trainer.fit(module, train_dataloaders=_loader(x, y, batch_size, seed),
                        val_dataloaders=val)
    classifier = module.classifier.cpu().eval()
    classifier.metadata = {**(metadata or {}), **_accuracies(classifier, splits)}
    if path is not None:
        save_feature_classifier(classifier, path)
    return classifier


# ------------------------------------------------------------------------------ file
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
        check("weights_path", path, f"an existing classifier file: train one with `{COMMAND}`")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        check("weights_path", path, "an ilvae feature classifier file (saved by "
              "ilvae.fid.save_feature_classifier)")
    if payload.get("version", 0) > _FORMAT_VERSION:
        raise ConfigurationError(f"weights_path={path!r} has classifier format version "
                                 f"{payload['version']}, newer than this ilvae supports "
                                 f"({_FORMAT_VERSION})")
    classifier = FeatureClassifier(payload["input_shape"], payload["num_classes"],
                                   payload["feature_dim"], payload["width"])
    classifier.load_state_dict(payload["state_dict"])
    classifier.metadata = dict(payload.get("metadata", {}))
    return classifier.to(map_location).eval()


# --------------------------------------------------------------------------- command
def _cli_class() -> type:
    from lightning.pytorch.cli import LightningCLI

    class FeatureClassifierCLI(LightningCLI):
        """``--data`` (any ilvae datamodule with labels), ``--model.*``, ``--trainer.*`` and
        ``--out``, the classifier file (never overwritten)."""

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_argument("--out", required=True,
                                help="where to save the classifier (must not exist yet)")
            parser.link_arguments("data.data_shape", "model.input_shape",
                                  apply_on="instantiate")
            parser.link_arguments("data.num_classes", "model.num_classes",
                                  apply_on="instantiate")

        def before_instantiate_classes(self) -> None:
            out = self.config.out
            if os.path.exists(out):
                check("out", out, "a path that does not exist yet (an existing file is never "
                      "overwritten)")

    return FeatureClassifierCLI


def build(args: list[str]) -> Any:
    """The command's LightningCLI with model, data and Trainer built, before training."""
    import ilvae.datamodules  # noqa: F401  (short datamodule names: --data Digits)
    from ilvae.datamodules.base import VAEDataModule

    return _cli_class()(
        FeatureClassifierModule, VAEDataModule, subclass_mode_data=True, run=False, args=args,
        seed_everything_default=0, save_config_callback=None,
        trainer_defaults={"max_epochs": 15, "logger": False, "enable_checkpointing": False,
                          "enable_model_summary": False},
        parser_kwargs={"exit_on_error": False, "prog": "ilvae fid-classifier",
                       "description": "Train the FID feature classifier on a labelled "
                                      "datamodule and save it to --out."},
    )


def fit(cli: Any) -> FeatureClassifier | None:
    """Train the command's classifier and save it to ``--out``; returns it (None off rank 0)."""
    datamodule = cli.datamodule
    cli.trainer.fit(cli.model, datamodule=datamodule)
    if not cli.trainer.is_global_zero:
        return None
    classifier = cli.model.classifier.cpu().eval()
    splits = {name: datamodule.tensors(name) for name in ("train", "val")}
    classifier.metadata = {"data": type(datamodule).__name__,
                           **_accuracies(classifier, splits)}
    save_feature_classifier(classifier, cli.config.out)
    return classifier


def main(argv: Sequence[str] | None = None) -> int:
    """``ilvae fid-classifier --data NAME --out PATH [--trainer.max_epochs N …]``."""
    import argparse

    from ilvae.cli import argument_error_line, user_error_line

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cli = build(argv)
    except argparse.ArgumentError as exc:
        print(f"ilvae: error: {argument_error_line(exc)}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:  # ConfigurationError and the datamodules' checks
        print(f"ilvae: error: {user_error_line(exc)}", file=sys.stderr)
        return 2
    try:
        classifier = fit(cli)
    except ConfigurationError as exc:
        print(f"ilvae: error: {user_error_line(exc)}", file=sys.stderr)
        return 2
    if classifier is not None:
        accuracy = {k: round(v, 4) for k, v in classifier.metadata.items()
                    if k.endswith("accuracy")}
        print(f"ilvae: saved feature classifier to {cli.config.out} {accuracy}")
    return 0
