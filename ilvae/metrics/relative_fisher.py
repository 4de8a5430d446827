"""Relative Fisher divergence between the posterior and the prior (Kinoshita et al., 2023)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from ilvae.errors import check_int
from ilvae.metrics.iw_nll import eval_mode, repeat_samples


def _fisher_bound(decoder: Any, latent_dim: int) -> float | None:
    """m L² / max_j σ_j² for a decoder with an inverse-Lipschitz constant and a Gaussian
    likelihood, ``None`` otherwise."""
    L = getattr(decoder, "L", None)
    variance = getattr(getattr(decoder, "likelihood", None), "variance", None)
    if L is None or not isinstance(variance, Tensor):
        return None
    return latent_dim * float(L) ** 2 / float(variance.detach().max())


class RelativeFisherDivergence(Metric):
    """Relative Fisher divergence between the true posterior and the prior, and its lower bound.

    The relative Fisher divergence F(p ‖ q) = E_{z~p} ‖∇_z log p(z) − ∇_z log q(z)‖² between the
    posterior p(z|x) and the prior p(z) is, since ∇_z log p(z|x) − ∇_z log p(z) = ∇_z log p(x|z),

        F(x) = E_{z ~ p(z|x)} ‖∇_z log p(x|z)‖²,

    the degree of posterior collapse used by Kinoshita et al. (ICML 2023). It is estimated with
    ``num_samples`` draws z from the encoder q(z|x) and autograd with respect to z::

        relative_fisher = (1/(N S)) Σ_n Σ_s ‖∇_z log p(x_n|z)|_{z = z_ns}‖²,  z_ns ~ q(z|x_n)

    Lower bound: for a Gaussian decoder p(x|z) = N(f(z), σ² I),
    E_{x~p(x|z)} ‖∇_z log p(x|z)‖² = tr(J_f(z)ᵀ J_f(z)) / σ², and when f is L-inverse-Lipschitz
    every singular value of J_f is ≥ L, so on the model's own data F ≥ m L² / σ² (with a
    per-dimension variance, m L² / max_j σ_j²). It is reported as ``relative_fisher_bound`` when
    the decoder has an inverse-Lipschitz constant ``decoder.L`` and its likelihood a ``variance``
    (σ² fixed, learned, or the frozen running value of the adaptive likelihood); otherwise NaN.
    On real data and with an approximate posterior the bound is a reference value rather than a
    guarantee for the estimate.

    ``update(x, model)``: x of shape (B, ...) as the likelihood expects it; ``model`` provides
    ``encode(x) -> Normal`` (m = its event size) and ``decoder`` (``log_prob(x, z) -> (B,)``,
    optional ``L``). The metric needs gradients, so it works even when the caller runs it under
    ``torch.no_grad()`` or ``torch.inference_mode()``: it computes on non-inference copies with
    gradients enabled, with respect to z only (model parameters get no ``.grad``). The model is
    in evaluation mode for the call (flags restored afterwards), so an adaptive-variance decoder
    uses its frozen σ² and rows of a batch never interact.

    ``compute()`` returns ``{"relative_fisher": estimate, "relative_fisher_bound": bound}``
    (float64 scalars; the bound is averaged over the same examples as the estimate).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.distributions import Normal
        >>> from ilvae.decoders.mlp import MLPDecoder
        >>> class Model(nn.Module):
        ...     latent_dim = 2
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.decoder = MLPDecoder(2, 3, hidden=[], likelihood="gaussian")
        ...     def encode(self, x):
        ...         return Normal(torch.zeros(x.shape[0], 2), torch.ones(x.shape[0], 2))
        >>> model, metric = Model(), RelativeFisherDivergence(num_samples=4)
        >>> with torch.inference_mode():
        ...     metric.update(torch.randn(16, 3), model)
        >>> out = metric.compute()
        >>> bool(out["relative_fisher"] > 0), bool(out["relative_fisher_bound"].isnan())
        (True, True)
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, num_samples: int = 1, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.num_samples = check_int("num_samples", num_samples)
        self.add_state("fisher_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bound_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bound_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x: Tensor, model: Any) -> None:
        batch = x.shape[0]
        with torch.inference_mode(False), torch.enable_grad(), eval_mode(model):
            x = x.clone()
            with torch.no_grad():
                posterior = model.encode(x)
                z = posterior.sample((self.num_samples,)).reshape(-1, posterior.loc.shape[-1])
            z = z.clone().requires_grad_(True)
            log_px = model.decoder.log_prob(repeat_samples(x, self.num_samples), z)
            (grad,) = torch.autograd.grad(log_px.sum(), z)
            fisher = grad.detach().double().pow(2).sum(-1).reshape(self.num_samples, batch)
            bound = _fisher_bound(model.decoder, z.shape[-1])
        self.fisher_sum = self.fisher_sum + fisher.mean(0).sum()
        self.count = self.count + batch
        if bound is not None:
            self.bound_sum = self.bound_sum + bound * batch
            self.bound_count = self.bound_count + batch

    def compute(self) -> dict[str, Tensor]:
        bound = self.bound_sum / self.bound_count if self.bound_count > 0 else math.nan
        return {
            "relative_fisher": self.fisher_sum / self.count,
            "relative_fisher_bound": torch.as_tensor(bound, dtype=torch.float64,
                                                     device=self.count.device),
        }
