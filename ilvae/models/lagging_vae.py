"""Aggressive training of the inference network against lagging (He, Spokoyny, Neubig &
Berg-Kirkpatrick, ICLR 2019, "Lagging Inference Networks and Posterior Collapse in Variational
Autoencoders")."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from ilvae.errors import check
from ilvae.metrics.mutual_information import MutualInformation
from ilvae.models.vae import VAE

#: Key of the aggressive-training state in a checkpoint.
STATE_KEY = "lagging_vae"


class InnerLoopStop:
    """Stopping rule of the aggressive inner loop of He et al. (2019), whose encoder is
    updated "until convergence", capped at ``max_steps`` updates.

    The losses of the inner steps are averaged over consecutive windows of ``window`` steps;
    the loop stops at the end of a window whose mean loss is not below the previous window's
    mean (the objective stopped improving), or after ``max_steps`` steps. The first window is
    compared with +∞, so the loop runs at least ``min(2·window, max_steps)`` steps. (The
    authors' code compares windows of 15 steps; ``window`` = 10 is the default here.)

    ``update(loss)`` records one step's loss (a float or a scalar tensor, read on the host
    only at the end of a window) and returns whether the loop stops after it. ``reduce``
    (e.g. the mean over processes) is applied to each window's summed loss before it is
    compared, so that under data parallelism every process stops at the same step.
    """

    def __init__(self, window: int = 10, max_steps: int = 100,
                 reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        self.window, self.max_steps = int(window), int(max_steps)
        self.reduce = reduce
        self.steps = 0
        self._sum: Any = 0.0
        self._previous = math.inf

    def update(self, loss: float | Tensor) -> bool:
        self.steps += 1
        self._sum = self._sum + (loss.detach() if isinstance(loss, Tensor) else float(loss))
        if self.steps >= self.max_steps:
            return True
        if self.steps % self.window:
            return False
        total = torch.as_tensor(self._sum)
        if self.reduce is not None:
            total = self.reduce(total)
        mean = float(total) / self.window
        self._sum = 0.0
        stop = not mean < self._previous
        self._previous = mean
        return stop


def mutual_information_stopped(previous: float | None, current: float) -> bool:
    """The switch of He et al. (2019): aggressive training ends at the first epoch whose
    I_q(x; z) on held-out data is not above the previous epoch's (``current ≤ previous``);
    never at the first measurement (``previous`` is None)."""
    return previous is not None and not current > previous


class LaggingVAE(VAE):
    """VAE trained with the aggressive inference-network updates of He et al. (ICLR 2019,
    Algorithm 1), which keep the encoder from lagging behind the true posterior:

    - aggressive phase: before each decoder update, the encoder φ alone is updated on the
      loss −ELBO of successive training batches (the step's batch, then fresh ones) until
      :class:`InnerLoopStop` ends the inner loop (mean loss over ``inner_window`` steps no
      longer decreasing, at most ``max_inner_steps`` steps); then the decoder θ alone takes
      one step on the step's batch;
    - after each validation epoch the mutual information I_q(x; z)
      (:class:`~ilvae.metrics.MutualInformation`, aggregate posterior of the whole
      validation set) is compared with the previous one; when it does not increase
      (:func:`mutual_information_stopped`), aggressive training ends for good;
    - normal phase: encoder and decoder take one step each on the same loss, as a VAE.

    The loss is the VAE's (:meth:`~ilvae.models.VAE.objective`: β, free bits), so
    ``beta``, KL annealing etc. apply to both phases. The state (``aggressive``,
    ``last_mutual_info``) is saved in checkpoints under ``"lagging_vae"``, so a run resumed
    mid-aggressive continues aggressively and one resumed after the switch continues normally.

    Lightning mechanics: manual optimisation (``automatic_optimization = False``) with two
    optimisers built by ``optimizer`` (default Adam, lr 1e-3), one over the encoder's
    parameters and one over all others (decoder, prior). Gradients are clipped by the model
    (``gradient_clip_val``, by norm; the paper's 5.0), so ``trainer.gradient_clip_val`` must
    stay unset. The inner batches come from a second iterator over the datamodule's
    ``train_dataloader()`` (or the trainer's ``train_dataloader`` without a datamodule),
    restarted when exhausted. As with any manual optimisation, ``trainer.global_step`` counts
    every optimiser step, encoder steps included: ``max_steps`` and step-based schedules
    (``KLAnnealing(length=…)``) advance faster while training is aggressive. The switch needs
    validation: without validation data training stays aggressive. Logged: ``train/aggressive``
    (1 or 0: the phase the epoch trained in), ``train/inner_steps`` (encoder steps per
    decoder step, epoch mean) and ``val/mutual_info_aggressive`` (the I_q the switch reads).

    Args:
        max_inner_steps: cap on the encoder steps per decoder step (paper: 100).
        inner_window: window of :class:`InnerLoopStop`, in steps.
        gradient_clip_val: clip each update's gradient norm to this value (0: no clipping).
        mi_samples: Monte Carlo draws per example of the mutual-information estimate.
        **kwargs: the arguments of :class:`~ilvae.models.VAE` (``lr_scheduler`` is not
            supported).
    """

    def __init__(self, max_inner_steps: int = 100, inner_window: int = 10,
                 gradient_clip_val: float = 5.0, mi_samples: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for field, value in (("max_inner_steps", max_inner_steps),
                             ("inner_window", inner_window), ("mi_samples", mi_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                check(field, value, "an integer >= 1")
        if isinstance(gradient_clip_val, bool) or not isinstance(gradient_clip_val, (int, float)) \
                or not gradient_clip_val >= 0 or not math.isfinite(gradient_clip_val):
            check("gradient_clip_val", gradient_clip_val, "a finite number >= 0")
        if self.lr_scheduler is not None:
            check("lr_scheduler", self.lr_scheduler,
                  "null: LaggingVAE steps its two optimisers itself")
        self.max_inner_steps = max_inner_steps
        self.inner_window = inner_window
        self.gradient_clip_val = float(gradient_clip_val)
        self.automatic_optimization = False
        self.aggressive = True
        self.last_mutual_info: float | None = None
        self.mutual_info = MutualInformation(num_samples=mi_samples)
        self._inner_loader: Any = None
        self._inner_batches: Any = None

    # ------------------------------------------------------------- optimisers
    def configure_optimizers(self) -> Any:
        """[encoder optimiser, decoder optimiser]: the encoder's parameters and all others."""
        encoder = list(self.encoder.parameters())
        ids = {id(p) for p in encoder}
        rest = [p for p in self.parameters() if id(p) not in ids]
        make = self.optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3))
        return [make(encoder), make(rest)]

    def _update(self, loss: Tensor, optimizers: list[Any]) -> None:
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in optimizers:
            if self.gradient_clip_val > 0:
                self.clip_gradients(opt, gradient_clip_val=self.gradient_clip_val,
                                    gradient_clip_algorithm="norm")
            opt.step()

    def configure_callbacks(self) -> Any:
        # Lightning calls this when a trainer takes the model, before it checks its own
        # configuration: the place to refuse trainer-side clipping in one line.
        clip = self.trainer.gradient_clip_val
        if clip is not None:
            check("trainer.gradient_clip_val", clip,
                  "null with LaggingVAE, which clips its own updates (model.gradient_clip_val)")
        return super().configure_callbacks()

    # ------------------------------------------------------------------ steps
    def on_train_start(self) -> None:
        super().on_train_start()
        datamodule = self.trainer.datamodule
        # A loader of its own: iterating the trainer's loader twice at once would share
        # (and reset) persistent workers.
        self._inner_loader = (datamodule.train_dataloader() if datamodule is not None
                              else self.trainer.train_dataloader)
        self._inner_batches = None

    def _next_inner_batch(self) -> Any:
        if self._inner_batches is not None:
            batch = next(self._inner_batches, None)
            if batch is not None:
                return batch
        self._inner_batches = iter(self._inner_loader)
        return next(self._inner_batches)

    def _inner_loss(self, batch: Any) -> Tensor:
        x, _ = self.unpack(batch)
        x = self.decoder.likelihood.prepare(x.to(self.device))
        return self.objective(self(x))[0]

    def encoder_updates(self, batch: Any) -> int:
        """The aggressive inner loop for the step's ``batch``: encoder steps on ``batch``,
        then on fresh training batches, until :class:`InnerLoopStop`; returns their number."""
        encoder_opt = self.optimizers()[0]
        # Every process takes the same decision (a differing number of backward passes would
        # leave a gradient all-reduce waiting).
        strategy = self.trainer.strategy
        stop = InnerLoopStop(self.inner_window, self.max_inner_steps,
                             reduce=lambda total: strategy.reduce(total, reduce_op="mean"))
        while True:
            loss = self._inner_loss(batch)
            self._update(loss, [encoder_opt])
            if stop.update(loss):
                return stop.steps
            batch = self._next_inner_batch()

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        encoder_opt, decoder_opt = self.optimizers()
        inner = self.encoder_updates(batch) if self.aggressive else 1
        output = super().training_step(batch, batch_idx)
        self._update(output["loss"], [decoder_opt] if self.aggressive else
                     [encoder_opt, decoder_opt])
        self.log_dict({"train/inner_steps": float(inner),
                       "train/aggressive": float(self.aggressive)}, on_step=False, on_epoch=True)
        return output

    # ------------------------------------------------------- the switch (MI)
    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().validation_step(batch, batch_idx)
        if self.aggressive and not self.trainer.sanity_checking:
            x, _ = self.unpack(batch)
            self.mutual_info.update(self.encode(x))
        return loss

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self.aggressive or self.trainer.sanity_checking \
                or not self.mutual_info.update_count:
            return
        mi = float(self.mutual_info.compute())
        self.mutual_info.reset()
        self.log("val/mutual_info_aggressive", mi, on_step=False, on_epoch=True)
        self.record_mutual_information(mi)

    def record_mutual_information(self, mi: float) -> bool:
        """Apply the switch to this epoch's I_q(x; z) = ``mi``; returns ``aggressive``."""
        if self.aggressive and mutual_information_stopped(self.last_mutual_info, mi):
            self.aggressive = False
        self.last_mutual_info = mi
        return self.aggressive

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[STATE_KEY] = {"aggressive": bool(self.aggressive),
                                 "last_mutual_info": self.last_mutual_info}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(STATE_KEY)
        if state is not None:
            self.aggressive = bool(state["aggressive"])
            self.last_mutual_info = state["last_mutual_info"]
