"""Input-convex neural network (ICNN) with an explicit gradient map ∇ψ.

The potential ψ: R^n → R is the ICNN used by LIDVAE (Wang, Blei & Cunningham, NeurIPS 2021) and
IL-LIDVAE (Kinoshita et al., ICML 2023), with K hidden layers of widths
``hidden = [h₀, …, h_{K−1}]``::

    z₀ = A₀u + b₀,                 h₀ = a(z₀)²
    z_k = W_{k−1}h_{k−1} + A_ku + b_k,   h_k = a(z_k)          k = 1 … K−1
    ψ(u) = w_Kᵀ h_{K−1} + cᵀu                                    (output layer, width 1)

with ``a`` = LeakyReLU(0.2) (or softplus log(1 + e^z), whose gradient map has a continuous
Jacobian) and every W_k ≥ 0 and w_K ≥ 0. ψ is convex: a(t)² is convex (t² for t > 0 and s²t²
below for LeakyReLU; the square of a non-negative convex function for softplus), so h₀ is convex
in u, and a non-negative combination of convex functions plus an affine term, passed through a
convex non-decreasing ``a``, stays convex.

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
* **Initialisation**: the entries of the hidden-to-hidden W_k are drawn from U(0.1, 1.9)/fan_in
  (mean 1/fan_in), so W_k h_k is close to the average of h_k: the positive drift each layer adds
  stays of the order of the previous activations instead of being multiplied by fan_in·E[w] per
  layer, whatever the depth. The output weights w_K set the scale of the whole gradient map
  ∇ψ = Σ_k A_kᵀδ_k + c, since every δ_k is proportional to them (``output_init``): drawn from
  U(0.1, 1.9) (``"unit"``, mean 1, the default), U(0.1, 1.9)/√fan_in (``"sqrt_fan_in"``) or
  U(0.1, 1.9)/fan_in (``"fan_in"``, the rule of the hidden layers). With ``"fan_in"`` the map
  starts far flatter than an MLP decoder's output, and since W = softplus(V) makes Adam's steps
  on V multiplicative for small W, it grows only by a factor e every ~1/lr steps: on MNIST an IL
  decoder so initialised learned only its pixel biases in 40 epochs (``ilvae reproduce
  il-ablation`` measures each choice and the initial output spread). A_k and b_k follow
  ``nn.Linear`` (U(±1/√fan_in)), c starts at 0.

Lifted inputs: for u = βv with β a D×m linear map (m ≤ D), u enters the forward pass only through
A_kβ, so :meth:`lifted_gradient` projects the weights once (the columns A[:, :m] for the
zero-padding β = [I_m; 0], the H×m product A·β otherwise), runs every layer at the cost of an
m-dimensional input, and only the final matmul [δ₀ … δ_{K−1}]·A is D-dimensional. With
``lift_dim=m`` the matrix A is stored as the two column blocks A[:, :m] and A[:, m:], so the
zero-padded path never slices a parameter (the backward of a slice writes a zero-filled copy of
the whole D-wide matrix, which costs as much as the rest of the elementwise work together).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ilvae.encoders import check_hidden
from ilvae.errors import check

ACTIVATIONS = ("leaky_relu", "softplus")
#: Initial scale of the output weights w_K: the mean of U(0.1, 1.9) divided by 1, √fan_in, fan_in.
OUTPUT_INITS = ("unit", "sqrt_fan_in", "fan_in")


def _softplus_inverse(w: Tensor) -> Tensor:
    # log(exp(w) − 1), stable for small w.
    return w + torch.log(-torch.expm1(-w))


def _softplus(z: Tensor) -> Tensor:
    # log(1 + e^z) without F.softplus's switch to the identity above 20: that switch drops the
    # function by up to 2e-9 (a kink that breaks convexity at that level) and makes autograd's
    # derivative differ from the σ(z) of the explicit backward pass.
    return torch.logaddexp(z, z.new_zeros(()))


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


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
        lift_dim: m < n when ψ is mostly evaluated on lifted inputs βv, v ∈ R^m: A is
            stored as the column blocks A[:, :m], A[:, m:], and A, b are initialised with
            fan-in m (the width of what they actually see) instead of n.
        output_init: initial scale of the output weights w_K, one of ``OUTPUT_INITS`` (see the
            module docstring).

    Parameters: ``input_weight`` = the column blocks of A = [A₀; …; A_{K−1}] (Σh × n in all),
    ``linear_weight`` = c (n,), ``bias`` = [b₀; …; b_{K−1}] (Σh,), ``raw_weight[k]`` = V_k with
    W_k = softplus(V_k) (the last one, w_Kᵀ, of shape (1, h_{K−1})).

    >>> psi = ICNN(3, [16, 16])
    >>> u = torch.randn(5, 3)
    >>> psi(u).shape, psi.gradient(u).shape
    (torch.Size([5]), torch.Size([5, 3]))
    """

    def __init__(self, input_dim: int, hidden: list[int] = [512],
                 activation: str = "leaky_relu", negative_slope: float = 0.2,
                 lift_dim: int | None = None, output_init: str = "unit") -> None:
        super().__init__()
        if int(input_dim) != input_dim or input_dim <= 0:
            check("input_dim", input_dim, "an integer >= 1")
        if lift_dim is not None and (int(lift_dim) != lift_dim or not 0 < lift_dim <= input_dim):
            check("lift_dim", lift_dim, f"an integer in [1, input_dim={input_dim}] or None")
        self.hidden = check_hidden(hidden)
        if not self.hidden:
            check("hidden", hidden, "at least one width: ψ needs a hidden layer")
        if activation not in ACTIVATIONS:
            check("activation", activation,
                  f"a convex non-decreasing activation: one of {', '.join(ACTIVATIONS)}")
        if not 0.0 <= negative_slope <= 1.0:
            check("negative_slope", negative_slope, "a number in [0, 1] (keeps ψ convex)")
        if output_init not in OUTPUT_INITS:
            check("output_init", output_init, f"one of {', '.join(OUTPUT_INITS)}")
        self.input_dim = int(input_dim)
        self.activation = activation
        self.output_init = output_init
        self.negative_slope = float(negative_slope)
        self.lift_dim = int(lift_dim) if lift_dim is not None else self.input_dim
        self._bounds = [0]
        for h in self.hidden:
            self._bounds.append(self._bounds[-1] + h)
        total = self._bounds[-1]
        widths = [self.lift_dim, self.input_dim - self.lift_dim]
        self.input_weight = nn.ParameterList(
            nn.Parameter(torch.empty(total, w)) for w in widths if w > 0
        )
        self.linear_weight = nn.Parameter(torch.empty(self.input_dim))
        self.bias = nn.Parameter(torch.empty(total))
        self.raw_weight = nn.ParameterList(
            nn.Parameter(torch.empty(out, inp))
            for inp, out in zip(self.hidden, [*self.hidden[1:], 1], strict=True)
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.lift_dim)
        for block in self.input_weight:
            block.uniform_(-bound, bound)
        self.bias.uniform_(-bound, bound)
        self.linear_weight.zero_()
        last = len(self.raw_weight) - 1
        for k, v in enumerate(self.raw_weight):
            fan_in = v.shape[1]
            rule = self.output_init if k == last else "fan_in"
            divisor = {"unit": 1.0, "sqrt_fan_in": math.sqrt(fan_in), "fan_in": fan_in}[rule]
            w = torch.empty_like(v).uniform_(0.1, 1.9) / divisor
            v.copy_(_softplus_inverse(w))

    @property
    def weights(self) -> list[Tensor]:
        """The non-negative weights [W₀, …, W_{K−2}, w_Kᵀ] = softplus(V)."""
        return [F.softplus(v) for v in self.raw_weight]

    def input_matrix(self) -> Tensor:
        """A = [A₀; …; A_{K−1}] as one (Σh, n) tensor."""
        blocks = list(self.input_weight)
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, hidden={self.hidden}, "
                f"activation={self.activation!r}, lift_dim={self.lift_dim}, "
                f"output_init={self.output_init!r}")

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
            flat, dtype, proj, weights = self._project(v, beta)
            _, _, h = self._hidden_pass(proj, weights, last=True)
            c = _cast(self.linear_weight, dtype)
            c = c[: flat.shape[-1]] if beta is None else c @ _cast(beta, dtype)
            psi = torch.addmv(flat @ c, h, weights[-1][0])
            return psi.reshape(v.shape[:-1])

    def lifted_gradient(self, v: Tensor, beta: Tensor | None = None,
                        L: float | Tensor = 0.0) -> Tensor:
        """∇ψ(βv) + L·βv, shape (..., n), for v of shape (..., m).

        ``beta`` is a (n, m) matrix, or ``None`` for the zero-padding β = [I_m; 0]. A·β is
        computed once per call; βv is never formed for the layers.
        """
        with no_autocast(v.device.type):
            flat, dtype, proj, weights = self._project(v, beta)
            saved, a0, _ = self._hidden_pass(proj, weights, last=False)
            delta = self._backward_pass(saved, a0, weights)
            m = flat.shape[-1]
            c = _cast(self.linear_weight, dtype)
            blocks = [_cast(b, dtype) for b in self.input_weight]
            padded = beta is None and m == self.lift_dim
            if len(blocks) == 2:
                # Σ_k A_kᵀδ_k block by block: concatenating the outputs (B × n) is cheaper
                # than concatenating the weights (Σh × n).
                lift = self.lift_dim
                c_head = c[:lift] + flat * L if padded else c[:lift]
                out = torch.cat([torch.addmm(c_head, delta, blocks[0]),
                                 torch.addmm(c[lift:], delta, blocks[1])], dim=1)
            else:
                out = torch.addmm(c + flat * L if padded else c, delta, blocks[0])
            if beta is not None:
                out = out.addmm_(flat * L, _cast(beta, dtype).t())
            elif not padded:
                out[:, :m] += flat * L
            return out.reshape(*v.shape[:-1], self.input_dim)

    # -- internals ----------------------------------------------------------------------------

    def _project(self, v: Tensor, beta: Tensor | None):
        """Input projections [A₀βv + b₀, …] of shape (B, Σh), from A·β of shape (Σh, m)."""
        m = v.shape[-1]
        dtype = torch.promote_types(torch.promote_types(v.dtype, self.bias.dtype),
                                    torch.float32)
        blocks = [_cast(b, dtype) for b in self.input_weight]
        if beta is None:
            if m > self.input_dim:
                raise ValueError(f"a zero-padded input of size {m} does not fit input_dim="
                                 f"{self.input_dim}")
            if m == self.lift_dim:
                weight = blocks[0]
            else:
                weight = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
                weight = weight[:, :m]
        else:
            if tuple(beta.shape) != (self.input_dim, m):
                raise ValueError(f"beta must have shape ({self.input_dim}, {m}), "
                                 f"got {tuple(beta.shape)}")
            beta = _cast(beta, dtype)
            weight = blocks[0] @ beta[: self.lift_dim]
            if len(blocks) == 2:
                weight = weight.addmm_(blocks[1], beta[self.lift_dim:])
        flat = _cast(v, dtype).reshape(-1, m)
        proj = torch.addmm(_cast(self.bias, dtype), flat, weight.t())
        weights = [F.softplus(_cast(w, dtype)) for w in self.raw_weight]
        return flat, dtype, proj, weights

    def _slope(self, z: Tensor, square: bool = False) -> Tensor:
        """LeakyReLU derivative a′(z) ∈ {s, 1} (or its square), without autograd history.

        Built from ``sign`` because comparisons and ``where`` are several times slower on CPU.
        At z = 0 exactly it gives the midpoint of the subdifferential (a null set).
        """
        s = self.negative_slope ** 2 if square else self.negative_slope
        return torch.sign(z.detach()).mul_((1.0 - s) / 2).add_((1.0 + s) / 2)

    def _hidden_pass(self, proj: Tensor, weights: list[Tensor], last: bool):
        """Forward through the hidden layers. Returns what the backward pass reuses: for each
        layer z_k (softplus) or a′(z_k) (LeakyReLU, from k = 1), for the first layer a(z₀)
        (softplus) or 2a(z₀)a′(z₀) (LeakyReLU); and h_{K−1} if ``last``."""
        b = self._bounds
        depth = len(self.hidden)
        z = proj[:, b[0]:b[1]]
        h = z
        if self.activation == "softplus":
            a0 = _softplus(z)
            if depth > 1 or last:
                h = a0 * a0
        else:
            a0 = z * (2.0 * self._slope(z, square=True))  # 2a(z)a′(z) = 2z·a′(z)²
            if depth > 1 or last:
                h = (a0 * z).mul_(0.5)  # a(z)² = z²a′(z)²
        saved = [z]
        for k in range(1, depth):
            z = torch.addmm(proj[:, b[k]:b[k + 1]], h, weights[k - 1].t())
            if self.activation == "softplus":
                saved.append(z)
                if k < depth - 1 or last:
                    h = _softplus(z)
            else:
                slope = self._slope(z)
                saved.append(slope)
                if k < depth - 1 or last:
                    h = z * slope
        return saved, a0, h

    def _backward_pass(self, saved: list[Tensor], a0: Tensor, weights: list[Tensor]) -> Tensor:
        """[δ₀ … δ_{K−1}] with δ_k = ∂ψ/∂z_k, shape (B, Σh)."""
        softplus = self.activation == "softplus"
        g = weights[-1]  # ∂ψ/∂h_{K−1}, (1, h_{K−1}), broadcast over the batch
        deltas: list[Tensor] = []
        for k in range(len(saved) - 1, 0, -1):
            d = g * (torch.sigmoid(saved[k]) if softplus else saved[k])
            deltas.append(d)
            g = d @ weights[k - 1]
        if softplus:
            deltas.append(g * (2.0 * a0 * torch.sigmoid(saved[0])))
        else:
            deltas.append(g * a0)
        if len(deltas) == 1:
            return deltas[0]
        return torch.cat(deltas[::-1], dim=1)

