"""AR-ELBO: Gaussian decoder with adaptive variance (Takida et al., Neurocomputing 2022).

With p(x|z) = N(f(z), σ² I), σ² is set on every training batch to its maximum-likelihood value

    σ̂² = SSE / (B·D)                      (isotropic)
    σ̂_j² = SSE_j / B                       (per dimension j)

where SSE = Σ_b Σ_d (x_bd − f(z_b)_d)². Substituting it, the batch-mean objective becomes
(D/2) log(SSE/B) + KL up to constants, and by the envelope theorem its gradient equals that of
the Gaussian NLL with σ² held fixed at σ̂². For evaluation (ELBO, importance-weighted NLL) σ² is
frozen to a running average of σ̂² over training batches, stored in the checkpoint as a buffer.

Multi-process data parallel training (W processes, process r holding B_r of the N = Σ_r B_r
examples of a step): σ̂² is the maximum-likelihood variance of the whole N-example batch,

    σ̂² = Σ_r SSE_r / (Σ_r n_r)           (n_r = B_r·D isotropic, B_r per dimension),

both sums all-reduced across processes by a differentiable reduction whose backward pass is the
all-reduce (sum) of the incoming gradients. Process r minimises ℓ_r = −(1/B_r) Σ_b log p, and
DDP averages the processes' gradients, i.e. follows the gradient of (1/W) Σ_r ℓ_r. Through the
shared σ̂², θ_r reaches every ℓ_{r'}, so ∂/∂θ_r of that sum needs Σ_{r'} ∂ℓ_{r'}/∂σ̂², which is
what the all-reduce in the backward pass supplies; with equal B_r = N/W, (1/W) Σ_r ℓ_r is the
single-process batch mean, so the averaged gradient is the single-process gradient: no factor
W is to be added or removed (``tests/decoders/test_ar_elbo.py`` checks it on two processes).
Every process then gets the same σ̂², so the running average is the single-process one. The
reduction is a collective: every process computes training-mode log-probabilities the same
number of times per step, as DDP's training steps do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ilvae.decoders.mlp import MLPDecoder
from ilvae.likelihoods import _LOG_2PI, Likelihood


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """y = Σ_r x_r on every process. Backward: ∂/∂x_r = Σ_{r'} ∂ℓ_{r'}/∂y, the all-reduce of
    the processes' incoming gradients, since x_r enters every process's y. (The same as the
    deprecated ``torch.distributed.nn.functional.all_reduce``.)"""

    @staticmethod
    def forward(ctx: object, tensor: Tensor) -> Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


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
        sample dimensions (S, B, D) count as batch. In training under torch.distributed with
        more than one process, SSE and the count are summed over the processes first (module
        docstring), so σ̂² is that of the global batch."""
        sq = (x - param) ** 2
        rows = sq.reshape(-1, sq.shape[-1])
        if not (self.training and torch.is_grad_enabled() and _distributed()):
            var = rows.mean(0) if self.per_dimension else sq.mean()
            return var.clamp_min(self.min_variance)
        # At least float32 for the sums, so that the count stays exact under bf16/fp16.
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        sse = rows.sum(0) if self.per_dimension else rows.sum().reshape(1)
        count = len(rows) if self.per_dimension else rows.numel()
        # One collective for both sums; the count carries no gradient.
        total = _AllReduceSum.apply(torch.cat([sse, sse.new_full((1,), count)]))
        var = (total[:-1] / total[-1]).to(sq.dtype)
        var = var if self.per_dimension else var.reshape(())
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
