"""The datamodule every ilvae dataset subclasses: in-memory tensors, batches by one indexing op.

A subclass declares :attr:`VAEDataModule.data_shape` (and :attr:`num_classes`) in ``__init__``,
so the CLI can link the shape into the model before any data is read, and implements
:meth:`VAEDataModule._load_train` (plus :meth:`VAEDataModule._load_test` where the data set has
an official test split). The base class validates the tensors, splits train/validation
deterministically in ``seed`` and serves batches ``(x, y)``: ``x`` float32 ``(B, *data_shape)``,
``y`` int64 ``(B,)``, ``-1`` where the data have no labels.

Batches are built by indexing the whole tensor once per batch (``InMemoryDataset.__getitems__``)
instead of per-example ``__getitem__`` plus collate. The training order comes from
:class:`EpochShuffleSampler`: a function of ``(seed, epoch)`` split over the trainer's processes,
so a resumed epoch and a multi-process run see the batches of the uninterrupted single-process
run (Lightning keeps it under DDP, since it is a ``DistributedSampler``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ilvae.errors import check, check_int, check_number

_STAGES = {
    "fit": "train",
    "train": "train",
    "validate": "val",
    "val": "val",
    "test": "test",
    "predict": "test",
}


def seeded_generator(seed: int, stream: str) -> torch.Generator:
    """A ``torch.Generator`` seeded from ``(seed, stream)``.

    Distinct stream names ("split", "shuffle", "test", ...) give independent random streams for
    the same user seed, so drawing a test sample never shifts the training sample.
    """
    key = int.from_bytes(hashlib.sha256(stream.encode()).digest()[:4], "big")
    words = np.random.SeedSequence(seed, spawn_key=(key,)).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


class InMemoryDataset(Dataset):
    """Examples ``x`` with labels ``y`` held as two tensors of the same length.

    The DataLoader's fetcher calls :meth:`__getitems__` with the batch's index list, so a batch
    costs one indexing op per tensor; :func:`collate_batch` then passes it through unchanged.
    """

    def __init__(self, x: Tensor, y: Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.x[index], self.y[index]


def collate_batch(batch: tuple[Tensor, Tensor] | list[tuple[Tensor, Tensor]]) -> tuple:
    """Return a batch built by :meth:`InMemoryDataset.__getitems__` unchanged.

    A list of ``(x, y)`` pairs (a wrapper dataset without ``__getitems__``) is stacked instead.
    """
    if isinstance(batch, tuple):
        return batch
    xs, ys = zip(*batch, strict=False)
    return torch.stack(xs), torch.stack(ys)


class EpochShuffleSampler(DistributedSampler):
    """Training order that depends only on ``(seed, epoch)``, split over ``num_replicas``
    processes.

    Epoch e is ``torch.randperm(n)`` drawn from a generator seeded with ``seed + e`` (exactly
    torch's ``DistributedSampler``); process r of W takes positions r, r + W, r + 2W, … (padded
    to a multiple of W by repeating the first indices). The W processes' k-th batches of size B
    therefore hold exactly the examples of the single-process k-th batch of size W·B.

    Lightning calls :meth:`set_epoch` at every epoch start, so a resumed run replays an epoch in
    the order the interrupted run used. Iterated without ``set_epoch`` (plain PyTorch), each new
    iteration moves on to the next epoch's order. It is a ``DistributedSampler`` so that
    Lightning keeps it under DDP instead of replacing it with its own.

    ``generator`` is reseeded from ``(seed, epoch)`` with the order: given to the DataLoader,
    it makes the worker seeds a function of the epoch too.
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0,
                 epoch: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=False)
        self.generator = torch.Generator()
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.generator.manual_seed(self.seed + self.epoch + 1)

    def __iter__(self):
        indices = super().__iter__()
        self.set_epoch(self.epoch + 1)
        return indices


class VAEDataModule(LightningDataModule):
    """Base datamodule: deterministic train/val/test splits of in-memory tensors.

    Args:
        batch_size: examples per batch (>= 1), for every split.
        val_fraction: share of the training pool held out for validation, ``0 <= f < 1``. With
            ``0`` the validation split is empty (Lightning then skips validation).
        seed: drives the train/val split, training-set shuffling and any sampling a subclass
            does (>= 0). Two runs with the same seed see the same splits and batch order.
        num_workers: DataLoader worker processes (``0`` builds batches in the main process,
            usually fastest for in-memory data).
        drop_last: drop the last incomplete training batch.

    Splits: ``train`` and ``val`` partition the training pool; ``test`` is the data set's
    official test split where one exists, else the validation split, else (``val_fraction=0``)
    the training split. ``predict`` serves the test split.
    """

    def __init__(
        self,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.val_fraction = check_number("val_fraction", val_fraction, maximum=1.0,
                                         strict_maximum=True)
        self.seed = check_int("seed", seed, 0)
        self.num_workers = check_int("num_workers", num_workers, 0)
        if not isinstance(drop_last, bool):
            check("drop_last", drop_last, "true or false")
        self.drop_last = drop_last
        self._data_shape: tuple[int, ...] | None = None
        self._num_classes: int | None = None
        self._splits: dict[str, tuple[Tensor, Tensor]] | None = None
        self.save_hyperparameters(logger=False)

    # -- contract -------------------------------------------------------------------------------

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one example, known right after ``__init__``."""
        if self._data_shape is None:
            raise NotImplementedError(f"{type(self).__name__} must set _data_shape in __init__")
        return self._data_shape

    @property
    def num_classes(self) -> int | None:
        """Number of label classes, or ``None`` when the data have no labels."""
        return self._num_classes

    def _load_train(self) -> tuple[Tensor, Tensor | None]:
        """Return the training pool ``(x, y)``; ``y`` may be ``None`` (no labels)."""
        raise NotImplementedError

    def _load_test(self) -> tuple[Tensor, Tensor | None] | None:
        """Return the official test split ``(x, y)``, or ``None`` where there is none."""
        return None

    # -- Lightning hooks ------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Load, validate and split the data once; later calls (any stage) reuse the splits."""
        if self._splits is not None:
            return
        x, y = self._validate(*self._load_train(), split="training")
        train_index, val_index = self._split_indices(len(x))
        if self.drop_last and len(train_index) < self.batch_size:
            check("batch_size", self.batch_size, f"at most the {len(train_index)} training "
                  "examples with drop_last=True (else no training batch is left)")
        splits = {
            "train": (x[train_index], y[train_index]),
            "val": (x[val_index], y[val_index]),
        }
        test = self._load_test()
        if test is not None:
            splits["test"] = self._validate(*test, split="test")
        elif len(val_index) > 0:
            splits["test"] = splits["val"]
        else:
            splits["test"] = splits["train"]
        self._splits = splits

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def tensors(self, stage: str) -> tuple[Tensor, Tensor]:
        """The full ``(x, y)`` of a split: ``"train"``/``"fit"``, ``"val"``/``"validate"``,
        ``"test"`` or ``"predict"`` (same as test). Runs :meth:`setup` if needed."""
        if stage not in _STAGES:
            check("stage", stage, f"one of {', '.join(sorted(_STAGES))}")
        if self._splits is None:
            self.setup(stage)
        assert self._splits is not None
        return self._splits[_STAGES[stage]]

    # -- helpers --------------------------------------------------------------------------------

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        x, y = self.tensors(split)
        dataset = InMemoryDataset(x, y)
        sampler = self.shuffle_sampler(dataset) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=self.drop_last and shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_batch,
            generator=sampler.generator if sampler is not None else None,
        )

    def shuffle_sampler(self, dataset: Dataset) -> EpochShuffleSampler:
        """The training sampler: an order that is a function of (seed, epoch), split over the
        trainer's processes, so that a resumed or multi-process run sees the batches of the
        uninterrupted single-process run (see :class:`EpochShuffleSampler`). Subclasses with
        their own loaders pass it as ``sampler=`` (and its ``generator`` as ``generator=``)."""
        trainer = self.trainer
        world, rank, epoch = 1, 0, 0
        if trainer is not None:
            world, rank, epoch = trainer.world_size, trainer.global_rank, trainer.current_epoch
        seed = seeded_generator(self.seed, "shuffle").initial_seed() >> 2
        return EpochShuffleSampler(dataset, seed, num_replicas=world, rank=rank, epoch=epoch)

    def _split_indices(self, n: int) -> tuple[Tensor, Tensor]:
        """Disjoint sorted train/val indices covering ``range(n)``, deterministic in the seed."""
        n_val = round(self.val_fraction * n)
        if self.val_fraction > 0:
            n_val = max(n_val, 1)
        n_val = min(n_val, n - 1)
        order = torch.randperm(n, generator=seeded_generator(self.seed, "split"))
        return order[n_val:].sort().values, order[:n_val].sort().values

    def _validate(self, x: Tensor, y: Tensor | None, split: str) -> tuple[Tensor, Tensor]:
        """Check one split's tensors and return ``(x float32, y int64)``."""
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} {split} data must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim == 0 or len(x) == 0:
            raise ValueError(f"{name} {split} data are empty (shape {tuple(x.shape)})")
        if tuple(x.shape[1:]) != tuple(self.data_shape):
            raise ValueError(
                f"{name} {split} data have example shape {tuple(x.shape[1:])}, "
                f"but data_shape is {tuple(self.data_shape)}"
            )
        if x.is_complex() or not (x.is_floating_point() or x.dtype == torch.bool or _is_int(x)):
            raise ValueError(f"{name} {split} data must be real numbers, got dtype {x.dtype}")
        x = x.to(torch.float32)
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(f"{name} {split} data contain {bad} NaN or infinite values")
        if y is None:
            return x, torch.full((len(x),), -1, dtype=torch.long)
        if not isinstance(y, Tensor) or y.ndim != 1 or len(y) != len(x):
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(
                f"{name} {split} labels must be a 1-d tensor of length {len(x)}, got {shape}"
            )
        if not (_is_int(y) or y.dtype == torch.bool):
            raise ValueError(f"{name} {split} labels must have an integer dtype, got {y.dtype}")
        return x, y.to(torch.long)


def _is_int(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
