"""Importance-weighted estimate of the negative log-likelihood (Burda et al., 2016)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from ilvae.errors import check, check_int


def _modules(model: Any) -> list[nn.Module]:
    if isinstance(model, nn.Module):
        return list(model.modules())
    parts = [getattr(model, name, None) for name in ("encoder", "decoder", "prior")]
    return [mod for part in parts if isinstance(part, nn.Module) for mod in part.modules()]


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Put every module of ``model`` in evaluation mode and restore each one's flag afterwards.

    Evaluation mode matters for correctness, not only for dropout: the adaptive-variance
    likelihood uses its frozen running σ² only in eval mode (in training mode it would refit σ²
    to the batch and update its running average).
    """
    modules = _modules(model)
    flags = [mod.training for mod in modules]
    try:
        for mod in modules:
            mod.training = False
        yield
    finally:
        for mod, flag in zip(modules, flags, strict=True):
            mod.training = flag


_CHUNK_VALUES = 2**21


def repeat_samples(x: Tensor, k: int) -> Tensor:
    """(B, ...) → (k·B, ...), the k copies stacked sample-major."""
    return x.unsqueeze(0).expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])


def iw_bound(log_weights: Callable[[int], Tensor], num_samples: int, chunk: int) -> Tensor:
    """NLL_K = log K − logsumexp_k log w_k per example, (B,) float64 nats, for K =
    ``num_samples`` importance weights drawn ``chunk`` at a time: ``log_weights(k)`` returns the
    log weights log w = log p(x, z_k) − log q(z_k|x) of k fresh draws, shape (k, B). The one
    importance-weighting every model family uses (Burda et al., 2016)."""
    if int(num_samples) != num_samples or num_samples < 1:
        check("num_samples", num_samples, "an integer >= 1")
    if int(chunk) != chunk or chunk < 1:
        check("chunk_size", chunk, "an integer >= 1")
    log_w = [log_weights(min(chunk, num_samples - start)).double()
             for start in range(0, num_samples, chunk)]
    return math.log(num_samples) - torch.logsumexp(torch.cat(log_w), dim=0)


def default_chunk(x: Tensor) -> int:
    """Samples per chunk so that a chunk's k·B·D likelihood terms stay near 2²¹ values."""
    return max(1, _CHUNK_VALUES // max(1, x[:1].numel() * x.shape[0]))


def importance_weighted_nll(model: Any, x: Tensor, num_samples: int,
                            chunk_size: int | None = None) -> Tensor:
    """NLL_K(x) per example, (B,) float64 nats, for a model with one latent level: z_k drawn
    from ``model.encode(x)``, scored by ``model.decoder.log_prob`` and ``model.prior.log_prob``
    (formula and chunking as in :class:`ImportanceWeightedNLL`). Any proposal q gives a valid
    bound, so q need not be the exact posterior (e.g. a mixture's moment-matched q(z|x)). The
    model is in evaluation mode for the call; no gradients are recorded."""
    with torch.no_grad(), eval_mode(model):
        posterior = model.encode(x)
        batch = x.shape[0]

        def log_weights(k: int) -> Tensor:
            z = posterior.sample((k,))  # (k, B, m)
            flat = z.reshape(k * batch, -1)
            log_px = model.decoder.log_prob(repeat_samples(x, k), flat).reshape(k, batch)
            log_pz = model.prior.log_prob(flat).reshape(k, batch)
            return log_px + log_pz - posterior.log_prob(z).sum(-1)

        return iw_bound(log_weights, num_samples, chunk_size or default_chunk(x))


class ImportanceWeightedNLL(Metric):
    """Importance-weighted negative log-likelihood in nats (Burda et al., 2016).

    For every example x, with K = ``num_samples`` draws z_k ~ q(z|x) from the encoder::

        NLL_K(x) = −log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x)
                 = −(logsumexp_k [log p(x|z_k) + log p(z_k) − log q(z_k|x)] − log K)

    with log p(x|z) summed over data dimensions (the decoder's likelihood) and the prior of the
    model. E[NLL_K(x)] ≥ −log p(x) and decreases to it as K grows; it equals −log p(x) for any K
    when q(z|x) is the exact posterior. K = 500 is the convention in the collapse literature.

    ``update(x, model)``: x of shape (B, ...) as the likelihood expects it (already prepared,
    e.g. not binarised again); a model that offers ``iw_nll(x, num_samples, chunk_size)``
    (per-example NLL_K, e.g. a two-level model) is measured by it, any other must provide
    ``encode(x) -> Normal``, ``decoder`` (with ``log_prob(x, z) -> (B,)``) and ``prior``
    (``log_prob(z) -> (B,)``) for :func:`importance_weighted_nll`. The whole batch is
    processed at once and the K samples in chunks of ``chunk_size`` (memory ~ chunk_size · B · D).
    By default (``None``) a chunk holds as many samples as keep its B·k·D likelihood terms near
    2²¹ values: the likelihood's elementwise passes then run on data that fits the CPU caches,
    which measured faster than larger chunks.
    The model is switched to evaluation mode for the call (each module's flag is restored
    afterwards), so an adaptive-variance decoder uses its frozen running σ²; no gradients are
    recorded.

    ``compute()`` returns the mean NLL_K over all examples (float64 scalar, nats per example);
    the states ``nll_sum`` and ``count`` hold the sum and the number of examples.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.distributions import Normal
        >>> from ilvae.decoders.mlp import MLPDecoder
        >>> from ilvae.priors import StandardNormal
        >>> class Model(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.decoder = MLPDecoder(2, 3, hidden=[8], likelihood="gaussian")
        ...         self.prior = StandardNormal(2)
        ...     def encode(self, x):
        ...         return Normal(torch.zeros(x.shape[0], 2), torch.ones(x.shape[0], 2))
        >>> metric = ImportanceWeightedNLL(num_samples=100, chunk_size=25)
        >>> metric.update(torch.randn(16, 3), Model())
        >>> metric.compute().shape
        torch.Size([])
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_samples: int = 500, chunk_size: int | None = None,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.num_samples = check_int("num_samples", num_samples)
        self.chunk_size = None if chunk_size is None else check_int("chunk_size", chunk_size)
        self.add_state("nll_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x: Tensor, model: Any) -> None:
        offered = getattr(model, "iw_nll", None)
        with torch.no_grad():
            if callable(offered):  # the model's own estimator (several levels, its own data)
                nll = offered(x, num_samples=self.num_samples, chunk_size=self.chunk_size)
            else:
                nll = importance_weighted_nll(model, x, self.num_samples, self.chunk_size)
        self.nll_sum = self.nll_sum + nll.double().sum()
        self.count = self.count + nll.shape[0]

    def compute(self) -> Tensor:
        return self.nll_sum / self.count
