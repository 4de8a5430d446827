"""Checkpoint files: atomic writes, loading that never runs code, and errors that name the file.

- :class:`AtomicCheckpointIO` — Lightning ``CheckpointIO`` plugin (the CLI's default). A
  checkpoint is written to a temporary file beside its target, flushed and ``fsync``-ed, then
  renamed over the target with ``os.replace`` (atomic on POSIX and Windows). A process killed at
  any moment therefore leaves either the previous complete file or the new complete file, never
  a partial ``last.ckpt``.
- Each checkpoint it writes carries a SHA-256 digest of its contents (every tensor's bytes and
  every other value), checked on load: a bit flipped in the tensor data, which ``torch.load``
  would load silently, is reported instead of resumed from.
- :func:`load_checkpoint` — ``torch.load`` with ``weights_only=True`` by default: tensors,
  numbers, strings and containers only, so a checkpoint carrying a pickled object (which could
  run arbitrary code when unpickled) is refused instead of executed. Missing, truncated,
  corrupted and refused files raise :class:`~ilvae.errors.CheckpointError` naming the file.
- :func:`check_checkpoint` — the same check before a run starts (memory-mapped, so cheap), so a
  bad ``--ckpt_path`` is reported before anything is written.
- :func:`load_block_weights` — initialise a model's encoder/decoder from another run's
  checkpoint (weights only, names and shapes checked), e.g. ``VAE(init_from=...)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.plugins.io.checkpoint_plugin import CheckpointIO

from ilvae.errors import CheckpointError, ConfigurationError

_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")
DIGEST_KEY = "ilvae_digest"
_LOAD_ERRORS = (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError,
                zipfile.BadZipFile, pickle.UnpicklingError, UnicodeDecodeError)


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible (nor needed) on every platform.
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def digest(checkpoint: dict[str, Any]) -> str:
    """SHA-256 over every leaf of ``checkpoint`` (its digest entry excluded): each tensor's
    dtype, shape and bytes, and the ``repr`` of every other value, with its path."""
    hasher = hashlib.sha256()

    def walk(value: Any, path: str) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach()
            hasher.update(f"{path}|T|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            if tensor.numel():
                raw = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)
                hasher.update(memoryview(raw.numpy()))
        elif isinstance(value, dict):
            for key in sorted(value, key=repr):
                if not (path == "" and key == DIGEST_KEY):
                    walk(value[key], f"{path}/{key!r}")
        elif isinstance(value, (list, tuple)):
            hasher.update(f"{path}|{len(value)}".encode())
            for i, item in enumerate(value):
                walk(item, f"{path}/{i}")
        else:
            hasher.update(f"{path}|{value!r}".encode())

    walk(checkpoint, "")
    return hasher.hexdigest()


def _verify(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    expected = checkpoint.get(DIGEST_KEY)
    if not isinstance(expected, str):
        return  # written by another tool: nothing to check against
    if digest(checkpoint) != expected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupted: its contents do not match the SHA-256 "
            "digest written with it (damaged on disk or in a copy); resume from another "
            "checkpoint"
        )


def _write_bytes(checkpoint: dict[str, Any], file: Any) -> None:
    """Serialise ``checkpoint`` into an open binary file."""
    torch.save(checkpoint, file)


def atomic_save(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``checkpoint`` to ``path`` through a temporary file and an atomic rename.

    Temporary files left by processes that were killed while writing the same target are
    removed first; they are hidden (leading dot) and never match ``last*.ckpt``.
    """
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f".{path.name}.*.tmp"):
        match = _TMP.match(stale.name)
        if match and not _pid_alive(int(match["pid"])):
            with contextlib.suppress(OSError):
                stale.unlink()
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    checkpoint = {**checkpoint, DIGEST_KEY: digest(checkpoint)}
    try:
        with open(tmp, "wb") as file:
            _write_bytes(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_directory(directory)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _explain(path: str | os.PathLike, error: BaseException, weights_only: bool) -> CheckpointError:
    text = str(error)
    trust = ("Load it with --weights_only=false (weights_only=False in Python) only if you "
             "trust its author as you trust code")
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) if weights_only else None
    if refused:
        return CheckpointError(
            f"checkpoint {str(path)!r} was refused, not loaded: it refers to "
            f"{refused.group(1)}, which loading with weights_only=True does not run. {trust}"
        )
    if weights_only and "Weights only load failed" in text:
        return CheckpointError(
            f"checkpoint {str(path)!r} was refused, not loaded: it is corrupted, or it holds "
            "objects other than tensors and plain containers, which loading with "
            f"weights_only=True does not run. {trust}"
        )
    return CheckpointError(
        f"checkpoint {str(path)!r} is truncated or corrupted and cannot be loaded "
        f"({type(error).__name__}: {_first_line(error)}); resume from another checkpoint"
    )


def load_checkpoint(path: str | os.PathLike, map_location: Any = None,
                    weights_only: bool | None = True, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint dict; ``weights_only`` (default ``True``; ``None`` means ``True``)
    refuses anything but tensors and plain containers.

    Raises :class:`~ilvae.errors.CheckpointError` naming ``path`` when the file is missing,
    truncated, corrupted, refused by ``weights_only`` or not a dict.
    """
    weights_only = True if weights_only is None else bool(weights_only)
    if _is_local(path):
        local = Path(str(path).removeprefix("file://"))
        if not local.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
        if local.stat().st_size == 0:
            raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes); resume from "
                                  "another checkpoint")
        try:
            obj = torch.load(local, map_location=map_location, weights_only=weights_only,
                             mmap=mmap)
        except _LOAD_ERRORS as error:
            raise _explain(path, error, weights_only) from error
    else:
        try:
            with get_filesystem(path).open(path, "rb") as file:
                obj = torch.load(file, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError as error:
            raise CheckpointError(f"checkpoint {str(path)!r} does not exist") from error
        except _LOAD_ERRORS as error:
            raise _explain(path, error, weights_only) from error
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a "
                              "checkpoint dict")
    _verify(path, obj)
    obj.pop(DIGEST_KEY, None)
    return obj


def check_checkpoint(path: str | os.PathLike, weights_only: bool | None = True) -> dict[str, Any]:
    """Validate a checkpoint before a run uses it (memory-mapped: tensors are not read)."""
    return load_checkpoint(path, map_location="cpu", weights_only=weights_only,
                           mmap=_is_local(path))


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic (temporary file, ``fsync``, rename) and whose
    loads default to ``weights_only=True`` with errors that name the file.

    Set by the ``ilvae`` CLI unless the configuration names another ``CheckpointIO`` plugin;
    in Python: ``Trainer(plugins=[AtomicCheckpointIO()])``. Remote paths (``s3://`` …) are
    written by fsspec in one request, which object stores apply atomically.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options, got "
                            f"{storage_options!r}")
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_save(checkpoint, str(path).removeprefix("file://"))

    def load_checkpoint(self, path: Any, map_location: Any | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def has_checkpoint_io(plugins: Any) -> bool:
    """Whether a trainer ``plugins`` value already names a ``CheckpointIO``."""
    if plugins is None:
        return False
    items = plugins if isinstance(plugins, (list, tuple)) else [plugins]
    return any(isinstance(p, CheckpointIO) for p in items)


__all__ = ["DIGEST_KEY", "AtomicCheckpointIO", "atomic_save", "check_checkpoint", "digest",
           "has_checkpoint_io", "load_block_weights", "load_checkpoint"]


class WeightsOnlyLoading:
    """Mixin for a ``LightningModule``: ``load_from_checkpoint`` with ``weights_only=True`` by
    default, so a file holding anything but tensors and plain containers is refused, not
    unpickled; a missing, truncated, corrupted or refused file raises ``CheckpointError``
    naming it."""

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None,
                             hparams_file: Any = None, strict: bool | None = None,
                             weights_only: bool | None = True, **kwargs: Any) -> Any:
        weights_only = True if weights_only is None else weights_only
        if isinstance(checkpoint_path, (str, bytes)) or hasattr(checkpoint_path, "__fspath__"):
            check_checkpoint(checkpoint_path, weights_only=weights_only)
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location,
                                            hparams_file=hparams_file, strict=strict,
                                            weights_only=weights_only, **kwargs)


def load_block_weights(model: torch.nn.Module, path: str | os.PathLike,
                       blocks: tuple[str, ...] = ("encoder", "decoder"),
                       field: str = "init_from") -> None:
    """Copy the weights of the named child ``blocks`` of ``model`` from the Lightning
    checkpoint at ``path`` (its ``state_dict`` entries ``<block>.<name>``), loaded weights-only.

    Every parameter and buffer of each block must be in the checkpoint under the same name and
    with the same shape, and the checkpoint must hold no other entry of that block; otherwise
    :class:`~ilvae.errors.ConfigurationError` names ``field``, the file and the first mismatch,
    and nothing is copied.
    """
    state = load_checkpoint(path, map_location="cpu").get("state_dict")
    where = f"{field}={str(path)!r} does not fit this model"
    if not isinstance(state, dict):
        raise ConfigurationError(f"{where}: the file holds no 'state_dict' (expected a "
                                 "Lightning checkpoint, e.g. an Autoencoder's last.ckpt)")
    loaded = {}
    for block in blocks:
        own = getattr(model, block).state_dict()
        prefix = f"{block}."
        theirs = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not theirs:
            raise ConfigurationError(f"{where}: the checkpoint has no {block} weights")
        for name in sorted(own.keys() | theirs.keys()):
            if name not in theirs:
                raise ConfigurationError(f"{where}: {prefix}{name} is missing from the "
                                         "checkpoint")
            if name not in own:
                raise ConfigurationError(f"{where}: the checkpoint's {prefix}{name} has no "
                                         "counterpart in this model")
            if tuple(theirs[name].shape) != tuple(own[name].shape):
                raise ConfigurationError(
                    f"{where}: {prefix}{name} has shape {tuple(theirs[name].shape)} in the "
                    f"checkpoint and {tuple(own[name].shape)} here")
        loaded[block] = theirs
    for block, weights in loaded.items():
        getattr(model, block).load_state_dict(weights)
