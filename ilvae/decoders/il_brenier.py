"""Inverse-Lipschitz Brenier decoder: IL-LIDVAE (Kinoshita et al., ICML 2023), LIDVAE at L = 0
(Wang, Blei & Cunningham, NeurIPS 2021).

The decoder output (the likelihood's natural parameter: Bernoulli logits, Gaussian mean) is

    f(z) = g₂(β g₁(z)),   g_i(u) = ∇ψ_i(u) + L_i u,

with ψ₁: R^m → R and ψ₂: R^D → R input-convex networks (:mod:`ilvae.decoders.icnn`) and β: R^m →
R^D an injective linear lift. g_i is the gradient of the (L_i)-strongly convex potential
ψ_i(u) + (L_i/2)‖u‖², hence a Brenier map that is L_i-strongly monotone and so L_i-inverse-
Lipschitz: ‖g_i(u) − g_i(u′)‖ ≥ L_i‖u − u′‖. With s_min the smallest singular value of β,

    ‖f(z) − f(z′)‖ ≥ L₁ · s_min · L₂ · ‖z − z′‖ = L ‖z − z′‖.

``L`` is this guaranteed constant of the whole map z ↦ f(z). By default it is split evenly,
L₁ = L₂ = √(L / s_min). L = 0 gives LIDVAE, whose injectivity rests on ψ_i being strictly convex
(which a LeakyReLU ICNN does not guarantee everywhere); L > 0 makes it hold with a margin.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ilvae.decoders.base import Decoder
from ilvae.decoders.icnn import ACTIVATIONS, ICNN, OUTPUT_INITS, no_autocast
from ilvae.encoders import check_hidden
from ilvae.errors import check

BETAS = ("padding", "random", "trainable")
#: Earlier name of ``beta="padding"``, still accepted so that existing configs and checkpoints
#: rebuild the same decoder.
_BETA_ALIASES = {"fixed": "padding"}


def _check_constant(field: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value >= 0
    ):
        check(field, value, f"a finite number >= 0{' (L=0 is LIDVAE)' if field == 'L' else ''}")
    return float(value)


def _split(L: float, L1: float | None, L2: float | None, s_min: float) -> tuple[float, float]:
    """(L1, L2) with L1·L2·s_min = L; an explicitly given factor is kept."""
    if L1 is None and L2 is None:
        root = math.sqrt(L / s_min)
        return root, root
    if L1 is not None and L2 is not None:
        implied = L1 * L2 * s_min
        if not math.isclose(L, implied, rel_tol=1e-6, abs_tol=1e-12):
            check("L", L, f"L1·L2·s_min = {implied} with L1={L1}, L2={L2} and beta's smallest "
                          f"singular value s_min={s_min} (or give only one of L1, L2)")
        return L1, L2
    field, given = ("L1", L1) if L1 is not None else ("L2", L2)
    if given == 0:
        if L > 0:
            check(field, given, f"a number > 0 for a decoder constant L={L} > 0 (or set L=0)")
        return 0.0, 0.0
    other = L / (given * s_min)
    return (given, other) if field == "L1" else (other, given)


def _round_up(value: float, dtype: torch.dtype) -> Tensor:
    """``value`` as a 0-d tensor of ``dtype``, rounded up rather than to nearest."""
    t = torch.tensor(value, dtype=dtype)
    if float(t) < value:
        t = torch.nextafter(t, torch.tensor(math.inf, dtype=dtype))
    return t


class ILBrenierDecoder(Decoder):
    """f(z) = g₂(β g₁(z)), g_i = ∇ICNN_i + L_i·id: an L-inverse-Lipschitz decoder.

    Args:
        latent_dim: m. data_dim: D ≥ m.
        L: guaranteed inverse-Lipschitz constant of z ↦ f(z), ‖f(z) − f(z′)‖ ≥ L‖z − z′‖.
            0 gives LIDVAE.
        hidden: hidden widths of each of the two ICNNs.
        L1, L2: the factors on g₁ and g₂. Default: L1 = L2 = √(L/s_min). Give one and the other
            follows from L; give both and L must equal L1·L2·s_min (``ValueError`` naming ``L``
            otherwise).
        activation: ``"leaky_relu"`` (slope 0.2, as the authors) or ``"softplus"`` (smooth, so
            the decoder's Jacobian is continuous).
        beta: the lift β: R^m → R^D.
            ``"padding"`` (default): the isometric zero-padding β = [I_m; 0] (s_min = 1) of the
            LIDVAE paper's main text (``"fixed"`` is its earlier name). It feeds βv, and the
            L₂ term of the guarantee, into the first m data dimensions only (for MNIST, an
            always-black corner).
            ``"random"``: a fixed random isometry, the Q factor of a D×m standard normal matrix
            drawn from ``beta_seed`` (orthonormal columns), kept as a float32 buffer; s_min is
            the smallest singular value of the stored matrix (1 up to float32 rounding), computed
            in float64 so that the guarantee holds for the values actually used. It spreads
            the latent and the L₂ term over every data dimension.
            ``"trainable"``: β = U diag(s) Vᵀ with U (D×m, orthonormal columns) and V (m×m,
            orthogonal) the Q factors of the QR decompositions of free parameters (sign-fixed
            so diag R > 0) and s = lo + (hi − lo)·sigmoid(r), so every singular value stays in
            ``beta_singular_values`` = (lo, hi); the guarantee uses s_min = lo. It starts at
            [I_m; 0]·(lo + hi)/2.
        beta_singular_values: (lo, hi) with 0 < lo ≤ hi, for ``beta="trainable"``.
        beta_seed: seed of the random isometry (``beta="random"``); the draw does not touch the
            global random state.
        output_init: initial scale of each ICNN's output weights (``"unit"``, ``"sqrt_fan_in"``
            or ``"fan_in"``, see :mod:`ilvae.decoders.icnn`); it sets how steep ∇ψ starts.

        likelihood, sigma, binarize: see :class:`~ilvae.decoders.base.Decoder`.

    Defaults (``beta="padding"``, ``output_init="unit"``) are the best measured choice of the
    ablation ``ilvae reproduce il-ablation`` on MNIST5k. With the earlier
    ``output_init="fan_in"`` the decoder barely learned there (with the zero-padding, only the
    pixel biases): the main cause was the flat initial map ∇ψ, not the corner that the
    zero-padding feeds.

    ``L`` is a property: reading it gives the current guaranteed constant L1·L2·s_min; assigning
    it (annealing) re-splits it keeping the ratio L1/L2 of the construction (an even split when
    that ratio is 0 or undefined). L1 and L2 are buffers, so checkpoints keep the current values.

    The maps run with autocast switched off, in float32 (float64 if the weights are float64), so
    mixed precision cannot break the guarantee. Casting the module keeps L1, L2 in at least
    float32 (``.half()`` leaves them float32) and rounds them up, never to nearest, when a cast
    lowers their precision (float64 → float32), so the guaranteed L never drops below its
    nominal value.

    >>> dec = ILBrenierDecoder(8, 64, L=1.5, hidden=[32])
    >>> dec(torch.randn(4, 8)).shape
    torch.Size([4, 64])
    """

    def __init__(self, latent_dim: int, data_dim: int, L: float = 1.0,
                 hidden: list[int] = [512], L1: float | None = None,
                 L2: float | None = None, activation: str = "leaky_relu", beta: str = "padding",
                 beta_singular_values: tuple[float, float] = (1.0, 2.0), beta_seed: int = 0,
                 output_init: str = "unit", likelihood: str = "bernoulli", sigma: float = 1.0,
                 binarize: bool = False) -> None:
        super().__init__(latent_dim, data_dim, likelihood, sigma, binarize)
        if self.data_dim < self.latent_dim:
            check("data_dim", data_dim, f"an integer >= latent_dim={latent_dim}, so that the "
                                        "lift β: R^latent_dim → R^data_dim is injective")
        if activation not in ACTIVATIONS:
            check("activation", activation, f"one of {', '.join(ACTIVATIONS)}")
        beta = _BETA_ALIASES.get(beta, beta)
        if beta not in BETAS:
            check("beta", beta, f"one of {', '.join(BETAS)}")
        if output_init not in OUTPUT_INITS:
            check("output_init", output_init, f"one of {', '.join(OUTPUT_INITS)}")
        if isinstance(beta_seed, bool) or int(beta_seed) != beta_seed:
            check("beta_seed", beta_seed, "an integer")
        lo, hi = self._check_range(beta_singular_values)
        L = _check_constant("L", L)
        L1 = _check_constant("L1", L1)
        L2 = _check_constant("L2", L2)
        self.hidden = check_hidden(hidden)
        if not self.hidden:
            check("hidden", hidden, "at least one width for each ICNN")
        self.activation = activation
        self.beta = beta
        self.beta_singular_values = (lo, hi)
        self.output_init = output_init
        m, D = self.latent_dim, self.data_dim
        self.s_min = lo if beta == "trainable" else 1.0
        if beta == "random":
            isometry = self._random_isometry(D, m, int(beta_seed))
            # Rounded down by far more than float64's error in the singular values.
            self.s_min = float(torch.linalg.svdvals(isometry.double()).min()) * (1 - 1e-12)

        L1, L2 = _split(L, L1, L2, self.s_min)
        self._ratio = L1 / L2 if L1 > 0 and L2 > 0 else 1.0
        self.register_buffer("L1", torch.zeros(()))
        self.register_buffer("L2", torch.zeros(()))
        self._store(L1, L2, L)

        self.psi1 = ICNN(m, self.hidden, activation, output_init=output_init)
        self.psi2 = ICNN(D, self.hidden, activation, lift_dim=m, output_init=output_init)
        if beta == "random":
            self.register_buffer("beta_isometry", isometry)
        elif beta == "trainable":
            self.beta_u = nn.Parameter(torch.eye(D, m))
            self.beta_v = nn.Parameter(torch.eye(m))
            self.beta_s = nn.Parameter(torch.zeros(m))

    @staticmethod
    def _check_range(values: Sequence[float]) -> tuple[float, float]:
        try:
            lo, hi = (float(v) for v in values)
        except (TypeError, ValueError):
            check("beta_singular_values", values, "two numbers (lo, hi)")
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            check("beta_singular_values", values, "two finite numbers (lo, hi) with 0 < lo <= hi")
        return lo, hi

    @property
    def L(self) -> float:
        """Guaranteed inverse-Lipschitz constant L1·L2·s_min of z ↦ f(z)."""
        # Reading a buffer on an accelerator is a host synchronisation, and the model logs L
        # every step: the value is kept on the host and read again only when a buffer was
        # replaced (``.to``) or written in place (the setter, ``load_state_dict``, ``fill_``),
        # which the buffers' version counters record.
        L1, L2 = self.L1, self.L2
        try:
            versions = (L1._version, L2._version)
        except RuntimeError:  # inference tensors have no version counter
            return float(L1) * float(L2) * self.s_min
        cached = getattr(self, "_L_host", None)
        if cached is None or cached[0] is not L1 or cached[1] is not L2 \
                or cached[2] != versions:
            cached = (L1, L2, versions, float(L1) * float(L2) * self.s_min)
            self._L_host = cached
        return cached[3]

    @L.setter
    def L(self, value: float) -> None:
        value = _check_constant("L", value)
        self._store(math.sqrt(value * self._ratio / self.s_min),
                    math.sqrt(value / (self._ratio * self.s_min)), value)

    def _store(self, L1: float, L2: float, L: float) -> None:
        # Round up in the buffers' precision so that the stored product never undercuts L.
        dtype = self.L1.dtype
        inf = torch.tensor(math.inf, dtype=dtype)
        t1, t2 = _round_up(L1, dtype), _round_up(L2, dtype)
        product = float(t1) * float(t2) * self.s_min
        if not math.isfinite(product) or (L > 0 and product == 0):
            check("L", L, f"a value of moderate size: L1={L1:g}, L2={L2:g} cannot be stored in "
                          f"{dtype}")
        while product < L:
            t2 = torch.nextafter(t2, inf)
            product = float(t1) * float(t2) * self.s_min
        with torch.no_grad():
            self.L1.fill_(float(t1))
            self.L2.fill_(float(t2))

    def _apply(self, fn: Any, recurse: bool = True) -> ILBrenierDecoder:
        # A module cast (.half(), .to(dtype), .float()) would round L1, L2 to nearest in the new
        # dtype, possibly below the guarantee: keep them in at least float32, rounded up.
        before = {name: getattr(self, name) for name in ("L1", "L2")}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            dtype = torch.promote_types(new.dtype, torch.float32) if new.is_floating_point() \
                else old.dtype
            if new.dtype != old.dtype or dtype != new.dtype:
                self._buffers[name] = _round_up(float(old), dtype).to(new.device)
        return self

    @staticmethod
    def _random_isometry(rows: int, cols: int, seed: int) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        gaussian = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
        return ILBrenierDecoder._orthonormal(gaussian).to(torch.float32)

    def beta_matrix(self) -> Tensor:
        """β as a (data_dim, latent_dim) matrix."""
        dtype = self.psi2.bias.dtype
        lift = self._lift(dtype)
        if lift is None:
            return torch.eye(self.data_dim, self.latent_dim, dtype=dtype,
                             device=self.psi2.bias.device)
        return lift

    def _lift(self, dtype: torch.dtype) -> Tensor | None:
        """β for the forward pass (``None``: the zero-padding, which needs no matrix)."""
        if self.beta == "padding":
            return None
        if self.beta == "random":
            return self.beta_isometry.to(dtype)
        return self._trainable_beta(dtype)

    def _trainable_beta(self, dtype: torch.dtype) -> Tensor:
        lo, hi = self.beta_singular_values
        qu = self._orthonormal(self.beta_u.to(dtype))
        qv = self._orthonormal(self.beta_v.to(dtype))
        s = lo + (hi - lo) * torch.sigmoid(self.beta_s.to(dtype))
        return (qu * s) @ qv.t()

    @staticmethod
    def _orthonormal(x: Tensor) -> Tensor:
        q, r = torch.linalg.qr(x)
        sign = torch.where(torch.diagonal(r) >= 0, 1.0, -1.0).to(q.dtype)
        return q * sign

    def forward(self, z: Tensor) -> Tensor:
        """f(z) = ∇ψ₂(βv) + L₂βv with v = ∇ψ₁(z) + L₁z; shape (B, data_dim)."""
        dtype = torch.promote_types(self.psi1.bias.dtype, torch.float32)
        with no_autocast(z.device.type):
            z = z.to(dtype)
            v = self.psi1.gradient(z, self.L1.to(dtype))
            return self.psi2.lifted_gradient(v, self._lift(dtype), self.L2.to(dtype))
