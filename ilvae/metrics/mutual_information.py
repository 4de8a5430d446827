"""Mutual information between data and latent under the encoder (Hoffman & Johnson, 2016)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Normal
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ilvae.errors import check_int

_LOG_2PI = math.log(2 * math.pi)


class MutualInformation(Metric):
    """I_q(x; z), the mutual information between x and z under q(x, z) = p_data(x) q(z|x).

    With q(z) = (1/N) Σ_j q(z|x_j) the aggregate posterior of the evaluation set::

        I_q(x; z) = E_x KL(q(z|x) ‖ p(z)) − KL(q(z) ‖ p(z))
                  = (1/N) Σ_n E_{z ~ q(z|x_n)} [log q(z|x_n) − log q(z)]

    (the prior cancels, so no prior is needed). The inner expectation is estimated by Monte
    Carlo with ``num_samples`` draws z ~ q(z|x_n) per example, both log densities taken at the
    same draw (their difference varies far less than either term), and
    log q(z) = logsumexp_j log q(z|x_j) − log N over all N posteriors.

    The aggregate posterior is the one of the **whole evaluation set**, not of a mini-batch: all
    posterior parameters are kept (``dist_reduce_fx="cat"``, so all processes together) and
    ``compute`` evaluates the N × N mixture in chunks of ``chunk_size`` samples (O(N² m) time,
    O(chunk_size · N) memory; fine for N up to ~10⁴). The estimator of He et al. (2019), which
    uses a mini-batch mixture for q(z), cannot exceed about log(batch size); this one is capped
    near log N, so the two agree only when the true value is well below log(batch size).

    The Monte Carlo draws use a generator seeded with ``seed``, so every process computes the
    same number from the same gathered states.

    ``update(posterior)`` takes the ``Normal`` of ``model.encode(x)`` (loc, scale: (B, m)).
    ``compute()`` returns I_q(x; z) in nats as a float64 scalar.

    Example:
        >>> import math
        >>> import torch
        >>> from torch.distributions import Normal
        >>> metric = MutualInformation()
        >>> loc = 100.0 * torch.arange(8.0).unsqueeze(1)
        >>> metric.update(Normal(loc, torch.ones_like(loc)))
        >>> round(float(metric.compute()), 4) == round(math.log(8), 4)
        True
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, num_samples: int = 1, chunk_size: int = 1024, seed: int = 0,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.num_samples = check_int("num_samples", num_samples)
        self.chunk_size = check_int("chunk_size", chunk_size)
        self.seed = int(seed)
        self.add_state("loc", [], dist_reduce_fx="cat")
        self.add_state("scale", [], dist_reduce_fx="cat")

    def update(self, posterior: Normal) -> None:
        loc, scale = posterior.loc.detach(), posterior.scale.detach()
        if loc.dim() != 2:
            raise ValueError(f"posterior.loc must have shape (B, m), got {tuple(loc.shape)}")
        self.loc.append(loc)
        self.scale.append(scale.expand_as(loc))

    def compute(self) -> Tensor:
        loc = dim_zero_cat(self.loc).double()
        scale = dim_zero_cat(self.scale).double()
        n, m = loc.shape
        generator = torch.Generator().manual_seed(self.seed)
        eps = torch.randn(self.num_samples, n, m, generator=generator, dtype=torch.float64)
        z = (loc + scale * eps.to(loc.device)).reshape(-1, m)
        # Centring shrinks the terms of the expanded square below and so its rounding error.
        centre = loc.mean(0)
        loc, z = loc - centre, z - centre

        # log q(z|x_j) = −½ Σ_i (z_i − μ_ji)²/s_ji² − Σ_i log s_ji − (m/2) log 2π, with the
        # square expanded so each chunk is two matrix products instead of an (R, N, m) tensor.
        precision = scale**-2
        weighted_loc = loc * precision
        const = (-0.5 * (loc * weighted_loc).sum(1) - scale.log().sum(1) - 0.5 * m * _LOG_2PI)
        log_aggregate = torch.cat([
            torch.logsumexp(
                -0.5 * (zc**2) @ precision.T + zc @ weighted_loc.T + const, dim=1
            )
            for zc in z.split(self.chunk_size)
        ]) - math.log(n)
        log_own = (-0.5 * eps.to(loc.device) ** 2 - scale.log() - 0.5 * _LOG_2PI).sum(-1)
        return log_own.mean() - log_aggregate.mean()
