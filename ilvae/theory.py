"""Closed-form collapse predictions for linear latent-variable models (METHODS §4 and §6).

Every function takes second-moment (or covariance) matrices, or the data themselves (rows =
examples: an (N, D) tensor that is not a symmetric square matrix, or (N, *shape)), and returns a
small dataclass with one entry per latent dimension: which dimensions collapse, the decoder
singular values ω_i, the θ_i each dimension is paired with, and the threshold θ is compared with.

Notation (Dang et al., "Beyond vanilla VAEs: detecting posterior collapse in conditional and
hierarchical VAEs", ICLR 2024, arXiv 2306.05023): q(z|x) = N(Wx, Σ) with Σ input-independent,
p(x|z) = N(Uz, η_dec² I), p(z) = N(0, η_enc² I), KL weight β, no biases, so the data enter only
through the uncentred second moment A = E[x xᵀ] and θ_i = √(eigenvalues of A), largest first.
Multiplying the negative β-ELBO by 2η_dec², its expectation over the data is

    F(U, W, Σ) = ‖(I − UW)A^½‖²_F + tr(UΣUᵀ)
                 + β η_dec² [‖WA^½‖²_F/η_enc² + tr Σ/η_enc² − log det Σ].

At a global minimum U, W and A share singular vectors, so F splits into one scalar problem per
latent dimension (u = ω_i, the decoder singular value; λ_i = singular value of WA^½):

    F_i = θ²(1 − u w)² + u² s² + β η_dec² [w² θ²/η_enc² + s²/η_enc² − log s²].

The solutions below are the minimisers of these scalar problems; ``tests/test_theory.py``
checks them against a direct numerical minimisation of F over full matrices. A dimension whose
ω_i is exactly 0 at the boundary of a condition is counted as collapsed (ω = 0 either way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ilvae.errors import check, check_number

__all__ = [
    "LinearHVAEPrediction", "LinearPrediction", "collapse_agreement", "covariance",
    "joint_second_moments", "linear_adaptive_sigma", "linear_cvae", "linear_fixed_sigma",
    "linear_hvae", "linear_vae", "second_moment", "singular_value_error",
]

# θ within this relative distance of its threshold counts as on it (ω = 0 there): keeps the
# flags consistent with the singular values when rounding puts θ a hair above the threshold.
_RTOL = 1e-9


@dataclass(frozen=True)
class LinearPrediction:
    """Closed-form prediction for a one-level linear model, one entry per latent dimension.

    Attributes:
        collapsed: bool (m,): q(z_i|x) = p(z_i) at the optimum (strict collapse).
        inactive: bool (m,): the dimension carries no information about x (its encoder row
            and decoder column are 0). Equal to ``collapsed`` unless the encoder variance is
            fixed at a value other than the prior's.
        singular_values: (m,) decoder singular values ω_i (0 for inactive dimensions).
        encoder_singular_values: (m,) singular values λ_i of W A^½ (the encoder mean's scale).
        encoder_variance: (m,) posterior variances s_i² at the optimum.
        kl: (m,) E_x KL(q(z_i|x) ‖ p(z_i)) at the optimum, in nats.
        theta: (m,) the data quantity paired with each dimension (see each function).
        threshold: (m,) dimension i is inactive iff ``theta[i] <= threshold[i]``.
        exchangeable: True when the latent dimensions are interchangeable (the entries are
            then listed in order of decreasing θ and a trained model may hold them in any
            order); False when entry i belongs to latent dimension i.
        sigma2: the decoder noise variance the prediction used (§4 functions), else None.
    """

    collapsed: Tensor
    inactive: Tensor
    singular_values: Tensor
    encoder_singular_values: Tensor
    encoder_variance: Tensor
    kl: Tensor
    theta: Tensor
    threshold: Tensor
    exchangeable: bool = True
    sigma2: float | None = None

    @property
    def num_collapsed(self) -> int:
        return int(self.collapsed.sum())


@dataclass(frozen=True)
class LinearHVAEPrediction:
    """Closed-form prediction for the two-level Markov linear HVAE (:func:`linear_hvae`).

    Attributes:
        collapsed: bool (d₂,): z₂ dimension j collapses, q(z₂ⱼ|z₁) = p(z₂ⱼ).
        singular_values: (d₂,) singular values ω of the z₂ → z₁ decoder V (p(z₁|z₂) = N(Vz₂, ·)).
        kl: (d₂,) E KL(q(z₂ⱼ|z₁) ‖ p(z₂ⱼ)) at the optimum.
        theta: (d₂,) θ paired with each z₂ dimension (0 for dimensions without a z₁ partner).
        threshold: (d₂,) z₂ dimension j collapses iff ``theta[j] <= threshold[j]`` (−inf: never).
        encoder_variance: (d₂,) variances of q(z₂|z₁).
        z1_inactive: bool (d₁,): z₁ dimension i carries no information about x (λ_i = 0).
        encoder_singular_values: (d₁,) singular values λ of W₁ A^½.
        z1_decoder_singular_values: (d₁,) singular values of the z₁ → x decoder U.
        z1_theta: (d₁,) θ paired with each z₁ dimension.
        exchangeable: always True (entries in order of decreasing θ).
    """

    collapsed: Tensor
    singular_values: Tensor
    kl: Tensor
    theta: Tensor
    threshold: Tensor
    encoder_variance: Tensor
    z1_inactive: Tensor
    encoder_singular_values: Tensor
    z1_decoder_singular_values: Tensor
    z1_theta: Tensor
    exchangeable: bool = True

    @property
    def num_collapsed(self) -> int:
        return int(self.collapsed.sum())


# ------------------------------------------------------------------------------- data → matrices
def _flat(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"data must be a tensor of shape (N, ...) with N >= 1, got {shape}")
    return x.detach().flatten(1).double()


def second_moment(x: Tensor) -> Tensor:
    """Uncentred second moment A = (1/N) Σ_n x_n x_nᵀ of data x (N, *shape), float64 (D, D)."""
    x = _flat(x)
    return x.T @ x / x.shape[0]


def covariance(x: Tensor) -> Tensor:
    """Maximum-likelihood covariance (1/N) Σ_n (x_n − x̄)(x_n − x̄)ᵀ of data x, float64 (D, D)."""
    x = _flat(x)
    x = x - x.mean(0)
    return x.T @ x / x.shape[0]


def joint_second_moments(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(E[xxᵀ], E[xyᵀ], E[yyᵀ]) of paired data, the arguments of :func:`linear_cvae`."""
    x, y = _flat(x), _flat(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {x.shape[0]} "
                         f"and {y.shape[0]}")
    n = x.shape[0]
    return x.T @ x / n, x.T @ y / n, y.T @ y / n


def _is_moment(t: Tensor) -> bool:
    return (t.dim() == 2 and t.shape[0] == t.shape[1]
            and bool(torch.allclose(t, t.T, rtol=1e-5, atol=1e-8)))


def _moment(t: Tensor, field: str, centred: bool = False) -> Tensor:
    """A symmetric square matrix as given; anything else is read as data (rows = examples)."""
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t)
    if _is_moment(t):
        t = t.detach().double()
    else:
        t = covariance(t) if centred else second_moment(t)
    if not torch.isfinite(t).all():
        raise ValueError(f"{field} contains NaN or infinite values")
    return t


def _eigenvalues(matrix: Tensor, count: int) -> Tensor:
    """The ``count`` largest eigenvalues of a symmetric PSD matrix, clipped at 0, padded with 0."""
    ev = torch.linalg.eigvalsh(matrix).flip(0).clamp(min=0)
    if count <= ev.numel():
        return ev[:count]
    return torch.cat([ev, ev.new_zeros(count - ev.numel())])


def _check(field: str, value: float, strict: bool = True) -> float:
    return check_number(field, value, strict=strict)


def _latent_dim(latent_dim: int | None, default: int) -> int:
    if latent_dim is None:
        return default
    if isinstance(latent_dim, bool) or int(latent_dim) != latent_dim or latent_dim < 1:
        check("latent_dim", latent_dim, "an integer >= 1")
    return int(latent_dim)


# ------------------------------------------------------------------------------------ linear VAE
def linear_vae(second_moment: Tensor, beta: float = 1.0, eta_enc: float = 1.0,
               eta_dec: float = 1.0, learnable_variance: bool = True,
               encoder_std: float | list[float] | Tensor | None = None,
               latent_dim: int | None = None) -> LinearPrediction:
    """Linear β-VAE without biases (Dang et al. 2024, §6 of METHODS).

    θ_i = √(i-th largest eigenvalue of A = E[x xᵀ]) (uncentred), i < m; θ_i = 0 beyond rank(A).

    **Learnable encoder variance** (diagonal, input-independent). Solving ∂F_i = 0:
    s² = βη_dec²/(u² + βη_dec²/η_enc²), w = u/(u² + βη_dec²/η_enc²), and then
    u = 0 or u² = (θ² − βη_dec²)/η_enc²:

        collapsed_i  ⇔ θ_i ≤ √β η_dec          (η_enc does not move the threshold)
        ω_i          = (1/η_enc) √max(0, θ_i² − β η_dec²)
        λ_i          = (η_enc/θ_i) √max(0, θ_i² − β η_dec²)
        s_i²         = β η_dec² η_enc²/θ_i²  (active),  η_enc²  (collapsed: posterior = prior)
        KL_i         = max(0, log(θ_i / (√β η_dec))).

    **Fixed encoder variance** s_i² = σ_i² (``encoder_std`` = σ, one per latent dimension or one
    for all) [derived here]. With k = √β η_dec/η_enc, minimising F_i over w leaves
    θ² k²/(u² + k²) + σ² u², convex in u², with minimiser

        u² = k (θ/σ − k)  if θ > k σ,  else 0,

    so mode i is inactive iff θ ≤ √β (η_dec/η_enc) σ_i, ω_i = √(k·max(0, θ/σ_i − k)) and
    λ_i = ω_i σ_i / k. An inactive mode has posterior N(0, σ_i²): collapsed in the strict sense
    only when σ_i = η_enc, otherwise KL_i = ½(σ_i²/η_enc² − log(σ_i²/η_enc²) − 1) > 0. The
    value of the optimum for a pair is F = 2kθσ − k²σ² (active), θ² (inactive), a saving of
    (θ − kσ)₊², whose cross-derivative in (θ, σ) is negative: the largest θ goes with the
    smallest σ. Latent dimension i is therefore paired with the θ of the rank of σ_i among
    the σ's (smallest σ ↔ largest θ), and entry i of the result belongs to latent dimension i.

    Args:
        second_moment: A (D, D), or data (N, *shape) from which A is computed.
        beta, eta_enc, eta_dec: β > 0, prior std η_enc > 0, decoder noise std η_dec > 0.
        learnable_variance: see above.
        encoder_std: σ, needed when ``learnable_variance`` is False.
        latent_dim: m (default D).
    """
    a = _moment(second_moment, "second_moment")
    beta, eta_enc, eta_dec = (_check(n, v) for n, v in
                              (("beta", beta), ("eta_enc", eta_enc), ("eta_dec", eta_dec)))
    m = _latent_dim(latent_dim, a.shape[0])
    theta = _eigenvalues(a, m).sqrt()
    if learnable_variance:
        threshold = torch.full_like(theta, math.sqrt(beta) * eta_dec)
        gap = (theta**2 - beta * eta_dec**2).clamp(min=0)
        collapsed = theta <= threshold * (1 + _RTOL)
        safe = theta.clamp(min=1e-300)
        omega = torch.where(collapsed, torch.zeros_like(theta), gap.sqrt() / eta_enc)
        lam = torch.where(collapsed, torch.zeros_like(theta), eta_enc * gap.sqrt() / safe)
        variance = torch.where(collapsed, torch.full_like(theta, eta_enc**2),
                               beta * eta_dec**2 * eta_enc**2 / safe**2)
        kl = torch.log(safe / threshold).clamp(min=0)
        return LinearPrediction(collapsed, collapsed.clone(), omega, lam, variance, kl, theta,
                                threshold, exchangeable=True)

    if encoder_std is None:
        check("encoder_std", encoder_std, f"one positive number or {m} of them when "
              "learnable_variance=False")
    sigma = torch.as_tensor(encoder_std, dtype=torch.float64).flatten()
    if sigma.numel() == 1:
        sigma = sigma.expand(m).clone()
    if sigma.numel() != m or not (torch.isfinite(sigma).all() and (sigma > 0).all()):
        check("encoder_std", encoder_std, f"one positive number or {m} of them")
    k = math.sqrt(beta) * eta_dec / eta_enc
    rank = torch.empty(m, dtype=torch.long)
    rank[torch.argsort(sigma, stable=True)] = torch.arange(m)
    theta = theta[rank]
    threshold = k * sigma
    inactive = theta <= threshold * (1 + _RTOL)
    omega = torch.where(inactive, torch.zeros_like(theta),
                        (k * (theta / sigma - k)).clamp(min=0).sqrt())
    lam = omega * sigma / k
    ratio = sigma**2 / eta_enc**2
    kl = 0.5 * (lam**2 / eta_enc**2 + ratio - torch.log(ratio) - 1)
    collapsed = inactive & torch.isclose(sigma, torch.full_like(sigma, eta_enc), rtol=1e-6)
    exchangeable = bool((sigma == sigma[0]).all())
    if exchangeable:
        order = torch.argsort(theta, descending=True, stable=True)
        fields = (collapsed, inactive, omega, lam, sigma**2, kl, theta, threshold)
        collapsed, inactive, omega, lam, var, kl, theta, threshold = (f[order] for f in fields)
    else:
        var = sigma**2
    return LinearPrediction(collapsed, inactive, omega, lam, var, kl, theta, threshold,
                            exchangeable=exchangeable)


# ----------------------------------------------------------------------------------- linear CVAE
def linear_cvae(second_moment_xx: Tensor, second_moment_xy: Tensor, second_moment_yy: Tensor,
                beta: float = 1.0, eta_enc: float = 1.0, eta_dec: float = 1.0,
                latent_dim: int | None = None) -> LinearPrediction:
    """Linear conditional VAE (Dang et al. 2024): q(z|x, y) = N(W₁x + W₂y, Σ) (Σ learnable,
    input-independent), p(y|x, z) = N(U₁z + U₂x, η_dec² I), p(z) = N(0, η_enc² I).

    With B = E[yxᵀ]E[xxᵀ]⁻¹ and r = y − Bx (the part of y that x cannot predict linearly;
    E[r xᵀ] = 0), the optimum takes U₂ = B − U₁(W₂B + W₁) and W₁ = −W₂B, and the problem is the
    linear VAE of :func:`linear_vae` on r, whose second moment is

        E = E[yyᵀ] − E[yxᵀ] E[xxᵀ]⁻¹ E[xyᵀ],    θ_i = i-th largest eigenvalue of E.

    Hence latent i collapses iff θ_i ≤ β η_dec², ω_i = (1/η_enc)√max(0, θ_i − β η_dec²) are the
    singular values of U₁, s_i² = β η_dec² η_enc²/θ_i (active) or η_enc², and
    KL_i = max(0, ½ log(θ_i/(β η_dec²))). ``theta`` holds the eigenvalues of E (not their
    square roots) and ``threshold`` = β η_dec². A singular E[xxᵀ] is handled with the
    pseudo-inverse. Use :func:`joint_second_moments` to get the three matrices from data.
    """
    sxx = _moment(second_moment_xx, "second_moment_xx")
    syy = _moment(second_moment_yy, "second_moment_yy")
    sxy = torch.as_tensor(second_moment_xy).detach().double()
    if sxy.shape != (sxx.shape[0], syy.shape[0]):
        raise ValueError(f"second_moment_xy must have shape {(sxx.shape[0], syy.shape[0])}, "
                         f"got {tuple(sxy.shape)}")
    beta, eta_enc, eta_dec = (_check(n, v) for n, v in
                              (("beta", beta), ("eta_enc", eta_enc), ("eta_dec", eta_dec)))
    residual = syy - sxy.T @ torch.linalg.pinv(sxx, hermitian=True) @ sxy
    residual = 0.5 * (residual + residual.T)
    m = _latent_dim(latent_dim, syy.shape[0])
    theta = _eigenvalues(residual, m)
    tau = beta * eta_dec**2
    threshold = torch.full_like(theta, tau)
    collapsed = theta <= threshold * (1 + _RTOL)
    safe = theta.clamp(min=1e-300)
    gap = torch.where(collapsed, torch.zeros_like(theta), (theta - tau).clamp(min=0))
    omega = gap.sqrt() / eta_enc
    lam = torch.where(collapsed, torch.zeros_like(theta), eta_enc * (gap / safe).sqrt())
    variance = torch.where(collapsed, torch.full_like(theta, eta_enc**2),
                           tau * eta_enc**2 / safe)
    kl = (0.5 * torch.log(safe / tau)).clamp(min=0)
    return LinearPrediction(collapsed, collapsed.clone(), omega, lam, variance, kl, theta,
                            threshold, exchangeable=True)


# ----------------------------------------------------------------------------------- linear HVAE
def linear_hvae(second_moment: Tensor, beta_1: float = 1.0, beta_2: float = 1.0,
                eta_enc: float = 1.0, eta_dec: float = 1.0, sigma_1: float = 1.0,
                latent_dim: int | None = None,
                latent_dim_2: int | None = None) -> LinearHVAEPrediction:
    """Two-level Markov linear HVAE x → z₁ → z₂ (Dang et al. 2024, §6 of METHODS):

        q(z₁|x) = N(W₁x, σ₁² I) (σ₁ fixed),  q(z₂|z₁) = N(W₂z₁, Σ₂) (Σ₂ diagonal, learnable),
        p(z₂) = N(0, η_enc² I),  p(z₁|z₂) = N(Vz₂, η_dec² I),  p(x|z₁) = N(Uz₁, η_dec² I),
        loss = −E log p(x|z₁) + β₁ E[log q(z₁|x) − log p(z₁|z₂)] + β₂ E KL(q(z₂|z₁) ‖ p(z₂)).

    Derivation [derived here; it reproduces the conditions of the paper]. Per mode, with
    a = v² + σ₁² the second moment of z₁ along the mode (v = λ, the singular value of W₁A^½),
    minimising over the z₂ parameters leaves Φ(a) = β₁ a while a ≤ a₀ = (β₂/β₁) η_dec²
    (z₂ unused: V's column is 0) and β₂ η_dec² log a + const above (z₂ used, with
    ω² = (a − a₀)/η_enc²). Minimising over the decoder u leaves θ²σ₁²/a + Φ(a) over a ≥ σ₁²,
    whose minimiser a* is

        σ₁² ≥ a₀:                              a* = max(σ₁², θ²σ₁²/(β₂ η_dec²))
        σ₁² < a₀ and θ ≤ β₂ η_dec²/(√β₁ σ₁):   a* = max(σ₁², θ σ₁/√β₁)          (z₂ collapses)
        σ₁² < a₀ and θ > β₂ η_dec²/(√β₁ σ₁):   a* = θ²σ₁²/(β₂ η_dec²)

    so z₂ mode i collapses iff σ₁² ≤ (β₂/β₁) η_dec² and σ₁²θ_i²/(β₂ η_dec²) ≤ (β₂/β₁) η_dec²
    (no z₂ mode collapses when σ₁² > (β₂/β₁) η_dec²; ties below), and

        ω_i = √max(0, a*_i − a₀)/η_enc,   λ_i = √(a*_i − σ₁²),   U's singular value θ_i λ_i/a*_i,
        Σ₂ = β₂ η_dec²/(β₁ ω² + c₂),  W₂'s singular value β₁ ω/(β₁ ω² + c₂),  c₂ = β₂ η_dec²/η_enc².

    Pairing: z₁ dimension i takes θ_i (largest first, 0 beyond rank(A)); the d₂ z₂ dimensions
    attach to the d₁ z₁ dimensions of largest θ (the gain from a z₂ partner does not decrease
    with θ); unpaired z₁ dimensions follow the collapsed branch; unpaired z₂ dimensions collapse.
    ``latent_dim`` = d₁ (default D), ``latent_dim_2`` = d₂ (default d₁). A learnable σ₁ is
    outside these formulas.

    Ties fall on the collapsed side. METHODS §6 states the conditions with strict inequalities
    (collapse when σ₁² < a₀ and σ₁²θ²/(β₂ η_dec²) < a₀); at equality the optimum is a* = a₀, so
    ω = 0 and q(z₂|z₁) = p(z₂): the mode is counted as collapsed. So mode i collapses at
    σ₁²θ_i²/(β₂ η_dec²) = a₀ (θ_i = β₂ η_dec²/(√β₁ σ₁)), and at σ₁² = a₀ the modes with
    θ_i ≤ √β₂ η_dec collapse; no mode collapses only when σ₁² > a₀ strictly. A θ within a
    relative 1e-9 of its threshold counts as on it, so rounding in the eigenvalues cannot move a
    tie to the other side.
    """
    a_mat = _moment(second_moment, "second_moment")
    beta_1, beta_2, eta_enc, eta_dec, sigma_1 = (
        _check(n, v) for n, v in (("beta_1", beta_1), ("beta_2", beta_2), ("eta_enc", eta_enc),
                                  ("eta_dec", eta_dec), ("sigma_1", sigma_1)))
    d1 = _latent_dim(latent_dim, a_mat.shape[0])
    d2 = _latent_dim(latent_dim_2, d1)
    theta1 = _eigenvalues(a_mat, d1).sqrt()
    s1 = sigma_1**2
    a0 = beta_2 / beta_1 * eta_dec**2
    paired = torch.arange(d1) < d2
    if s1 >= a0:
        tau = -math.inf if s1 > a0 else math.sqrt(beta_2) * eta_dec
        a_used = torch.clamp(theta1**2 * s1 / (beta_2 * eta_dec**2), min=s1)
    else:
        tau = beta_2 * eta_dec**2 / (math.sqrt(beta_1) * sigma_1)
        a_used = torch.where(theta1 > tau * (1 + _RTOL),
                             theta1**2 * s1 / (beta_2 * eta_dec**2),
                             torch.clamp(theta1 * sigma_1 / math.sqrt(beta_1), min=s1))
    a_unused = torch.clamp(theta1 * sigma_1 / math.sqrt(beta_1), min=s1)
    a_star = torch.where(paired, a_used, a_unused)
    lam = (a_star - s1).clamp(min=0).sqrt()
    u1 = theta1 * lam / a_star
    z1_inactive = lam <= 0

    n_pair = min(d1, d2)
    theta2 = torch.zeros(d2, dtype=torch.float64)
    theta2[:n_pair] = theta1[:n_pair]
    a2 = torch.full((d2,), s1, dtype=torch.float64)
    a2[:n_pair] = a_star[:n_pair]
    has_partner = torch.arange(d2) < n_pair
    used = has_partner & (a2 > a0 * (1 + _RTOL))
    omega = torch.where(used, (a2 - a0).clamp(min=0).sqrt() / eta_enc, torch.zeros_like(a2))
    collapsed = ~used
    threshold = torch.where(has_partner, torch.full_like(theta2, tau),
                            torch.full_like(theta2, math.inf))
    c2 = beta_2 * eta_dec**2 / eta_enc**2
    denom = beta_1 * omega**2 + c2
    variance = beta_2 * eta_dec**2 / denom
    w2 = beta_1 * omega / denom
    ratio = variance / eta_enc**2
    kl = 0.5 * (w2**2 * a2 / eta_enc**2 + ratio - torch.log(ratio) - 1)
    return LinearHVAEPrediction(collapsed, omega, kl, theta2, threshold, variance, z1_inactive,
                                lam, u1, theta1)


# ------------------------------------------------------------------- fixed / adaptive σ² (§4)
def linear_fixed_sigma(covariance: Tensor, sigma2: float,
                       latent_dim: int | None = None) -> LinearPrediction:
    """Linear VAE with an affine decoder N(Uz + b, σ² I), prior N(0, I) and a learnable
    diagonal encoder variance (Lucas et al. 2019; Dai et al. 2020; the fixed-σ picture of
    Takida et al. 2022, §4 of METHODS): the ELBO optimum is probabilistic PCA's,

        U = P_m (Λ_m − σ² I)₊^½ R,  direction j collapses iff λ_j ≤ σ²,  ω_j = √max(0, λ_j − σ²),

    λ_j the eigenvalues of the data covariance (the bias absorbs the mean). This is
    :func:`linear_vae` with β = 1, η_enc = 1, η_dec² = σ², applied to the covariance;
    ``theta`` holds √λ_j and ``threshold`` σ. ``covariance`` may be data (N, *shape).
    """
    sigma2 = _check("sigma2", sigma2)
    cov = _moment(covariance, "covariance", centred=True)
    pred = linear_vae(cov, 1.0, 1.0, math.sqrt(sigma2), latent_dim=latent_dim)
    return LinearPrediction(**{**pred.__dict__, "sigma2": sigma2})


def linear_adaptive_sigma(covariance: Tensor, latent_dim: int) -> LinearPrediction:
    """The fixed-σ picture with σ² learned by maximum likelihood, or set to the batch MSE as in
    AR-ELBO (Takida et al. 2022): at a stationary point ∂ELBO/∂σ² = 0 gives
    σ² = E_q‖x − Uz − b‖²/D, which is AR-ELBO's σ̂², and the joint ELBO optimum over (U, σ²)
    is the probabilistic-PCA maximum-likelihood solution (Tipping & Bishop 1999):

        σ²_ML = (1/(D − m)) Σ_{j>m} λ_j      (the mean of the discarded eigenvalues),

    after which :func:`linear_fixed_sigma` applies. Since λ_j ≥ λ_{m+1} ≥ σ²_ML for j ≤ m,
    no direction with λ_j > λ_{m+1} collapses: only ties with the discarded spectrum (for
    example directions of zero variance when m exceeds the rank) give collapsed dimensions.
    With m ≥ D there is nothing to discard and the likelihood is unbounded (σ² → 0): the
    prediction then uses σ² = 0, so only zero-variance directions collapse. The result's
    ``sigma2`` holds σ²_ML.
    """
    cov = _moment(covariance, "covariance", centred=True)
    d = cov.shape[0]
    m = _latent_dim(latent_dim, d)
    ev = _eigenvalues(cov, d)
    sigma2 = float(ev[m:].mean()) if m < d else 0.0
    theta = _eigenvalues(cov, m).sqrt()
    if sigma2 <= 0:
        collapsed = theta <= 0
        zeros = torch.zeros_like(theta)
        kl = torch.where(collapsed, zeros, torch.full_like(theta, math.inf))
        return LinearPrediction(collapsed, collapsed.clone(), theta.clone(),
                                torch.where(collapsed, zeros, torch.ones_like(theta)),
                                torch.where(collapsed, torch.ones_like(theta), zeros), kl,
                                theta, zeros, exchangeable=True, sigma2=0.0)
    return linear_fixed_sigma(cov, sigma2, latent_dim=m)


# --------------------------------------------------------------------- comparing with a model
def collapse_agreement(predicted: Tensor, measured: Tensor, exchangeable: bool = True) -> float:
    """Fraction of latent dimensions whose measured collapse flag matches the prediction.

    With ``exchangeable`` latents (any order is an optimum) both flag vectors are sorted
    before comparing, so the agreement is 1 − |#predicted − #measured|/m; otherwise entry i
    of both refers to latent dimension i.
    """
    predicted, measured = predicted.bool().flatten().cpu(), measured.bool().flatten().cpu()
    if predicted.shape != measured.shape:
        raise ValueError(f"predicted and measured flags differ in shape: "
                         f"{tuple(predicted.shape)} vs {tuple(measured.shape)}")
    if exchangeable:
        predicted = predicted.long().sort().values
        measured = measured.long().sort().values
    return float((predicted == measured).double().mean())


def singular_value_error(measured: Tensor, predicted: Tensor) -> float:
    """max_i |ω̂_i − ω_i| / max_j ω_j, both sorted in decreasing order: the largest deviation
    relative to the largest predicted singular value (absolute when all ω_j are 0). Relative
    to the scale of the spectrum rather than to each ω_i, so that predicted zeros and values
    near a threshold (where convergence is slowest) do not make the number meaningless.
    """
    measured = measured.detach().double().flatten().cpu().sort(descending=True).values
    predicted = predicted.detach().double().flatten().cpu().sort(descending=True).values
    n = max(measured.numel(), predicted.numel())
    measured = torch.cat([measured, measured.new_zeros(n - measured.numel())])
    predicted = torch.cat([predicted, predicted.new_zeros(n - predicted.numel())])
    scale = float(predicted.max()) if n and float(predicted.max()) > 0 else 1.0
    return float((measured - predicted).abs().max()) / scale if n else 0.0
