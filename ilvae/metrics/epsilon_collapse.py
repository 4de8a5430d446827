"""ε-collapsed latent dimensions, by mean KL and by probability over the data (Lucas et al.)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Normal
from torchmetrics import Metric

from ilvae.errors import check_number
from ilvae.metrics.kl_per_dimension import (
    _check_prior_scale,
    _check_width,
    _kl_normal,
    _per_example,
    _state_shape,
)


class EpsilonCollapse(Metric):
    """Number of ε-collapsed latent dimensions, in two forms.

    With KL_i(x) = KL(q(z_i|x) ‖ p(z_i)) = ½ (μ_i²/η² + s_i²/η² − log(s_i²/η²) − 1) for the prior
    N(0, η² I) (η = ``prior_scale``), ε = ``eps`` and δ = ``delta``:

    - mean form: dimension i is ε-collapsed iff (1/N) Σ_n KL_i(x_n) < ε;
    - probability form (Lucas et al., "Don't Blame the ELBO!", 2019): dimension i is
      (ε, δ)-collapsed iff P_x[KL_i(x) < ε] ≥ 1 − δ, the probability being the fraction of the
      evaluation set, P_i = (1/N) Σ_n 1[KL_i(x_n) < ε].

    ``update(posterior)`` takes the ``Normal`` of ``model.encode(x)`` (loc, scale: (B, m));
    ``update(posterior, kl)`` takes KL_i(x) itself, shape (B, m), against any prior (a model's
    :class:`~ilvae.models.contract.LatentTerm`), and ignores ``prior_scale``.
    ``compute()`` returns a dict:

    - ``"epsilon_collapsed"``: int64 scalar, number of dimensions collapsed in the mean form;
    - ``"epsilon_delta_collapsed"``: int64 scalar, number collapsed in the probability form;
    - ``"collapse_probability"``: float64 (m,), the fractions P_i.

    ``latent_dim`` (m) gives the states their (m,) shape at construction (pass it under DDP,
    see :class:`~ilvae.metrics.KLPerDimension`).

    Example:
        >>> import torch
        >>> from torch.distributions import Normal
        >>> metric = EpsilonCollapse(eps=0.01, delta=0.1)
        >>> loc = torch.tensor([[0.0, 2.0], [0.0, 0.0], [0.0, 2.0]])
        >>> metric.update(Normal(loc, torch.ones_like(loc)))
        >>> out = metric.compute()
        >>> int(out["epsilon_collapsed"]), out["collapse_probability"]
        (1, tensor([1.0000, 0.3333], dtype=torch.float64))
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, eps: float = 0.01, delta: float = 0.01, prior_scale: float = 1.0,
                 latent_dim: int | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.eps = check_number("eps", eps, strict=True)
        self.delta = check_number("delta", delta, maximum=1.0, strict_maximum=True)
        self.prior_scale = _check_prior_scale(prior_scale)
        self._shape = _state_shape(latent_dim)
        for name in ("kl_sum", "below"):
            self.add_state(name, torch.zeros(self._shape, dtype=torch.float64),
                           dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, posterior: Normal, kl: Tensor | None = None) -> None:
        kl = _kl_normal(posterior, self.prior_scale) if kl is None else _per_example(kl)
        _check_width(kl, self._shape, "kl")
        self.kl_sum = self.kl_sum + kl.sum(0)
        self.below = self.below + (kl < self.eps).sum(0)
        self.count = self.count + kl.shape[0]

    def compute(self) -> dict[str, Tensor]:
        probability = self.below / self.count
        return {
            "epsilon_collapsed": (self.kl_sum / self.count < self.eps).sum(),
            # The tolerance keeps a fraction such as 99/100 on the right side of 1 − 0.01.
            "epsilon_delta_collapsed": (probability >= 1 - self.delta - 1e-12).sum(),
            "collapse_probability": probability,
        }
