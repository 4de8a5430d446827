"""KL divergence between the amortised posterior and the prior, per latent dimension."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor
from torch.distributions import Normal
from torchmetrics import Metric

from ilvae.errors import check, check_number


def _check_prior_scale(prior_scale: float) -> float:
    return check_number("prior_scale", prior_scale, strict=True)


def _state_shape(latent_dim: int | None) -> tuple[int, ...]:
    """Shape of a per-dimension state at construction: (m,) when the latent size is known, so
    every process holds states of their final shape even before (or without) an update and all
    take the same collective path when they synchronise; () otherwise, broadcast to (m,) by the
    first update."""
    if latent_dim is None:
        return ()
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, numbers.Integral) \
            or latent_dim < 1:
        check("latent_dim", latent_dim, "an integer >= 1 or None")
    return (int(latent_dim),)


def _check_width(values: Tensor, shape: tuple[int, ...], name: str) -> None:
    """Raise unless an update's (B, m) ``values`` match a declared (m,) state shape."""
    if shape and values.shape[-1] != shape[0]:
        raise ValueError(f"{name} has {values.shape[-1]} latent dimensions but the metric was "
                         f"built with latent_dim={shape[0]}")


def model_prior_scale(model: object) -> float:
    """η of a model's N(0, η² I) prior (``model.prior.scale``, a one-element tensor), or 1 when
    the prior has no such scale: the ``prior_scale`` to measure the model's KL against."""
    scale = getattr(getattr(model, "prior", None), "scale", None)
    if isinstance(scale, Tensor) and scale.numel() == 1:
        return float(scale)
    return 1.0


def _kl_normal(posterior: Normal, prior_scale: float) -> Tensor:
    """KL(N(μ, s²) ‖ N(0, η²)) per example and dimension, in float64: shape (B, m)."""
    loc = posterior.loc.detach().double()
    scale = posterior.scale.detach().double()
    if loc.dim() != 2:
        raise ValueError(f"posterior.loc must have shape (B, m), got {tuple(loc.shape)}")
    ratio = (scale / prior_scale) ** 2
    return 0.5 * ((loc / prior_scale) ** 2 + ratio - torch.log(ratio) - 1)


def _per_example(kl: Tensor) -> Tensor:
    """A given KL per example and dimension, detached, in float64: shape (B, m)."""
    kl = kl.detach().double()
    if kl.dim() != 2:
        raise ValueError(f"kl must have shape (B, m), got {tuple(kl.shape)}")
    return kl


class KLPerDimension(Metric):
    """Mean KL divergence between the posterior and the prior, per latent dimension and in total.

    For q(z|x) = N(μ(x), diag s(x)²) and the prior p(z) = N(0, η² I) (η = ``prior_scale``)::

        KL_i(x)  = ½ (μ_i²/η² + s_i²/η² − log(s_i²/η²) − 1)
        kl_i     = (1/N) Σ_n KL_i(x_n)                 (the mean over the evaluation set)
        kl       = Σ_i kl_i                             (nats, summed over latent dimensions)

    ``update(posterior)`` takes the ``Normal`` of ``model.encode(x)`` (loc, scale: (B, m));
    ``update(posterior, kl)`` takes KL_i(x) itself, shape (B, m), against any prior (a model's
    :class:`~ilvae.models.contract.LatentTerm`), and ignores ``prior_scale``.
    ``compute()`` returns ``{"kl": kl, "kl_per_dim": (kl_1, …, kl_m)}``: a scalar and an (m,)
    vector, both float64. Sums are accumulated in float64 and summed across processes.
    ``latent_dim`` (m) gives the states their (m,) shape at construction; under DDP pass it
    whenever a process may see no batch: a state still of shape () would take another
    collective path than the others' (m,) states when they synchronise.

    Example:
        >>> import torch
        >>> from torch.distributions import Normal
        >>> metric = KLPerDimension()
        >>> metric.update(Normal(torch.tensor([[1.0, 0.0]]), torch.ones(1, 2)))
        >>> metric.compute()["kl_per_dim"]
        tensor([0.5000, 0.0000], dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, prior_scale: float = 1.0, latent_dim: int | None = None,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.prior_scale = _check_prior_scale(prior_scale)
        self._shape = _state_shape(latent_dim)
        self.add_state("kl_sum", torch.zeros(self._shape, dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, posterior: Normal, kl: Tensor | None = None) -> None:
        kl = _kl_normal(posterior, self.prior_scale) if kl is None else _per_example(kl)
        _check_width(kl, self._shape, "kl")
        self.kl_sum = self.kl_sum + kl.sum(0)
        self.count = self.count + kl.shape[0]

    def compute(self) -> dict[str, Tensor]:
        per_dim = self.kl_sum / self.count
        return {"kl": per_dim.sum(), "kl_per_dim": per_dim}
