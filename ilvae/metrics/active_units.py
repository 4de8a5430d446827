"""Active units (Burda, Grosse & Salakhutdinov, 2016)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Normal
from torchmetrics import Metric

from ilvae.errors import check_number
from ilvae.metrics.kl_per_dimension import _check_width, _state_shape


class ActiveUnits(Metric):
    """Number of active latent units (Burda et al., "Importance Weighted Autoencoders", 2016).

    Unit i is active iff the unbiased variance over the evaluation set of its posterior mean
    exceeds the threshold δ (``threshold``, 0.01 by default)::

        A_i = Var_x(E_{q(z|x)}[z_i]) = (1/(N − 1)) Σ_n (μ_i(x_n) − μ̄_i)²,   AU = #{i : A_i > δ}

    This is not the "fraction of (example, dimension) pairs with KL ≥ 0.01" that some code bases
    also call AU.

    Accumulation: every state is a float64 sum, so batches and processes merge exactly by
    addition. Each batch b of n_b means contributes n_b, its shifted sum S_b = Σ (μ_n − c), its
    own centred sum of squares W_b = Σ (μ_n − μ̄_b)² and S_b²/n_b; then

        Σ_n (μ_n − μ̄)² = Σ_b W_b + Σ_b S_b²/n_b − S²/N

    (Chan et al.'s parallel-variance merge written as sums). The spread inside batches is
    computed without cancellation; the between-batch part loses about 10⁻¹⁶·(μ̄ − c)²/A_i in
    relative precision, negligible unless the means sit ~10⁶ standard deviations from the shift
    c = ``shift`` (default 0, the prior mean, near which a VAE's posterior means are centred).

    ``update(posterior)`` takes the ``Normal`` of ``model.encode(x)`` (loc: (B, m)); only the
    means are used. ``compute()`` returns the number of active units as an int64 scalar: 0 with
    fewer than two examples, since means that were seen once (or never) show no variance over
    the data and no unit can be counted active.
    ``latent_dim`` (m) gives the states their (m,) shape at construction (pass it under DDP,
    see :class:`~ilvae.metrics.KLPerDimension`).

    Example:
        >>> import torch
        >>> from torch.distributions import Normal
        >>> metric = ActiveUnits(threshold=0.01)
        >>> loc = torch.stack([torch.linspace(-1, 1, 50), torch.full((50,), 0.3)], dim=1)
        >>> metric.update(Normal(loc, torch.ones_like(loc)))
        >>> metric.compute()
        tensor(1)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, threshold: float = 0.01, shift: float = 0.0,
                 latent_dim: int | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.threshold = check_number("threshold", threshold)
        self.shift = float(shift)
        self._shape = _state_shape(latent_dim)
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("total", "within", "between"):
            self.add_state(name, torch.zeros(self._shape, dtype=torch.float64),
                           dist_reduce_fx="sum")

    def update(self, posterior: Normal) -> None:
        loc = posterior.loc.detach().double() - self.shift
        if loc.dim() != 2:
            raise ValueError(f"posterior.loc must have shape (B, m), got {tuple(loc.shape)}")
        _check_width(loc, self._shape, "posterior.loc")
        n = loc.shape[0]
        if n == 0:
            return
        batch_sum = loc.sum(0)
        self.count = self.count + n
        self.total = self.total + batch_sum
        self.within = self.within + ((loc - batch_sum / n) ** 2).sum(0)
        self.between = self.between + batch_sum**2 / n

    def _variance(self) -> Tensor:
        """A_i per unit; NaN with fewer than two examples, where the unbiased variance is not
        defined."""
        if self.count < 2:
            return torch.full_like(self.total, float("nan"))
        squares = self.within + (self.between - self.total**2 / self.count).clamp_min(0)
        return squares / (self.count - 1)

    def compute(self) -> Tensor:
        return (self._variance() > self.threshold).sum()
