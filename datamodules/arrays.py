"""A user's own array as a data set: ``.npy`` or ``.pt`` files, one example per row."""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch
from torch import Tensor

from ilvae.errors import check

from .base import VAEDataModule

_NUMPY = (".npy",)
_TORCH = (".pt", ".pth")


def _kind(path: str, field: str) -> str:
    extension = os.path.splitext(path)[1].lower()
    if extension in _NUMPY:
        return "numpy"
    if extension in _TORCH:
        return "torch"
    check(field, path, f"a file with extension {', '.join(_NUMPY + _TORCH)} (not "
                       f"{extension!r})")


def _npy_header(path: str, field: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file, read from its header only."""
    try:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            if version[0] == 1:
                shape, _, dtype = np.lib.format.read_array_header_1_0(file)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(file)
    except ValueError as error:
        raise ValueError(f"{field}={path!r} is not a valid .npy file ({error})") from None
    return tuple(shape), dtype


def _torch_load(path: str, field: str) -> Tensor:
    """Load a tensor saved with ``torch.save``, never unpickling arbitrary objects."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{field}={path!r} could not be loaded as a tensor with torch.load(weights_only=True)"
            f" ({reason})"
        ) from None
    if not torch.is_tensor(obj):
        raise ValueError(
            f"{field}={path!r} must hold a single tensor saved with torch.save, "
            f"got {type(obj).__name__}"
        )
    return obj


def _open(path: str, field: str) -> np.ndarray | Tensor:
    """Memory-map (``.npy``) or load (``.pt``) an array without reading a ``.npy`` into memory."""
    if _kind(path, field) == "numpy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            # A header that promises more data than the file holds: a truncated copy.
            raise ValueError(
                f"{field}={path!r} is truncated or corrupted: {error} (is the file complete?)"
            ) from None
    return _torch_load(path, field)


def _check_dtype(path: str, field: str, dtype: np.dtype | torch.dtype, integer: bool) -> None:
    if isinstance(dtype, torch.dtype):
        ok_int = not dtype.is_floating_point and not dtype.is_complex
        ok_real = ok_int or dtype.is_floating_point
    else:
        ok_int = dtype.kind in "biu"
        ok_real = dtype.kind in "biuf"
    if integer and not ok_int:
        raise ValueError(
            f"{field}={path!r} must hold integer class labels, got dtype {dtype} "
            "(convert with .astype(np.int64) or .long())"
        )
    if not ok_real:
        raise ValueError(f"{field}={path!r} must hold real numbers, got non-numeric dtype {dtype}")


class ArrayDataModule(VAEDataModule):
    """Train on a ``.npy`` or ``.pt`` array whose first axis indexes examples.

    The array must have at least two dimensions, ``(N, *data_shape)``: a table ``(N, D)``, images
    ``(N, C, H, W)``, and so on. A 1-d array is rejected rather than guessed at: save scalar data
    as ``(N, 1)`` and a single example as ``(1, D)``. Values are converted to float32 and must
    be finite; integer and boolean arrays are accepted.

    ``.npy`` files are memory-mapped and ``.pt`` files (a single tensor from ``torch.save``) are
    read with ``torch.load(weights_only=True)``, so only the header is read in ``__init__`` and
    no arbitrary object is ever unpickled. The test split is the validation split (there is no
    official test split).

    Args:
        path: the data file (``.npy``, ``.pt`` or ``.pth``).
        labels_path: optional file of integer labels, shape ``(N,)`` or ``(N, 1)``; ``-1`` marks
            an unlabelled row. ``num_classes`` is ``max label + 1``. Without it labels are all -1.
        batch_size, val_fraction, seed, num_workers, drop_last: see :class:`VAEDataModule`.
    """

    def __init__(
        self,
        path: str,
        labels_path: str | None = None,
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
        self.path = self._check_file(path, "path")
        shape = self._read_shape()
        if len(shape) < 2:
            hint = " (save scalar data as (N, 1), one example as (1, D))" if shape else ""
            raise ValueError(
                f"path={self.path!r} must hold an array of shape (N, ...) with one example per "
                f"row and at least 2 dimensions, got shape {shape}{hint}"
            )
        if 0 in shape:
            raise ValueError(f"path={self.path!r} holds an empty array of shape {shape}")
        self._data_shape = tuple(shape[1:])
        self._num_examples = shape[0]
        self.labels_path = None
        self._labels: Tensor | None = None
        if labels_path is not None:
            self.labels_path = self._check_file(labels_path, "labels_path")
            self._labels = self._read_labels()
            labelled = self._labels[self._labels >= 0]
            self._num_classes = int(labelled.max()) + 1 if len(labelled) else None

    @staticmethod
    def _check_file(path: object, field: str) -> str:
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            check(field, path, "a file path")
        path = os.fspath(path)
        _kind(path, field)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{field}={path!r} does not exist or is not a file")
        return path

    def _read_shape(self) -> tuple[int, ...]:
        if _kind(self.path, "path") == "numpy":
            shape, dtype = _npy_header(self.path, "path")
        else:
            tensor = _torch_load(self.path, "path")
            shape, dtype = tuple(tensor.shape), tensor.dtype
        _check_dtype(self.path, "path", dtype, integer=False)
        return shape

    def _read_labels(self) -> Tensor:
        assert self.labels_path is not None
        field, path = "labels_path", self.labels_path
        if _kind(path, field) == "numpy":
            _, dtype = _npy_header(path, field)
            _check_dtype(path, field, dtype, integer=True)
            labels = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
        else:
            labels = _torch_load(path, field)
            _check_dtype(path, field, labels.dtype, integer=True)
            labels = labels.to(torch.long)
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1 or len(labels) != self._num_examples:
            raise ValueError(
                f"labels_path={path!r} must hold {self._num_examples} labels of shape "
                f"({self._num_examples},) to match path={self.path!r}, got shape "
                f"{tuple(labels.shape)}"
            )
        if len(labels) and int(labels.min()) < -1:
            raise ValueError(
                f"labels_path={path!r} must hold labels >= 0 (or -1 for unlabelled), "
                f"got {int(labels.min())}"
            )
        return labels.contiguous()

    def _load_train(self) -> tuple[Tensor, Tensor | None]:
        data = _open(self.path, "path")
        if isinstance(data, np.ndarray):
            x = torch.from_numpy(np.array(data, dtype=np.float32))
        else:
            x = data.to(torch.float32, copy=True)
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(f"path={self.path!r} holds {bad} NaN or infinite values")
        return x, self._labels
