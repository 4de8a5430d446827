"""Amortised Gaussian encoders q(z|x) = N(μ(x), diag s(x)²).

An encoder returns a ``torch.distributions.Normal`` with ``loc`` and ``scale`` of shape (B, m).
The scale is ``softplus(·) + min_scale``: smooth, positive, and able to reach the small values
that an adaptive-variance decoder asks for without the overflow of ``exp(log_var / 2)``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, Normal

from ilvae._config import Configurable
from ilvae.bn_vae import MeanBatchNorm
from ilvae.delta_vae import CommittedRateScale
from ilvae.errors import check, check_int
from ilvae.tokens import PAD, lengths

_ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh, "gelu": nn.GELU,
                "softplus": nn.Softplus, "elu": nn.ELU}


def make_activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        check("activation", name, f"one of {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def mlp(sizes: list[int], act: str) -> nn.Sequential:
    """Linear layers of the given sizes with ``act`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(make_activation(act))
    return nn.Sequential(*layers)


def check_hidden(hidden: list[int], field: str = "hidden") -> list[int]:
    hidden = list(hidden)
    if any(int(h) != h or h <= 0 for h in hidden):
        check(field, hidden, "a list of positive integers")
    return [int(h) for h in hidden]


class Encoder(Configurable, nn.Module):
    """Base class: ``forward(x) -> Normal`` over z with loc/scale of shape (B, latent_dim)."""

    def __init__(self, data_shape: tuple[int, ...], latent_dim: int) -> None:
        super().__init__()
        check_int("latent_dim", latent_dim)
        self.data_shape = tuple(data_shape)
        self.data_dim = math.prod(self.data_shape)
        self.latent_dim = latent_dim

    def _normal(self, h: Tensor, min_scale: float) -> Normal:
        loc, raw = h.chunk(2, dim=-1)
        scale = F.softplus(raw) + min_scale
        if min_scale > 0:
            return finite_normal(h, loc, scale)
        return Normal(loc, scale)  # softplus may underflow to 0: torch checks positivity


class MLPEncoder(Encoder):
    """x (flattened) → MLP(hidden) → (μ, s).

    Two collapse remedies are options of the posterior head, so they work in every model family
    that takes an encoder:

    - ``mean_batch_norm_gamma=γ``: BN-VAE (Zhu et al., ACL 2020), μ ↦ γ·BN(μ) + β with γ fixed,
      so the batch-mean KL is at least ½ Σ_i γ² v_i/(v_i + ε) ≈ m γ²/2 in training
      (:mod:`ilvae.bn_vae`).
    - ``committed_rate=δ``: δ-VAE (Razavi et al., ICLR 2019), s = σ_min + (σ_max − σ_min)·
      sigmoid(·) with σ_max < 1 chosen so that KL(q(z|x) ‖ N(0, I)) > δ nats for every x
      (:mod:`ilvae.delta_vae`); σ_min = ``min_scale``.
    """

    def __init__(self, data_shape: tuple[int, ...], latent_dim: int, hidden: list[int] = [512],
                 activation: str = "relu", min_scale: float = 1e-4,
                 mean_batch_norm_gamma: float | None = None,
                 committed_rate: float | None = None) -> None:
        super().__init__(data_shape, latent_dim)
        self.hidden = check_hidden(hidden)
        self.min_scale = min_scale
        self.net = mlp([self.data_dim, *self.hidden, 2 * latent_dim], activation)
        self.mean_batch_norm = (None if mean_batch_norm_gamma is None else
                                MeanBatchNorm(latent_dim, mean_batch_norm_gamma))
        self.committed_scale = (None if committed_rate is None else
                                CommittedRateScale(latent_dim, committed_rate, min_scale))

    def forward(self, x: Tensor) -> Normal:
        h = self.net(x.flatten(1))
        if self.mean_batch_norm is None and self.committed_scale is None:
            return self._normal(h, self.min_scale)
        loc, raw = h.chunk(2, dim=-1)
        if self.mean_batch_norm is not None:
            loc = self.mean_batch_norm(loc)
        if self.committed_scale is not None:
            return finite_normal(h, loc, self.committed_scale(raw))  # scale ≥ min_scale > 0
        scale = F.softplus(raw) + self.min_scale
        return finite_normal(h, loc, scale) if self.min_scale > 0 else Normal(loc, scale)


class LSTMEncoder(nn.Module):
    """q(z|x) = N(μ, diag s²) from the LSTM state after the last non-pad token:
    embedding → LSTM → linear → (μ, softplus(·) + ``min_scale``)."""

    def __init__(self, vocab_size: int, latent_dim: int, embedding_dim: int, hidden_dim: int,
                 min_scale: float = 1e-4) -> None:
        super().__init__()
        self.min_scale = min_scale
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=PAD)
        self.lstm = nn.LSTM(embedding_dim, hidden_dim, batch_first=True)
        self.head = nn.Linear(hidden_dim, 2 * latent_dim)

    def forward(self, tokens: Tensor) -> Normal:
        out, _ = self.lstm(self.embedding(tokens))
        # A unidirectional LSTM's output at the last real token is its state after the
        # sentence; the pads after it never reach it.
        last = (lengths(tokens) - 1).clamp(min=0)
        h = out[torch.arange(len(tokens), device=tokens.device), last]
        loc, raw = self.head(h).chunk(2, dim=-1)
        return Normal(loc, F.softplus(raw) + self.min_scale)


def finite_normal(h: Tensor, loc: Tensor, scale: Tensor) -> Normal:
    """``Normal(loc, scale)`` with torch's argument validation, at a fraction of its cost.

    ``h`` holds every value ``loc`` and ``scale`` are computed from, elementwise, and ``scale``
    must be positive wherever ``h`` is finite (softplus plus a positive minimum). One sum read
    on the host replaces torch's checks (about ten tensor operations per step, and the same one
    synchronisation on an accelerator): when the sum is finite, so is every value; otherwise torch
    validates the parameters itself and raises its usual error (NaN/inf weights or data), which
    the loss guard reports as a non-finite distribution parameter. With torch's validation
    switched off globally (``Distribution.set_default_validate_args(False)``) nothing is
    checked.
    """
    if Distribution._validate_args and not math.isfinite(float(h.detach().sum())):
        return Normal(loc, scale, validate_args=True)  # raises, unless the sum overflowed
    return Normal(loc, scale, validate_args=False)


EncoderCallable = Callable[[tuple, int], Encoder]
