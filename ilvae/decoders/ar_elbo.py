"""AR-ELBO: Gaussian decoder with adaptive variance (Takida et al., Neurocomputing 2022).

With p(x|z) = N(f(z), σ² I), σ² is set on every training batch to its maximum-likelihood value

    σ̂² = SSE / (B·D)                      (isotropic)
    σ̂_j² = SSE_j / B                       (per dimension j)

where SSE = Σ_b Σ_d (x_bd − f(z_b)_d)². Substituting it, the batch-mean objective becomes
(D/2) log(SSE/B) + KL up to constants, and by the envelope theorem its gradient equals that of
the Gaussian NLL with σ² held fixed at σ̂². For evaluation (ELBO, importance-weighted NLL) σ² is
frozen to a running average of σ̂² over training batches, stored in the checkpoint as a buffer.
The likelihood itself, with its multi-process batch variance, is
:class:`ilvae.likelihoods.GaussianAdaptive` (imported here for the decoder and for old imports).

σ-VAE (Rybkin et al., "Simple and Effective VAE Training with Calibrated Decoders", ICML 2021)
trains with the optimal shared variance σ*² = MSE over the batch and the data dimensions, the
gradient passing through σ*²: that is the isotropic σ̂² above, so this decoder with
``per_dimension=False`` is σ-VAE's calibrated decoder in training (value and gradient are
tested equal). At evaluation σ-VAE's code recomputes σ*² on each evaluated batch:
``eval_variance="batch"``; the default ``"running"`` uses the running average. The remaining
difference, the soft floor of σ-VAE's code on log σ*, is described in
:class:`~ilvae.likelihoods.GaussianAdaptive`.
"""

from __future__ import annotations

from ilvae.decoders.mlp import MLPDecoder
from ilvae.likelihoods import GaussianAdaptive


class ARELBODecoder(MLPDecoder):
    """MLP mean decoder with the adaptive-variance Gaussian likelihood of AR-ELBO.

    ``per_dimension=True`` learns one σ̂_j² per data dimension; ``momentum`` sets the running
    average used at evaluation time, or ``eval_variance="batch"`` recomputes σ̂² on each
    evaluated batch as σ-VAE's code does (module docstring).
    """

    def __init__(self, latent_dim: int, data_dim: int, hidden: list[int] = [512],
                 activation: str = "relu", per_dimension: bool = False,
                 momentum: float | None = 0.05, eval_variance: str = "running") -> None:
        super().__init__(latent_dim, data_dim, hidden, activation, likelihood="gaussian")
        self.likelihood = GaussianAdaptive(data_dim, per_dimension=per_dimension,
                                           momentum=momentum, eval_variance=eval_variance)


__all__ = ["ARELBODecoder", "GaussianAdaptive"]
