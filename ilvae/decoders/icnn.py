"""Input-convex neural network (ICNN) with an explicit gradient map ∇ψ.

The potential ψ: R^n → R is the ICNN used by LIDVAE (Wang, Blei & Cunningham, NeurIPS 2021) and
IL-LIDVAE (Kinoshita et al., ICML 2023), with K hidden layers of widths ``hidden = [h₀, …, h_{K−1}]``::

    z₀ = A₀u + b₀,                 h₀ = a(z₀)²
    z_k = W_{k−1}h_{k−1} + A_ku + b_k,   h_k = a(z_k)          k = 1 … K−1
    ψ(u) = w_Kᵀ h_{K−1} + cᵀu                                    (output layer, width 1)

with ``a`` = LeakyReLU(0.2) (or softplus, whose gradient map has a continuous Jacobian) and every
W_k ≥ 0 and w_K ≥ 0. ψ is convex: a(·)² of an affine map is convex, and a non-negative combination
of convex functions passed through a convex non-decreasing ``a`` stays convex.

The gradient is written out as the backward pass of this feed-forward net, in ordinary tensor ops
that reuse the pre-activations z_k of the forward pass::

    δ_{K−1} = w_K ⊙ a′(z_{K−1}),   δ_{k−1} = (W_{k−1}ᵀ δ_k) ⊙ a′(z_{k−1}),
    δ₀ uses 2 a(z₀) a′(z₀) instead of a′(z₀),
    ∇ψ(u) = Σ_k A_kᵀ δ_k + c = [δ₀ … δ_{K−1}] · [A₀; …; A_{K−1}] + c      (one matmul)

so a loss on ∇ψ trains with one ordinary backward (no ``create_graph``), and ∇ψ is computed under
``torch.inference_mode()`` and by ``torch.compile`` like any other layer.

Design choices:

* **Linear output layer without bias.** A bias on ψ never reaches ∇ψ (a parameter without
  gradient, which breaks DDP's default), and an activation on the output would only rescale the
  whole gradient map by 1 or 0.2 depending on the sign of ψ. The linear term ``cᵀu`` is kept: it is
  the constant shift of ∇ψ (for a data-space potential, the per-pixel bias).
* **W ≥ 0 as W = softplus(V)** of a free parameter V. Convexity then holds for every parameter
  value: there is no projection step that an optimiser loop, a checkpoint restore or gradient
  clipping could skip, and unlike ``clamp(min=·)`` in the forward pass no gradient is ever cut.
  Softplus rather than exp grows linearly for large V, so one large step cannot blow a weight up,
  while for small W it behaves like exp(V), so Adam/RMSProp steps on V act as multiplicative
  updates of W.
* **Initialisation**: the entries of W_k are drawn from U(0.1, 1.9)/fan_in (mean 1/fan_in), so
  W_k h_k is close to the average of h_k: the positive drift each layer adds stays of the order of
  the previous activations instead of being multiplied by fan_in·E[w] per layer, whatever the
  depth. A_k and b_k follow ``nn.Linear`` (U(±1/√fan_in)), c starts at 0.

Lifted inputs: for u = βv with β a D×m linear map (m ≤ D), u enters the forward pass only through
A_kβ, so :meth:`lifted_gradient` projects the weights once (the column slice A[:, :m] for the
zero-padding β = [I_m; 0], the H×m product A·β otherwise), runs every layer at the cost of an
m-dimensional input, and only the final matmul [δ₀ … δ_{K−1}]·A is D-dimensional.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ilvae.encoders import check_hidden

ACTIVATIONS = ("leaky_relu", "softplus")


def _softplus_inverse(w: Tensor) -> Tensor:
    # log(exp(w) − 1), stable for small w.
    return w + torch.log(-torch.expm1(-w))


def no_autocast(device_type: str) -> torch.autocast:
    """Context that switches autocast off, so the maps run in float32 (or float64)."""
    return torch.autocast(device_type=device_type, enabled=False)


class ICNN(nn.Module):
    """Convex potential ψ: R^n → R with an explicit gradient (see the module docstring).

    Args:
        input_dim: n.
        hidden: hidden widths [h₀, …, h_{K−1}], at least one.
        activation: ``"leaky_relu"`` (slope ``negative_slope``) or ``"softplus"``.
        negative_slope: LeakyReLU slope in [0, 1] (convex and non-decreasing).
        init_fan_in: fan-in used to initialise A and b; defaults to ``input_dim``. A potential
            that only ever sees lifted inputs βv, v ∈ R^m, is better initialised with m.

    Parameters: ``input_weight`` = [A₀; …; A_{K−1}; cᵀ] of shape (Σh + 1, n), ``bias`` =
    [b₀; …; b_{K−1}] of shape (Σh,), ``raw_weight[k]`` = V_k with W_k = softplus(V_k).

    >>> psi = ICNN(3, [16, 16])
    >>> u = torch.randn(5, 3)
    >>> psi(u).shape, psi.gradient(u).shape
    (torch.Size([5]), torch.Size([5, 3]))
    """

    def __init__(self, input_dim: int, hidden: list[int] = [512],  # noqa: B006
                 activation: str = "leaky_relu", negative_slope: float = 0.2,
                 init_fan_in: int | None = None) -> None:
        super().__init__()
        if int(input_dim) != input_dim or input_dim <= 0:
            raise ValueError(f"input_dim must be a positive integer, got {input_dim}")
        self.hidden = check_hidden(hidden)
        if not self.hidden:
            raise ValueError("hidden must list at least one width: ψ needs a hidden layer")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not convex and non-decreasing; "
                             f"choose one of {', '.join(ACTIVATIONS)}")
        if not 0.0 <= negative_slope <= 1.0:
            raise ValueError(f"negative_slope must lie in [0, 1] to keep ψ convex, "
                             f"got {negative_slope}")
        self.input_dim = int(input_dim)
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.init_fan_in = int(init_fan_in or input_dim)
        self._bounds = [0]
        for h in self.hidden:
            self._bounds.append(self._bounds[-1] + h)
        total = self._bounds[-1]
        self.input_weight = nn.Parameter(torch.empty(total + 1, self.input_dim))
        self.bias = nn.Parameter(torch.empty(total))
        self.raw_weight = nn.ParameterList(
            nn.Parameter(torch.empty(out, inp))
            for inp, out in zip(self.hidden, [*self.hidden[1:], 1])
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.init_fan_in)
        self.input_weight.uniform_(-bound, bound)
        self.input_weight[-1].zero_()
        self.bias.uniform_(-bound, bound)
        for v in self.raw_weight:
            fan_in = v.shape[1]
            w = torch.empty_like(v).uniform_(0.1, 1.9) / fan_in
            v.copy_(_softplus_inverse(w))

    @property
    def weights(self) -> list[Tensor]:
        """The non-negative weights [W₀, …, W_{K−2}, w_Kᵀ] = softplus(V)."""
        return [F.softplus(v) for v in self.raw_weight]

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, hidden={self.hidden}, "
                f"activation={self.activation!r}")

    # -- public maps --------------------------------------------------------------------------

    def forward(self, u: Tensor) -> Tensor:
        """ψ(u) for u of shape (..., n); returns shape (...)."""
        return self.lifted_potential(u)

    def gradient(self, u: Tensor, L: float | Tensor = 0.0) -> Tensor:
        """∇ψ(u) + L·u for u of shape (..., n): the gradient of ψ(u) + (L/2)‖u‖²."""
        return self.lifted_gradient(u, None, L)

    def lifted_potential(self, v: Tensor, beta: Tensor | None = None) -> Tensor:
        """ψ(βv) for v of shape (..., m); ``beta`` a (n, m) matrix, or ``None`` for the
        zero-padding [I_m; 0]."""
        with no_autocast(v.device.type):
            v, flat, weight, bias, weights = self._prepare(v, beta)
            proj = torch.addmm(bias, flat, weight[:-1].t())
            zs, _, h = self._hidden_pass(proj, weights)
            psi = (h @ weights[-1].t()).squeeze(-1) + flat @ weight[-1]
            return psi.reshape(v.shape[:-1])

    def lifted_gradient(self, v: Tensor, beta: Tensor | None = None,
                        L: float | Tensor = 0.0) -> Tensor:
        """∇ψ(βv) + L·βv, shape (..., n), for v of shape (..., m).

        ``beta`` is a (n, m) matrix, or ``None`` for the zero-padding β = [I_m; 0] (then the
        input projections are the column slice A[:, :m] and L·βv is added to the first m
        outputs in place). A·β is computed once per call; βv is never formed for the layers.
        """
        with no_autocast(v.device.type):
            v, flat, weight, bias, weights = self._prepare(v, beta)
            proj = torch.addmm(bias, flat, weight[:-1].t())
            zs, a0, _ = self._hidden_pass(proj, weights)
            delta = self._backward_pass(zs, a0, weights)
            full = self.input_weight.to(flat.dtype)
            out = torch.addmm(full[-1], delta, full[:-1])
            m = flat.shape[-1]
            if beta is None:
                out[:, :m] += flat * L
            else:
                out = out.addmm_(flat * L, beta.to(flat.dtype).t())
            return out.reshape(*v.shape[:-1], self.input_dim)

    # -- internals ----------------------------------------------------------------------------

    def _prepare(self, v: Tensor, beta: Tensor | None):
        m = v.shape[-1]
        dtype = torch.promote_types(torch.promote_types(v.dtype, self.input_weight.dtype),
                                    torch.float32)
        if beta is None:
            if m > self.input_dim:
                raise ValueError(f"a zero-padded input of size {m} does not fit input_dim="
                                 f"{self.input_dim}")
            weight = self.input_weight.to(dtype)[:, :m]
        else:
            if tuple(beta.shape) != (self.input_dim, m):
                raise ValueError(f"beta must have shape ({self.input_dim}, {m}), "
                                 f"got {tuple(beta.shape)}")
            weight = self.input_weight.to(dtype) @ beta.to(dtype)
        flat = v.to(dtype).reshape(-1, m)
        weights = [F.softplus(w.to(dtype)) for w in self.raw_weight]
        return v, flat, weight, self.bias.to(dtype), weights

    def _act(self, z: Tensor) -> Tensor:
        if self.activation == "softplus":
            return F.softplus(z)
        return F.leaky_relu(z, self.negative_slope)

    def _hidden_pass(self, proj: Tensor, weights: list[Tensor]):
        """Forward through the hidden layers; returns pre-activations, a(z₀) and the last h."""
        b = self._bounds
        z = proj[:, b[0]:b[1]]
        a0 = self._act(z)
        h = a0 * a0
        zs = [z]
        for k in range(1, len(self.hidden)):
            z = torch.addmm(proj[:, b[k]:b[k + 1]], h, weights[k - 1].t())
            zs.append(z)
            h = self._act(z)
        return zs, a0, h

    def _backward_pass(self, zs: list[Tensor], a0: Tensor, weights: list[Tensor]) -> Tensor:
        """[δ₀ … δ_{K−1}] with δ_k = ∂ψ/∂z_k, shape (B, Σh)."""
        g = weights[-1]  # ∂ψ/∂h_{K−1}, (1, h_{K−1}), broadcast over the batch
        deltas: list[Tensor] = []
        for k in range(len(zs) - 1, 0, -1):
            d = self._act_backward(zs[k], g)
            deltas.append(d)
            g = d @ weights[k - 1]
        z0 = zs[0]
        if self.activation == "softplus":
            d0 = g * (2.0 * a0 * torch.sigmoid(z0))
        else:
            s = self.negative_slope
            d0 = g * torch.where(z0 > 0, 2.0 * z0, (2.0 * s * s) * z0)
        deltas.append(d0)
        if len(deltas) == 1:
            return d0
        return torch.cat(deltas[::-1], dim=1)

    def _act_backward(self, z: Tensor, g: Tensor) -> Tensor:
        """g ⊙ a′(z); a′ at 0 follows autograd's convention for leaky_relu (the slope)."""
        if self.activation == "softplus":
            return g * torch.sigmoid(z)
        return torch.where(z > 0, g, g * self.negative_slope)
