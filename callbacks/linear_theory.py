"""Compare a trained linear model with the closed forms of :mod:`ilvae.theory`."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from ilvae import theory
from ilvae.errors import ConfigurationError, check, check_number


class LinearTheoryMonitor(L.Callback):
    """Every ``every_n_epochs`` validation epochs, compare the model with its closed-form
    prediction (Dang et al., ICLR 2024) on the datamodule's **training** data, the data the
    optimum of the closed forms is defined on, and log

    - ``val/predicted_collapsed``: number of collapsed dimensions the theory predicts;
    - ``val/measured_collapsed``: number the model shows, ``model.measured_collapse(x, eps)``
      (mean KL per dimension below ``eps`` nats);
    - ``val/collapse_agreement``: fraction of latent dimensions where both flags agree
      (:func:`ilvae.theory.collapse_agreement`; for interchangeable latents, after sorting);
    - ``val/singular_value_error``: max_i |ω̂_i − ω_i| / max_j ω_j over the decoder singular
      values, decreasing (:func:`ilvae.theory.singular_value_error`).

    Works with any module that has ``theory_prediction(x)``, ``measured_collapse(x, eps)`` and
    ``decoder_singular_values()`` (:class:`~ilvae.models.linear.LinearVAE`,
    :class:`~ilvae.models.linear.LinearHVAE`: its z₂ dimensions and the z₂ → z₁ decoder), and a
    datamodule with ``tensors("fit")``; anything else is rejected when fitting starts.
    ``max_examples`` caps the training rows used (None: all). The last values are kept in
    :attr:`last` (a dict of floats).
    """

    _NEEDS = ("theory_prediction", "measured_collapse", "decoder_singular_values")

    def __init__(self, every_n_epochs: int = 1, eps: float = 0.01,
                 max_examples: int | None = None) -> None:
        if isinstance(every_n_epochs, bool) or int(every_n_epochs) != every_n_epochs or (
                every_n_epochs < 1):
            check("every_n_epochs", every_n_epochs, "an integer >= 1")
        self.eps = check_number("eps", eps, strict=True)
        if max_examples is not None and max_examples < 1:
            check("max_examples", max_examples, "an integer >= 1 or None")
        self.every_n_epochs = int(every_n_epochs)
        self.max_examples = max_examples
        self.last: dict[str, float] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        missing = [name for name in self._NEEDS if not hasattr(pl_module, name)]
        if missing:
            raise ConfigurationError(f"LinearTheoryMonitor needs a linear model (LinearVAE, "
                                     f"LinearHVAE); {type(pl_module).__name__} lacks "
                                     f"{', '.join(missing)}")
        if not hasattr(getattr(trainer, "datamodule", None), "tensors"):
            raise ConfigurationError("LinearTheoryMonitor needs a datamodule with tensors() "
                                     "(any ilvae datamodule)")
        try:
            pl_module.theory_prediction(self._data(trainer, pl_module)[:2])
        except NotImplementedError as exc:
            raise ConfigurationError(f"LinearTheoryMonitor: {exc}") from exc

    def _data(self, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.Tensor:
        x, _ = trainer.datamodule.tensors("fit")
        if self.max_examples is not None:
            x = x[: self.max_examples]
        return x.to(pl_module.device)

    def compare(self, pl_module: Any, x: torch.Tensor) -> dict[str, float]:
        """The four numbers for ``pl_module`` on data ``x`` (no logging)."""
        prediction = pl_module.theory_prediction(x)
        measured = pl_module.measured_collapse(x, self.eps).cpu()
        omega = pl_module.decoder_singular_values()
        return {
            "predicted_collapsed": float(prediction.collapsed.sum()),
            "measured_collapsed": float(measured.sum()),
            "collapse_agreement": theory.collapse_agreement(
                prediction.collapsed, measured, prediction.exchangeable),
            "singular_value_error": theory.singular_value_error(omega,
                                                                prediction.singular_values),
        }

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                values = self.compare(pl_module, self._data(trainer, pl_module))
        finally:
            pl_module.train(was_training)
        self.last = values
        for name, value in values.items():
            # Every process holds the whole training set, so the values agree already.
            pl_module.log(f"val/{name}", value, on_step=False, on_epoch=True, sync_dist=False)
