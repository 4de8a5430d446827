"""Shared plumbing of every ilvae LightningModule: building blocks, data checks, optimisers,
and the batching of training-step logs.

Training-step logging. Lightning's ``self.log`` costs about as much as a small layer's forward
and backward pass (it updates a metric object and walks its state on every call), and a training
step logs several values. So a value that a ``training_step`` logs with the plain options (a
scalar, ``on_step`` and/or ``on_epoch``, mean reduction with an explicit ``batch_size`` for epoch
values, no ``sync_dist``) is handed to Lightning only where Lightning's copy is read:

- its step value at the steps where the logger writes (every ``log_every_n_steps``) and before a
  validation check;
- everything, the epoch's earlier values as one entry weighted by their number of examples,
  at the last batch of an epoch, the last step of the run, and when a callback stops the run;
- every step when a callback reads step values from ``trainer.callback_metrics`` while training
  (a callback with a true ``reads_step_metrics`` attribute such as ``TargetKLController``, a
  ``ModelCheckpoint`` that monitors a value every n training steps or on a timer, a learning-rate
  scheduler that monitors a value every step), when ``log_every_n_steps`` is 1, or when the
  model's ``log_every_step`` attribute is true.

In between, the values wait on their device (no tensor operation per step). The logger writes
the same rows as with every step logged: the step values of the steps it writes and epoch means
over every batch. The progress bar and ``trainer.callback_metrics`` show the values of the
latest logging step during an epoch. Other calls (validation, test, other options) go to
Lightning unchanged.
"""

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
from ilvae.models.contract import LatentTerm
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

    #: Hand every training-step value to Lightning at every step (see the module docstring);
    #: ``None`` decides from the trainer's callbacks and settings.
    log_every_step: bool | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets ``_current_fx_name`` before and after every hook it calls, dozens of
        # times per training step. It is a plain attribute (never a parameter, buffer or
        # submodule), so it skips ``nn.Module.__setattr__``'s checks for those.
        if name == "_current_fx_name":
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log``, recording the training step's terms for the loss guard,
        batching training-step values (module docstring) and averaging ``val/`` and ``test/``
        values over all processes (``sync_dist``) unless the caller says otherwise, so
        multi-process metrics equal single-process ones."""
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
        buffer = self.__dict__.get("_train_logs")
        if buffer is not None and buffer.active and not args and buffer.add(name, value, kwargs):
            return
        super().log(name, value, *args, **kwargs)

    def _native_log(self, name: str, value: Any, **kwargs: Any) -> None:
        L.LightningModule.log(self, name, value, **kwargs)

    def on_train_start(self) -> None:
        self.__dict__.pop("_train_logs", None)  # a new fit starts with nothing waiting

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # A callback stopped the run after this step (a time limit, early stopping): the epoch
        # ends here, so the training-step values still waiting go to Lightning now, under the
        # hook they were logged from.
        buffer = self.__dict__.get("_train_logs")
        if buffer is not None and buffer.pending and self._trainer.should_stop:
            hook, self._current_fx_name = self._current_fx_name, "training_step"
            try:
                buffer.flush()
            finally:
                self._current_fx_name = hook

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

    # ------------------------------------------------------------------ steps
    def _step(self, batch: Any, stage: str) -> Tensor:
        """The loss of one batch, logging the stage's metrics (``train``, ``val``, ``test``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _step(batch, stage) "
                                  "or its own training_step, validation_step and test_step")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    # --------------------------------------------------------------- helpers
    def encode(self, x: Tensor) -> Normal:
        """q(z|x) as a ``torch.distributions.Normal`` with loc/scale of shape (B, latent_dim)."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Decoder output parameter θ (mean or logits), shape (B, data_dim)."""
        return self.decoder(z)

    # ---------------------------------------------------------------- contract
    #: Names of the latent levels, in the order of :meth:`latent_terms`.
    latent_levels: tuple[str, ...] = ("z",)

    def latent_terms(self, batch: Any) -> list[LatentTerm]:
        """One :class:`~ilvae.models.contract.LatentTerm` per latent level for ``batch``: here
        q(z|x) = ``encode(x)`` and KL(q(z_i|x) ‖ p(z_i)) against ``prior`` (closed form for
        N(0, η² I), else the prior's one-sample estimate)."""
        x, _ = self.unpack(batch)
        posterior = self.encode(x)
        scale = getattr(self.prior, "scale", None)
        eta = float(scale) if isinstance(scale, Tensor) and scale.numel() == 1 else None
        return [LatentTerm("z", posterior, self.prior.kl(posterior), prior_scale=eta)]

    def reconstructions(self, batch: Any) -> tuple[Tensor, Tensor]:
        """What the model reconstructs from ``batch`` and its reconstruction, both shaped like
        the data: here x and ``reconstruct(x)``."""
        x, _ = self.unpack(batch)
        return x, self.reconstruct(x)

    @property
    def schedulable(self) -> tuple[str, ...]:
        """Names of the hyper-parameters that schedules and controllers may set
        (:meth:`set_hparam`); the model logs each as ``train/<name>`` while training."""
        return ()

    def get_hparam(self, name: str) -> float:
        """The current value of the schedulable hyper-parameter ``name``."""
        owner, attribute = self._hparam_owner(self._check_schedulable(name))
        return float(getattr(owner, attribute))

    def set_hparam(self, name: str, value: float) -> None:
        """Set the schedulable hyper-parameter ``name`` to ``value``."""
        owner, attribute = self._hparam_owner(self._check_schedulable(name))
        setattr(owner, attribute, float(value))

    def schedulable_note(self, name: str) -> str:
        """Why ``name`` is not schedulable here, for the one-line refusal ('' when no reason is
        known beyond the list of names)."""
        return ""

    def _hparam_owner(self, name: str) -> tuple[Any, str]:
        """(object, attribute) holding the schedulable hyper-parameter ``name``."""
        return self, name

    def _check_schedulable(self, name: str, field: str = "target") -> str:
        names = self.schedulable
        if name not in names:
            allowed = ", ".join(names) if names else "none"
            note = self.schedulable_note(name)
            raise ConfigurationError(
                f"{field}={name!r} is not allowed: expected a hyper-parameter that "
                f"{type(self).__name__} declares schedulable ({allowed}){note}")
        return name


def _guarded(step: Any) -> Any:
    """Wrap a ``training_step`` so its loss passes through ``self.loss_guard`` and its logs
    through the training-log buffer."""

    @functools.wraps(step)
    def training_step(self: LatentVariableModel, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get("_step_terms") is not None:  # a subclass calling super()
            return step(self, *args, **kwargs)
        buffer = _TrainLogBuffer.of(self)
        if buffer is None:
            return _guarded_step(self, step, args, kwargs)
        buffer.begin()
        try:
            output = _guarded_step(self, step, args, kwargs)
        finally:
            buffer.active = False
        buffer.end()
        return output

    training_step._guarded = True
    return training_step


def _guarded_step(self: LatentVariableModel, step: Any, args: tuple, kwargs: dict) -> Any:
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


# The base class's own training step goes through the guard too (__init_subclass__ wraps the
# steps that subclasses define).
LatentVariableModel.training_step = _guarded(LatentVariableModel.training_step)

_MEAN = ("mean", torch.mean)
_OPTIONS = {"on_step", "on_epoch", "prog_bar", "logger", "reduce_fx", "batch_size"}
# Options that ``log_dict`` passes on with their defaults: they do not stop the batching.
_DEFAULTS = {"enable_graph": False, "sync_dist": False, "sync_dist_group": None,
             "add_dataloader_idx": True, "rank_zero_only": False, "metric_attribute": None}


class EpochSum:
    """Σ value × batch size of per-step scalars (tensors stay on their device), summed only
    when read: adding a step's value costs no tensor operation."""

    __slots__ = ("values", "sizes", "total", "count")

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.sizes: list[int] = []
        self.total: Any = None  # sum of the values already folded
        self.count = 0  # examples behind ``values`` and ``total``

    def add(self, value: Any, size: int) -> None:
        self.values.append(value)
        self.sizes.append(size)
        self.count += size
        if len(self.values) >= 256:  # bounded memory when nothing reads for a long time
            self.total = self.epoch_sum()
            self.values, self.sizes = [], []

    def epoch_sum(self) -> Any:
        """Σ value × batch size over everything added."""
        total, values, sizes = self.total, self.values, self.sizes
        if values and all(isinstance(v, Tensor) for v in values):
            try:
                stacked = torch.stack(values).float()
            except RuntimeError:  # mixed shapes, dtypes or devices
                stacked = torch.stack([v.reshape(()).float().to(values[0].device)
                                       for v in values])
            if len(set(sizes)) == 1:
                part = stacked.sum() * sizes[0]
            else:
                part = (stacked.reshape(-1) * torch.tensor(
                    sizes, dtype=stacked.dtype, device=stacked.device)).sum()
        else:
            part = sum(v.float() * n if isinstance(v, Tensor) else float(v) * n
                       for v, n in zip(values, sizes, strict=True))
        return part if total is None else total + part


class _Pending(EpochSum):
    """One training-step value waiting for Lightning: its options (but ``batch_size``), the
    epoch values of earlier steps since the last hand-over, and the latest value with its
    batch size (kept apart, so that Lightning can be handed the earlier ones as one entry and
    then the latest as the step value)."""

    __slots__ = ("options", "last", "size")

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__()
        self.options = options
        self.last: Any = None
        self.size = 0

    def latest(self, value: Any, size: int) -> None:
        if self.size:
            self.add(self.last, self.size)
        self.last, self.size = value, size


class _TrainLogBuffer:
    """Training-step values waiting for a step where Lightning's copy is read (module
    docstring). One per model and fit; :meth:`of` builds it, :meth:`begin` and :meth:`end`
    bracket each training step, :meth:`add` takes one ``self.log`` call."""

    def __init__(self, module: LatentVariableModel, trainer: Any) -> None:
        self.module = module
        self.trainer = trainer
        self.loop = trainer.fit_loop
        self.epoch_loop = self.loop.epoch_loop
        self.every_step = _reads_step_values(module, trainer)
        self.log_every = trainer.log_every_n_steps
        self.active = False
        self.sync = self.final = True
        self.epoch = -1
        self.pending: dict[str, _Pending] = {}
        self.options: dict[tuple, dict[str, Any] | None] = {}  # normalised option sets

    @classmethod
    def of(cls, module: LatentVariableModel) -> _TrainLogBuffer | None:
        trainer = module._trainer
        buffer = module.__dict__.get("_train_logs")
        if trainer is None:
            return None
        if buffer is None or buffer.trainer is not trainer or buffer.loop is not trainer.fit_loop:
            if getattr(trainer, "barebones", False):
                return None
            try:
                buffer = cls(module, trainer)
            except AttributeError:  # a Lightning without the attributes read here
                return None
            module.__dict__["_train_logs"] = buffer
        return buffer

    # ---------------------------------------------------------------- steps
    def begin(self) -> None:
        epoch = self.loop.epoch_progress.current.completed  # trainer.current_epoch
        if epoch != self.epoch:  # whatever an interrupted epoch left belongs to no epoch now
            self.pending.clear()
            self.epoch = epoch
        self.final = self._final_step()
        self.sync = self.final or self.every_step or self._read_step()
        self.active = True

    def _final_step(self) -> bool:
        """Whether the epoch or the run ends after this step (Lightning then computes the
        epoch values, so every value still waiting must be handed over)."""
        trainer, epoch_loop = self.trainer, self.epoch_loop
        try:
            return bool(trainer.should_stop or epoch_loop.batch_progress.is_last_batch
                        or trainer.fast_dev_run
                        or 0 <= trainer.max_steps <= epoch_loop.global_step + 1)
        except AttributeError:
            return True

    def _read_step(self) -> bool:
        """Whether step values are read after this step: the logger writes, or validation
        runs (its callbacks may read training values)."""
        trainer, epoch_loop = self.trainer, self.epoch_loop
        try:
            # LoggerConnector.should_update_logs, without its generic loop lookup
            if self.log_every and (epoch_loop._batches_that_stepped + 1) % self.log_every == 0:
                return True
            if getattr(trainer, "_val_check_time_interval", None) is not None:
                return True
            every = trainer.val_check_batch
            if every is not None and every != float("inf"):
                done = (epoch_loop.total_batch_idx if trainer.check_val_every_n_epoch is None
                        else epoch_loop.batch_idx) + 1
                if done % int(every) == 0:
                    return True
        except AttributeError:
            return True
        return False

    def _normalise(self, options: dict[str, Any]) -> dict[str, Any] | None:
        """The options that matter (defaults that ``log_dict`` passes on dropped, and
        ``batch_size``), or None when they ask for something only Lightning does."""
        try:
            key = tuple(options.items())
            return self.options[key]
        except TypeError:  # an unhashable option value
            key = None
        except KeyError:
            pass
        kept = {k: v for k, v in options.items() if k != "batch_size"
                and (k not in _DEFAULTS or v is not _DEFAULTS[k] and v != _DEFAULTS[k])}
        size = options.get("batch_size")
        if not kept.keys() <= _OPTIONS or kept.get("on_epoch") and (
                kept.get("reduce_fx", "mean") not in _MEAN
                or not isinstance(size, int) or isinstance(size, bool)):
            kept = None
        if key is not None:
            self.options[key] = kept
        return kept

    def add(self, name: str, value: Any, options: dict[str, Any]) -> bool:
        """Keep one ``self.log`` call; False when it must go to Lightning now."""
        same = self._normalise(options)
        if same is None:
            return False
        if isinstance(value, Tensor):
            if value.numel() != 1 or not value.is_floating_point():
                return False
        elif not isinstance(value, (float, int)) or isinstance(value, bool):
            return False
        entry = self.pending.get(name)
        if entry is not None and entry.options != same:
            return False  # changed options: Lightning's own check decides
        if self.sync:
            if entry is not None:
                if self.final or not entry.options.get("on_epoch"):
                    self._flush(name, entry, current=True)
                else:  # earlier epoch values can wait for the epoch's end
                    entry.latest(None, 0)
            return False
        if entry is None:
            entry = self.pending[name] = _Pending(same)
        if isinstance(value, Tensor):
            value = value.detach()
        if same.get("on_epoch"):
            entry.latest(value, options["batch_size"])
        else:
            entry.last = value
        return True

    def end(self) -> None:
        """After a step where values are read, hand over what they need: every value at the
        end of an epoch; otherwise the latest value of each name (what Lightning would show
        as its step value), while earlier epoch values wait for the epoch's end."""
        if not (self.sync and self.pending):
            return
        if self.final:
            self.flush()
            return
        log = self.module._native_log
        for name, entry in list(self.pending.items()):
            if not entry.options.get("on_epoch"):
                self._flush(name, entry, current=False)
            elif entry.size:
                log(name, entry.last, **entry.options, batch_size=entry.size)
                entry.last, entry.size = None, 0

    def flush(self) -> None:
        """Hand over everything waiting, the latest value of each name last."""
        for name in list(self.pending):
            self._flush(name, self.pending[name], current=False)

    def _flush(self, name: str, entry: _Pending, current: bool) -> None:
        """Hand ``name`` over: its earlier epoch values as one entry, then (unless the caller
        logs the current step's value itself) its latest value."""
        del self.pending[name]
        log = self.module._native_log
        if not entry.options.get("on_epoch"):
            if not current and entry.last is not None:
                log(name, entry.last, **entry.options)
            return
        if current and entry.size:  # the latest value is an earlier step's
            entry.latest(None, 0)
        if entry.count:
            mean = entry.epoch_sum() / entry.count
            log(name, mean.reshape(()) if isinstance(mean, Tensor) else mean,
                **entry.options, batch_size=entry.count)
        if not current and entry.size:
            log(name, entry.last, **entry.options, batch_size=entry.size)


def _reads_step_values(module: LatentVariableModel, trainer: Any) -> bool:
    """Whether something reads training-step values from Lightning every step."""
    if module.log_every_step is not None:
        return bool(module.log_every_step)
    if getattr(trainer, "log_every_n_steps", 1) == 1:
        return True
    from lightning.pytorch.callbacks import ModelCheckpoint

    for callback in trainer.callbacks:
        if getattr(callback, "reads_step_metrics", False):
            return True
        if isinstance(callback, ModelCheckpoint) and callback.monitor is not None and (
                getattr(callback, "_every_n_train_steps", 0)
                or getattr(callback, "_train_time_interval", None) is not None):
            return True
    for config in getattr(trainer, "lr_scheduler_configs", None) or ():
        if config.monitor is not None and config.interval == "step":
            return True
    return False
