"""Shared plumbing of every ilvae LightningModule: building blocks, data checks, optimisers."""

from __future__ import annotations

import functools
import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torch.distributions import Normal

from ilvae import decoders as _decoders
from ilvae._config import build_component
from ilvae.checkpointing import check_checkpoint
from ilvae.decoders.base import Decoder
from ilvae.decoders.mlp import MLPDecoder
from ilvae.encoders import Encoder, MLPEncoder
from ilvae.errors import ConfigurationError
from ilvae.loss_guard import LossGuard, is_nonfinite_parameter_error
from ilvae.priors import Prior, StandardNormal


def check_number(field: str, value: float, *, minimum: float = 0.0, strict: bool = False) -> float:
    """Raise ``ConfigurationError`` unless ``value`` is finite and ≥ (or >) ``minimum``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        rel = ">" if strict else ">="
        raise ConfigurationError(f"{field}={value!r} is not allowed: expected a finite number "
                                 f"{rel} {minimum:g}")
    return float(value)


class LatentVariableModel(L.LightningModule):
    """Base class: holds ``encoder``, ``decoder``, ``prior`` and the optimiser settings.

    Blocks may be given as callables of the supplied sizes (what the CLI passes), classes,
    registered decoder names, ``{"class_path", "init_args"}`` dicts (what checkpoints store)
    or instances. They are saved in ``hparams`` as dicts, so ``load_from_checkpoint`` rebuilds
    identical blocks without the CLI.
    """

    def __init__(self, data_shape: tuple[int, ...], latent_dim: int, encoder: Any,
                 decoder: Any, prior: Any, optimizer: OptimizerCallable | None = None,
                 lr_scheduler: LRSchedulerCallable | None = None) -> None:
        super().__init__()
        data_shape = tuple(int(s) for s in data_shape)
        if not data_shape or any(s <= 0 for s in data_shape):
            raise ConfigurationError(f"data_shape={data_shape} is not allowed: expected positive "
                                     "sizes (it is supplied by the datamodule)")
        if int(latent_dim) != latent_dim or latent_dim <= 0:
            raise ConfigurationError(f"latent_dim={latent_dim!r} is not allowed: expected a "
                                     "positive integer")
        self.data_shape = data_shape
        self.data_dim = math.prod(data_shape)
        self.latent_dim = int(latent_dim)
        # None selects the default block. Defaults are not written into the signature because
        # jsonargparse would carry a default class's arguments over to a class chosen instead.
        encoder = MLPEncoder if encoder is None else encoder
        decoder = MLPDecoder if decoder is None else decoder
        prior = StandardNormal if prior is None else prior
        try:
            self.encoder = build_component(encoder, data_shape, self.latent_dim, base=Encoder,
                                           field="encoder")
            self.decoder = build_component(decoder, self.latent_dim, self.data_dim, base=Decoder,
                                           field="decoder", resolve_name=_decoders.resolve)
            self.prior = build_component(prior, self.latent_dim, base=Prior, field="prior")
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler

    def _save_blocks(self, ignore: list[str]) -> None:
        self.save_hyperparameters(ignore=["encoder", "decoder", "prior", "optimizer",
                                          "lr_scheduler", *ignore])
        for name in ("encoder", "decoder", "prior"):
            block = getattr(self, name)
            if hasattr(block, "config"):
                self.hparams[name] = block.config

    # ----------------------------------------------------------------- data
    def unpack(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        """(x, y) from a batch; x must have shape (B, *data_shape)."""
        if isinstance(batch, (tuple, list)):
            x, y = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, y = batch, None
        if tuple(x.shape[1:]) != self.data_shape and x[0].numel() != self.data_dim:
            raise ConfigurationError(
                f"data shape {tuple(x.shape[1:])} does not match the model's data_shape "
                f"{self.data_shape}"
            )
        return x, y

    def on_fit_start(self) -> None:
        # Reject data the likelihood cannot score before the first step.
        self.check_data(getattr(self.trainer, "datamodule", None))

    def check_data(self, datamodule: Any) -> None:
        """Raise ``ConfigurationError`` when the training data do not fit the model: wrong
        example shape, or values outside the likelihood's support. The CLI calls it before
        anything is written; ``on_fit_start`` calls it for Python users."""
        if datamodule is None or not hasattr(datamodule, "tensors"):
            return
        try:
            x = datamodule.tensors("fit")[0]
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc
        self.unpack((x[:1],))
        try:
            self.decoder.likelihood.check_data(x.flatten(1))
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc

    # ------------------------------------------------------- fault tolerance
    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every model's training loss goes through the loss guard, including models that
        # subclass this one later, without each of them calling it.
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("training_step")
        if step is not None and not getattr(step, "_guarded", False):
            cls.training_step = _guarded(step)

    @property
    def loss_guard(self) -> LossGuard:
        """What a NaN/inf training loss does (:class:`~ilvae.loss_guard.LossGuard`; stop by
        default, set by the ``NonFiniteLossGuard`` callback)."""
        guard = self.__dict__.get("_loss_guard")
        if guard is None:
            guard = self.__dict__["_loss_guard"] = LossGuard()
        return guard

    @loss_guard.setter
    def loss_guard(self, guard: LossGuard) -> None:
        self.__dict__["_loss_guard"] = guard

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log``, recording the training step's terms for the loss guard and
        averaging ``val/`` and ``test/`` values over all processes (``sync_dist``) unless the
        caller says otherwise, so multi-process metrics equal single-process ones."""
        terms = self.__dict__.get("_step_terms")
        if terms is not None:
            terms[name] = value
        deferred = self.__dict__.get("_deferred_logs")
        if deferred is not None:
            deferred.append((name, value, args, kwargs))
            return
        if (not args and "sync_dist" not in kwargs and name.startswith(("val/", "test/"))
                and isinstance(value, (Tensor, float, int))):
            kwargs["sync_dist"] = True
        super().log(name, value, *args, **kwargs)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # A batch the loss guard skipped leaves no gradient, so the optimiser skips it too.
        self.loss_guard.apply_skip(self._trainer, self)

    def log_dict(self, dictionary: Any, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log_dict`` with the same ``val/``/``test/`` default as :meth:`log`."""
        if args or "sync_dist" in kwargs:
            super().log_dict(dictionary, *args, **kwargs)
            return
        synced = {k: v for k, v in dictionary.items() if str(k).startswith(("val/", "test/"))
                  and isinstance(v, (Tensor, float, int))}
        rest = {k: v for k, v in dictionary.items() if k not in synced}
        if synced:
            super().log_dict(synced, sync_dist=True, **kwargs)
        if rest:
            super().log_dict(rest, **kwargs)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None,
                             hparams_file: Any = None, strict: bool | None = None,
                             weights_only: bool | None = True, **kwargs: Any) -> Any:
        """Lightning's ``load_from_checkpoint`` with ``weights_only=True`` by default: a file
        holding anything but tensors and plain containers is refused, not unpickled. A
        missing, truncated, corrupted or refused file raises ``CheckpointError`` naming it."""
        weights_only = True if weights_only is None else weights_only
        if isinstance(checkpoint_path, (str, bytes)) or hasattr(checkpoint_path, "__fspath__"):
            check_checkpoint(checkpoint_path, weights_only=weights_only)
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location,
                                            hparams_file=hparams_file, strict=strict,
                                            weights_only=weights_only, **kwargs)

    # ------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> Any:
        if self.optimizer is not None:
            optimizer = self.optimizer(self.parameters())
        else:
            optimizer = self._default_optimizer()
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler(optimizer)}

    def _default_optimizer(self) -> torch.optim.Optimizer:
        """Adam (lr 1e-3) with its fused kernel where it applies: one pass over all parameters
        instead of a loop of small kernels per parameter, several times faster on the CPU and
        the same update. Lightning refuses gradient clipping for fused optimisers under mixed
        precision, so mixed precision keeps the default implementation."""
        params = list(self.parameters())
        trainer = self._trainer
        mixed = trainer is not None and "mixed" in str(trainer.precision)
        if params and not mixed and all(p.is_floating_point() for p in params):
            try:
                return torch.optim.Adam(params, lr=1e-3, fused=True)
            except (RuntimeError, ValueError):  # no fused kernel for this device or version
                pass
        return torch.optim.Adam(params, lr=1e-3)

    # --------------------------------------------------------------- helpers
    def encode(self, x: Tensor) -> Normal:
        """q(z|x) as a ``torch.distributions.Normal`` with loc/scale of shape (B, latent_dim)."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Decoder output parameter θ (mean or logits), shape (B, data_dim)."""
        return self.decoder(z)


def _guarded(step: Any) -> Any:
    """Wrap a ``training_step`` so its loss passes through ``self.loss_guard``."""

    @functools.wraps(step)
    def training_step(self: LatentVariableModel, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get("_step_terms") is not None:  # a subclass calling super()
            return step(self, *args, **kwargs)
        guard = self.loss_guard
        skip = guard.action == "skip"
        self.__dict__["_step_terms"] = terms = {}
        # With "skip", the step's logging waits for the verdict, so that a skipped batch leaves
        # no NaN in the epoch averages.
        self.__dict__["_deferred_logs"] = deferred = [] if skip else None
        batch_idx = args[1] if len(args) > 1 else kwargs.get("batch_idx")
        try:
            try:
                output = step(self, *args, **kwargs)
            except ValueError as exc:
                # NaN weights or data surface first as NaN parameters of a torch
                # distribution, whose argument validation raises before any loss exists.
                if not is_nonfinite_parameter_error(exc):
                    raise
                output = guard.nonfinite_parameters(self, exc, terms, batch_idx)
            else:
                output = guard(self, output, terms, batch_idx)
        finally:
            self.__dict__["_step_terms"] = None
            self.__dict__["_deferred_logs"] = None
        if skip:
            if not guard.last_skipped:
                for name, value, rest, options in deferred:
                    self.log(name, value, *rest, **options)
            self.log("train/skipped_batches", float(len(guard.skipped)), on_step=True,
                     on_epoch=False, reduce_fx="max")
        return output

    training_step._guarded = True
    return training_step
