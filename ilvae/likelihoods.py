"""Observation models p(x|z) = p(x | θ = decoder(z)).

Every likelihood returns ``log p(x|θ)`` **summed over data dimensions**, one value per example
(shape ``(B,)``); the model averages over the batch. Names used in configs:

===================  ==============================================================  ==========
name                 log p(x|θ)                                                      θ
===================  ==============================================================  ==========
``bernoulli``        Σ_d x_d log σ(θ_d) + (1 − x_d) log(1 − σ(θ_d))                   logits
``gaussian``         −½ Σ_d [(x_d − θ_d)²/σ² + log 2πσ²], σ fixed                     mean
``gaussian_learned`` as above with σ a learned parameter (isotropic or per dimension)   mean
``gaussian_adaptive`` as above with σ² the batch maximum-likelihood value (AR-ELBO)     mean
``categorical``      Σ_c x_c log softmax(θ)_c (one-hot or integer-coded x)             logits
===================  ==============================================================  ==========
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ilvae.errors import check

_LOG_2PI = math.log(2 * math.pi)


class Likelihood(nn.Module):
    """Base class: ``log_prob(x, param) -> (B,)``, ``mean(param)``, ``sample(param)``."""

    name: str = ""

    def __init__(self, data_dim: int) -> None:
        super().__init__()
        self.data_dim = data_dim

    def log_prob(self, x: Tensor, param: Tensor) -> Tensor:
        raise NotImplementedError

    def mean(self, param: Tensor) -> Tensor:
        return param

    def sample(self, param: Tensor) -> Tensor:
        raise NotImplementedError

    def prepare(self, x: Tensor) -> Tensor:
        """Transform a data batch before it enters the model (e.g. dynamic binarisation)."""
        return x

    def check_data(self, x: Tensor) -> None:
        """Raise ``ValueError`` naming the likelihood when ``x`` lies outside its support."""
        if not torch.isfinite(x).all():
            raise ValueError(f"likelihood={self.name!r}: data contain NaN or infinite values")


class Bernoulli(Likelihood):
    """Bernoulli with logits θ; x in [0, 1] (grey levels are the continuous relaxation used by
    most image VAEs). ``binarize=True`` draws x ~ Bernoulli(x) anew for every training batch
    (dynamic binarisation, as in the LIDVAE experiments); evaluation keeps the grey levels and
    also reports scores on one fixed binarisation of the test data (:func:`binarize_fixed`), the
    numbers the literature compares.
    """

    name = "bernoulli"

    def __init__(self, data_dim: int, binarize: bool = False) -> None:
        super().__init__(data_dim)
        self.binarize = binarize

    def log_prob(self, x: Tensor, param: Tensor) -> Tensor:
        return -F.binary_cross_entropy_with_logits(param, x, reduction="none").sum(-1)

    def mean(self, param: Tensor) -> Tensor:
        return torch.sigmoid(param)

    def sample(self, param: Tensor) -> Tensor:
        return torch.bernoulli(torch.sigmoid(param))

    def prepare(self, x: Tensor) -> Tensor:
        if self.binarize and self.training:
            return torch.bernoulli(x)
        return x

    def check_data(self, x: Tensor) -> None:
        super().check_data(x)
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise ValueError(
                f"likelihood='bernoulli' needs data in [0, 1], got values in [{lo:g}, {hi:g}]; "
                "rescale the data or use likelihood='gaussian'"
            )


#: Seed of the fixed binarisation (:func:`binarize_fixed`). A constant, not the run's seed: every
#: run, whatever its training seed, is scored on the same binary test images.
BINARIZE_SEED = 0


def binarization_generator(seed: int = BINARIZE_SEED) -> torch.Generator:
    """The CPU generator that :func:`binarize_fixed` draws from: stream ``"binarize"`` of
    :func:`ilvae.datamodules.base.seeded_generator`, independent of the global random state."""
    from ilvae.datamodules.base import seeded_generator

    return seeded_generator(seed, "binarize")


def binarize_fixed(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One fixed, seeded binarisation of grey levels x ∈ [0, 1] (the binarised test set of the
    literature, for a Bernoulli likelihood)::

        x_bin = 1[u < x],   u ~ U(0, 1) of x's shape,

    so E[x_bin] = x. u is drawn in float32 on the CPU from ``generator`` (default: a fresh
    :func:`binarization_generator`), so the same x gives the same x_bin on any device, for any
    dtype of x and whatever the global random state. The generator's stream is consumed in order:
    calling this on consecutive blocks of rows with one generator gives the same result as one
    call on all rows, which is how a test loop binarises a split batch by batch.

    Returns a tensor of x's shape, dtype and device with values in {0, 1}.

    Example:
        >>> import torch
        >>> x = torch.full((2, 3), 0.5)
        >>> torch.equal(binarize_fixed(x), binarize_fixed(x))
        True
    """
    if generator is None:
        generator = binarization_generator()
    u = torch.rand(x.shape, generator=generator, dtype=torch.float32)
    return (u.to(x.device) < x).to(x.dtype)


class Gaussian(Likelihood):
    """N(x; θ, σ²I) with σ fixed (``sigma``)."""

    name = "gaussian"

    def __init__(self, data_dim: int, sigma: float = 1.0) -> None:
        super().__init__(data_dim)
        if not (math.isfinite(sigma) and sigma > 0):
            check("sigma", sigma, "a finite number > 0")
        self.register_buffer("log_sigma", torch.tensor(math.log(sigma)))

    @property
    def variance(self) -> Tensor:
        return torch.exp(2 * self.log_sigma)

    def log_prob(self, x: Tensor, param: Tensor) -> Tensor:
        var = self.variance.expand_as(param)
        return -0.5 * (((x - param) ** 2) / var + torch.log(var) + _LOG_2PI).sum(-1)

    def sample(self, param: Tensor) -> Tensor:
        return param + self.variance.sqrt() * torch.randn_like(param)


class GaussianLearned(Gaussian):
    """N(x; θ, σ²I) with log σ a trained parameter, one for all dimensions or one per dimension."""

    name = "gaussian_learned"

    def __init__(self, data_dim: int, sigma: float = 1.0, per_dimension: bool = False) -> None:
        super().__init__(data_dim, sigma)
        init = self.log_sigma.detach().clone()
        del self.log_sigma
        shape = (data_dim,) if per_dimension else ()
        self.log_sigma = nn.Parameter(init.expand(shape).clone())
        self.per_dimension = per_dimension


class Categorical(Likelihood):
    """Categorical over ``data_dim`` classes with logits θ. x is one-hot / a probability vector
    of shape (B, data_dim), or integer class indices of shape (B,) or (B, 1)."""

    name = "categorical"

    def log_prob(self, x: Tensor, param: Tensor) -> Tensor:
        logp = torch.log_softmax(param, dim=-1)
        if x.dim() == 1 or x.shape[-1] == 1 and self.data_dim > 1:
            return logp.gather(-1, x.reshape(-1, 1).long()).squeeze(-1)
        return (x * logp).sum(-1)

    def mean(self, param: Tensor) -> Tensor:
        return torch.softmax(param, dim=-1)

    def sample(self, param: Tensor) -> Tensor:
        return torch.distributions.Categorical(logits=param).sample()

    def check_data(self, x: Tensor) -> None:
        super().check_data(x)
        allowed = (f"integer class indices in [0, {self.data_dim - 1}] or one-hot (probability) "
                   f"rows of length {self.data_dim}")
        if x.dim() > 1 and x.shape[-1] == self.data_dim:
            lo, hi = float(x.min()), float(x.max())
            sums = x.sum(-1)
            worst = float((sums - 1).abs().max())
            if lo < 0 or hi > 1 or worst > 1e-4:
                raise ValueError(
                    f"likelihood='categorical' needs {allowed}; got values in [{lo:g}, {hi:g}] "
                    f"and row sums up to {worst:.3g} away from 1"
                )
            return
        fractional = x != x.round()
        if bool(fractional.any()):
            raise ValueError(f"likelihood='categorical' needs {allowed}; got the non-integer "
                             f"token {float(x[fractional][0]):g}")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi >= self.data_dim:
            raise ValueError(f"likelihood='categorical' needs {allowed}; got tokens in "
                             f"[{lo:g}, {hi:g}]")


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
    running average (``running_variance``) in evaluation mode: the likelihood of AR-ELBO
    (Takida et al., Neurocomputing 2022; :mod:`ilvae.decoders.ar_elbo` holds the maths of the
    objective it gives).

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

    ``momentum``: weight of the newest batch in the exponential running average; ``None`` keeps
    the plain cumulative average over all training batches. ``min_variance`` floors σ̂² so that a
    perfectly reconstructed batch does not produce log 0.

    The isotropic training-mode σ̂² = SSE/(B·D) is also the optimal shared decoder variance of
    σ-VAE (Rybkin et al., "Simple and Effective VAE Training with Calibrated Decoders", ICML
    2021): σ*² = MSE over the batch and the data dimensions, with the gradient taken through
    σ*², so in training this likelihood is σ-VAE's (``tests/decoders/test_ar_elbo.py`` checks
    the value and the gradient against σ-VAE's loss written out). Two differences remain: σ-VAE's
    code soft-clips log σ* from below at −6 (``−6 + softplus(log σ* + 6)``, which also raises
    σ* slightly above the optimum, by about 2.5 % at MSE = 0.01) where we clamp σ̂² at
    ``min_variance``; and at evaluation σ-VAE's code recomputes σ*² on each evaluated batch,
    which ``eval_variance="batch"`` reproduces, while the default ``"running"`` keeps the
    running average. With ``"batch"`` an example's likelihood depends on the other rows of its
    call (its batch, or the samples × batch of one importance-sampling chunk), so its
    log-likelihoods are not those of one fixed model.
    """

    name = "gaussian_adaptive"

    def __init__(self, data_dim: int, per_dimension: bool = False,
                 momentum: float | None = 0.05, min_variance: float = 1e-6,
                 eval_variance: str = "running") -> None:
        super().__init__(data_dim)
        if momentum is not None and not 0 < momentum <= 1:
            check("momentum", momentum, "a number in (0, 1] or None")
        if eval_variance not in ("running", "batch"):
            check("eval_variance", eval_variance, "'running' or 'batch'")
        self.eval_variance = eval_variance
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
        elif self.eval_variance == "batch":
            var = self.batch_variance(x, param)
        else:
            var = self.running_variance
        var = var.expand_as(param)
        return -0.5 * (((x - param) ** 2) / var + torch.log(var) + _LOG_2PI).sum(-1)

    def sample(self, param: Tensor) -> Tensor:
        return param + self.running_variance.sqrt() * torch.randn_like(param)


def _registry() -> dict[str, type[Likelihood]]:
    return {
        cls.name: cls
        for cls in (Bernoulli, Gaussian, GaussianLearned, GaussianAdaptive, Categorical)
    }


def names() -> list[str]:
    return sorted(_registry())


def build(name: str | Likelihood, data_dim: int, **options: object) -> Likelihood:
    """Build a likelihood by config name. ``options`` is the decoder's shared pool of likelihood
    settings (``sigma``, ``binarize``, ``per_dimension``, ...); each likelihood takes the ones
    its constructor names."""
    if isinstance(name, Likelihood):
        return name
    registry = _registry()
    if name not in registry:
        check("likelihood", name, f"one of {', '.join(names())}")
    cls = registry[name]
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "data_dim"}
    return cls(data_dim, **{k: v for k, v in options.items() if k in accepted})
