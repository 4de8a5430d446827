"""AR-ELBO: Gaussian decoder with adaptive variance (Takida et al., Neurocomputing 2022).

With p(x|z) = N(f(z), σ² I), σ² is set on every training batch to its maximum-likelihood value

    σ̂² = SSE / (B·D)                      (isotropic)
    σ̂_j² = SSE_j / B                       (per dimension j)

where SSE = Σ_b Σ_d (x_bd − f(z_b)_d)². Substituting it, the batch-mean objective becomes
(D/2) log(SSE/B) + KL up to constants, and by the envelope theorem its gradient equals that of
the Gaussian NLL with σ² held fixed at σ̂². For evaluation (ELBO, importance-weighted NLL) σ² is
frozen to a running average of σ̂² over training batches, stored in the checkpoint as a buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ilvae.decoders.mlp import MLPDecoder
from ilvae.likelihoods import _LOG_2PI, Likelihood


class GaussianAdaptive(Likelihood):
    """N(x; θ, σ̂²) with σ̂² the batch maximum-likelihood variance in training mode and its
    running average (``running_variance``) in evaluation mode.

    ``momentum``: weight of the newest batch in the exponential running average; ``None`` keeps
    the plain cumulative average over all training batches. ``min_variance`` floors σ̂² so that a
    perfectly reconstructed batch does not produce log 0.
    """

    name = "gaussian_adaptive"

    def __init__(self, data_dim: int, per_dimension: bool = False,
                 momentum: float | None = 0.05, min_variance: float = 1e-6) -> None:
        super().__init__(data_dim)
        if momentum is not None and not 0 < momentum <= 1:
            raise ValueError(f"momentum must lie in (0, 1] or be None, got {momentum}")
        self.per_dimension = per_dimension
        self.momentum = momentum
        self.min_variance = min_variance
        shape = (data_dim,) if per_dimension else ()
        self.register_buffer("running_variance", torch.ones(shape))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))

    def batch_variance(self, x: Tensor, param: Tensor) -> Tensor:
        """σ̂² of this batch (differentiable): SSE/(B·D), or SSE_j/B per dimension. Leading
        sample dimensions (S, B, D) count as batch."""
        sq = (x - param) ** 2
        var = sq.reshape(-1, sq.shape[-1]).mean(0) if self.per_dimension else sq.mean()
        return var.clamp_min(self.min_variance)

    @torch.no_grad()
    def _update_running(self, var: Tensor) -> None:
        self.num_batches += 1
        weight = 1.0 / float(self.num_batches) if self.momentum is None else self.momentum
        if self.num_batches == 1:
            self.running_variance.copy_(var)
        else:
            self.running_variance.lerp_(var.to(self.running_variance.dtype), weight)

    @property
    def variance(self) -> Tensor:
        return self.running_variance

    def log_prob(self, x: Tensor, param: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            var = self.batch_variance(x, param)
            self._update_running(var.detach())
        else:
            var = self.running_variance
        var = var.expand_as(param)
        return -0.5 * (((x - param) ** 2) / var + torch.log(var) + _LOG_2PI).sum(-1)

    def sample(self, param: Tensor) -> Tensor:
        return param + self.running_variance.sqrt() * torch.randn_like(param)


class ARELBODecoder(MLPDecoder):
    """MLP mean decoder with the adaptive-variance Gaussian likelihood of AR-ELBO.

    ``per_dimension=True`` learns one σ̂_j² per data dimension; ``momentum`` sets the running
    average used at evaluation time.
    """

    def __init__(self, latent_dim: int, data_dim: int, hidden: list[int] = [512],
                 activation: str = "relu", per_dimension: bool = False,
                 momentum: float | None = 0.05) -> None:
        super().__init__(latent_dim, data_dim, hidden, activation, likelihood="gaussian")
        self.likelihood = GaussianAdaptive(data_dim, per_dimension=per_dimension,
                                           momentum=momentum)


__all__ = ["ARELBODecoder", "GaussianAdaptive"]
