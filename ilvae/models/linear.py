"""Linear VAE and two-level linear HVAE: the models whose collapse has closed forms
(:mod:`ilvae.theory`; Dang et al., ICLR 2024, arXiv 2306.05023; Lucas et al. 2019).

No biases anywhere, posterior variances input-independent, Gaussian decoders with a fixed noise
std η_dec and the prior N(0, η_enc² I), so that a trained model can be compared with the
predictions of :func:`ilvae.theory.linear_vae` and :func:`ilvae.theory.linear_hvae`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.distributions import Normal

from ilvae import theory
from ilvae.decoders.base import Decoder
from ilvae.encoders import Encoder
from ilvae.errors import check, check_number
from ilvae.metrics.iw_nll import importance_weighted_nll
from ilvae.models.base import LatentVariableModel
from ilvae.models.contract import LatentTerm, two_level_terms
from ilvae.objectives import beta_vae_loss
from ilvae.priors import StandardNormal


class LinearEncoder(Encoder):
    """q(z|x) = N(W x, diag s²): no bias, s the same for every input.

    ``learnable_variance`` makes log s a trained parameter (initialised at ``std``); otherwise
    s = ``std`` is fixed (one value, or one per latent dimension).
    """

    def __init__(self, data_shape: tuple[int, ...], latent_dim: int,
                 learnable_variance: bool = True, std: float | list[float] = 1.0) -> None:
        super().__init__(data_shape, latent_dim)
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if std_t.numel() == 1:
            std_t = std_t.expand(latent_dim).clone()
        if std_t.numel() != latent_dim or not bool((std_t > 0).all() & std_t.isfinite().all()):
            check("std", std, f"one positive number or {latent_dim} of them")
        self.learnable_variance = bool(learnable_variance)
        weight = torch.randn(latent_dim, self.data_dim) / math.sqrt(self.data_dim)
        self.weight = nn.Parameter(weight)
        if self.learnable_variance:
            self.log_scale = nn.Parameter(std_t.log())
        else:
            self.register_buffer("log_scale", std_t.log())

    @property
    def scale(self) -> Tensor:
        """Posterior std s, shape (latent_dim,)."""
        return self.log_scale.exp()

    def forward(self, x: Tensor) -> Normal:
        loc = x.flatten(1) @ self.weight.T
        return Normal(loc, self.scale.expand_as(loc))


class LinearDecoder(Decoder):
    """θ = U z (no bias) with the likelihood N(x; θ, σ² I), σ = ``sigma`` (η_dec)."""

    def __init__(self, latent_dim: int, data_dim: int, sigma: float = 1.0) -> None:
        super().__init__(latent_dim, data_dim, likelihood="gaussian", sigma=sigma)
        self.weight = nn.Parameter(torch.randn(data_dim, latent_dim) / math.sqrt(latent_dim))

    def forward(self, z: Tensor) -> Tensor:
        return z @ self.weight.T

    def expected_log_prob(self, x: Tensor, posterior: Normal) -> Tensor:
        """E_{z~N(μ, diag s²)} log p(x|z) in closed form, shape (B,):

            log p(x | Uμ) − Σ_i s_i² ‖U_{:,i}‖² / (2σ²),

        since E‖x − Uz‖² = ‖x − Uμ‖² + tr(U diag(s²) Uᵀ).
        """
        column_sq = (self.weight**2).sum(0)
        trace = (posterior.scale**2 * column_sq).sum(-1)
        return self.likelihood.log_prob(x.flatten(1), self(posterior.loc)) - \
            0.5 * trace / self.likelihood.variance

    def singular_values(self) -> Tensor:
        """Singular values of U, decreasing, padded with zeros to ``latent_dim``."""
        return _svdvals(self.weight, self.latent_dim)


def _svdvals(weight: Tensor, count: int) -> Tensor:
    sv = torch.linalg.svdvals(weight.detach().double())
    return torch.cat([sv, sv.new_zeros(max(0, count - sv.numel()))])[:count]


def _check_flag(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        check(field, value, "true or false")
    return value


def _check_size(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value \
            or value <= 0:
        check(field, value, "a positive integer")
    return int(value)


class _LinearModel(LatentVariableModel):
    """Shared step, logging and Lightning hooks of the linear models."""

    _logged_weights: tuple[str, ...] = ()

    @property
    def schedulable(self) -> tuple[str, ...]:
        """The loss weights (``beta``, or ``beta_1`` and ``beta_2``), logged as ``train/<name>``."""
        return self._logged_weights

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def _step(self, batch: Any, stage: str) -> Any:
        x, _ = self.unpack(batch)
        loss, terms = self.loss(x)
        terms.pop("loss")
        return self.log_terms(stage, loss, terms, x.shape[0])

    def _sample_first_level(self, n: int) -> Tensor:
        return self.prior.sample(n)

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """E[x|z] for n draws from the model's prior (z ~ p(z), or z₂ ~ p(z₂), z₁ ~ p(z₁|z₂)),
        shaped like the data."""
        return self.decoder.mean(self._sample_first_level(n)).reshape(n, *self.data_shape)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """E[x|z] at the posterior mean z = E_q[z|x] (z₁ for the HVAE)."""
        return self.decoder.mean(self.encode(x).loc).reshape(x.shape[0], *self.data_shape)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Parameters of q(z|x) (q(z₁|x) for the HVAE), with the label when there is one."""
        x, y = self.unpack(batch)
        posterior = self.encode(x)
        out = {"loc": posterior.loc, "scale": posterior.scale}
        if y is not None:
            out["y"] = y
        return out


class LinearVAE(_LinearModel):
    """Linear β-VAE of Dang et al. (2024), §6 of METHODS:

        q(z|x) = N(W x, diag s²),  p(x|z) = N(U z, η_dec² I),  p(z) = N(0, η_enc² I),
        loss   = −E_batch E_q log p(x|z) + β E_batch Σ_i KL(q(z_i|x) ‖ p(z_i)),

    with log p(x|z) summed over data dimensions. The posterior std s is input-independent, one
    per latent dimension: learned (``learnable_variance=True``, as in the paper's main
    results) or fixed at ``encoder_std`` (the paper's contrast case).

    ``analytic_expectation=True`` (default) computes E_q log p(x|z) exactly,
    log p(x|Uμ) − Σ_i s_i²‖U_{:,i}‖²/(2η_dec²), instead of with one reparameterised sample: the
    same objective in expectation without its Monte-Carlo noise, so full-batch training
    converges to the optimum the closed forms describe (and a second-order optimiser such as
    L-BFGS can be used). ``False`` trains on the usual one-sample estimate.

    Args:
        data_shape: shape of one example (supplied by the datamodule in the CLI).
        latent_dim: m.
        beta: KL weight β ≥ 0.
        eta_enc: prior std η_enc > 0.
        eta_dec: decoder noise std η_dec > 0.
        learnable_variance: learn s (True) or fix it at ``encoder_std`` (False).
        encoder_std: fixed posterior std (one value or one per dimension); when learned, the
            initial value.
        analytic_expectation: closed-form E_q (see above).
        optimizer, lr_scheduler: LightningCLI callables (default Adam, lr 1e-3).
    """

    _logged_weights = ("beta",)

    def __init__(self, data_shape: tuple[int, ...] = (16,), latent_dim: int = 8,
                 beta: float = 1.0, eta_enc: float = 1.0, eta_dec: float = 1.0,
                 learnable_variance: bool = True, encoder_std: float | list[float] = 1.0,
                 analytic_expectation: bool = True, optimizer: OptimizerCallable | None = None,
                 lr_scheduler: LRSchedulerCallable | None = None) -> None:
        eta_enc = check_number("eta_enc", eta_enc, strict=True)
        eta_dec = check_number("eta_dec", eta_dec, strict=True)
        learnable_variance = _check_flag("learnable_variance", learnable_variance)
        latent_dim = _check_size("latent_dim", latent_dim)
        shape = tuple(_check_size("data_shape", s) for s in data_shape)
        try:
            encoder = LinearEncoder(shape, latent_dim, learnable_variance, encoder_std)
        except (ValueError, TypeError, RuntimeError):
            check("encoder_std", encoder_std, f"one positive number or {latent_dim} of them")
        decoder = LinearDecoder(latent_dim, math.prod(shape), sigma=eta_dec)
        super().__init__(data_shape, latent_dim, encoder, decoder,
                         StandardNormal(latent_dim, scale=eta_enc), optimizer, lr_scheduler)
        self.beta = check_number("beta", beta)
        self.eta_enc, self.eta_dec = eta_enc, eta_dec
        self.learnable_variance = learnable_variance
        self.encoder_std = encoder_std
        self.analytic_expectation = _check_flag("analytic_expectation", analytic_expectation)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])

    # ----------------------------------------------------------------- maths
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Posterior, log p(x|z) (B,) (its exact expectation over q when
        ``analytic_expectation``) and the closed-form KL per dimension (B, m)."""
        posterior = self.encode(x)
        if self.analytic_expectation:
            log_px = self.decoder.expected_log_prob(x, posterior)
        else:
            log_px = self.decoder.log_prob(x, posterior.rsample())
        return {"posterior": posterior, "log_px": log_px, "kl": self.prior.kl(posterior)}

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The β-ELBO loss of a batch and its logged terms (``recon``, ``kl``, ``elbo``)."""
        out = self(x)
        return beta_vae_loss(out["log_px"], out["kl"], self.beta)

    # ------------------------------------------------------------ diagnostics
    def iw_nll(self, x: Tensor, num_samples: int = 500,
               chunk_size: int | None = None) -> Tensor:
        """Importance-weighted NLL per example, (B,) float64 nats, K = ``num_samples``
        (:func:`~ilvae.metrics.iw_nll.importance_weighted_nll`)."""
        return importance_weighted_nll(self, x, num_samples, chunk_size)

    def decoder_singular_values(self) -> Tensor:
        """Measured ω: singular values of U, decreasing, float64 (latent_dim,)."""
        return self.decoder.singular_values()

    @torch.no_grad()
    def kl_per_dimension(self, x: Tensor) -> Tensor:
        """E_x KL(q(z_i|x) ‖ p(z_i)) over the rows of ``x``, float64 (latent_dim,)."""
        return self.prior.kl(self.encode(x)).double().mean(0)

    @torch.no_grad()
    def measured_collapse(self, x: Tensor, eps: float = 0.01) -> Tensor:
        """Collapsed dimensions of the trained model: E_x KL(q(z_i|x) ‖ p(z_i)) < ``eps`` nats.

        This is ε-collapse of METHODS §1 with the mean over ``x``: it tests q(z_i|x) ≈ p(z_i)
        itself, so with a fixed encoder variance σ_i ≠ η_enc an inactive dimension (zero encoder
        row) is *not* collapsed, as in the theory; see :meth:`measured_inactive`. At the
        learnable-variance optimum an active dimension has KL = log(θ_i/(√β η_dec)), so only
        dimensions within a factor e^eps of the threshold are miscounted.
        """
        return self.kl_per_dimension(x) < eps

    @torch.no_grad()
    def measured_inactive(self, x: Tensor, eps: float = 0.01) -> Tensor:
        """Dimensions that carry no information about x: ½ E_x[μ_i(x)²]/η_enc² < ``eps``, the
        data-dependent part of the KL (0 exactly when the encoder row is 0).

        Per-dimension flags need the latent axes to be identified: with one fixed std for all
        dimensions the loss is invariant under rotations of z, so a trained model may spread the
        inactive directions over every axis; only their number is identified then: the number
        of zero decoder singular values.
        """
        loc = self.encode(x).loc.double()
        return 0.5 * (loc**2).mean(0) / self.eta_enc**2 < eps

    def theory_prediction(self, x: Tensor) -> theory.LinearPrediction:
        """:func:`ilvae.theory.linear_vae` for this model's settings on the data ``x``."""
        return theory.linear_vae(theory.second_moment(x), self.beta, self.eta_enc, self.eta_dec,
                                 self.learnable_variance,
                                 encoder_std=None if self.learnable_variance
                                 else self.encoder_std, latent_dim=self.latent_dim)


class LinearHVAE(_LinearModel):
    """Two-level Markov linear HVAE x → z₁ → z₂ of Dang et al. (2024), §6 of METHODS:

        q(z₁|x) = N(W₁x, σ₁² I),       q(z₂|z₁) = N(W₂z₁, diag s₂²),
        p(z₂)   = N(0, η_enc² I),      p(z₁|z₂) = N(V z₂, η_dec² I),   p(x|z₁) = N(U z₁, η_dec² I),

        loss = −E log p(x|z₁) + β₁ E[log q(z₁|x) − log p(z₁|z₂)] + β₂ E KL(q(z₂|z₁) ‖ p(z₂)),

    expectations over x (batch mean) and q(z₁, z₂|x). This is the objective the paper's
    theorems minimise (the same η_dec for both conditional Gaussians, β₁ on the z₁ term and
    β₂ on the z₂ term); β₁ = β₂ = 1 is the ELBO. σ₁ is fixed at ``sigma_1`` by default, the
    setting of the paper's z₂-collapse conditions; ``learnable_sigma_1=True`` learns one σ₁ per
    z₁ dimension (outside the closed forms; the objective is then unbounded below when
    β₁ > β₂: growing σ₁ gains β₁ log σ₁ from the entropy and costs only β₂ log σ₁ at z₂).
    s₂ is always learned.

    ``analytic_expectation=True`` computes every expectation over q in closed form:
    E‖x − Uz₁‖² = ‖x − Uμ₁‖² + tr(U S₁ Uᵀ) (S₁ = diag σ₁²), and with R = I − VW₂,
    E‖z₁ − Vz₂‖² = ‖Rμ₁‖² + tr(R S₁ Rᵀ) + tr(V S₂ Vᵀ), E‖W₂z₁‖² = ‖W₂μ₁‖² + tr(W₂ S₁ W₂ᵀ).
    Otherwise z₁ and z₂ are sampled once (KL(q(z₂|z₁) ‖ p(z₂)) stays closed-form given z₁).

    ``encode(x)`` returns q(z₁|x); ``encode_z2(z1)`` returns q(z₂|z₁). ``decoder`` is
    p(x|z₁), ``decoder_z1`` is p(z₁|z₂), ``encoder_z2`` is q(z₂|z₁) and ``prior`` is p(z₂).

    Logged: ``{stage}/loss``, ``recon``, ``kl_z1`` (E[log q(z₁|x) − log p(z₁|z₂)]),
    ``kl_z2``, ``kl`` (their sum), ``elbo``; ``train/beta_1``, ``train/beta_2``.

    Args:
        data_shape: shape of one example (supplied by the datamodule in the CLI).
        latent_dim: d₁, the size of z₁.
        latent_dim_2: d₂, the size of z₂ (default d₁).
        beta_1, beta_2: weights β₁, β₂ ≥ 0.
        eta_enc, eta_dec: prior std η_enc and conditional noise std η_dec (> 0).
        sigma_1: the std σ₁ of q(z₁|x) (fixed, or the initial value when learned).
        learnable_sigma_1: learn σ₁ (one per z₁ dimension).
        analytic_expectation: closed-form expectations (see above).
        optimizer, lr_scheduler: LightningCLI callables (default Adam, lr 1e-3).
    """

    latent_levels = ("z1", "z2")
    _logged_weights = ("beta_1", "beta_2")

    def __init__(self, data_shape: tuple[int, ...] = (16,), latent_dim: int = 8,
                 latent_dim_2: int | None = None, beta_1: float = 1.0, beta_2: float = 1.0,
                 eta_enc: float = 1.0, eta_dec: float = 1.0, sigma_1: float = 1.0,
                 learnable_sigma_1: bool = False, analytic_expectation: bool = True,
                 optimizer: OptimizerCallable | None = None,
                 lr_scheduler: LRSchedulerCallable | None = None) -> None:
        eta_enc = check_number("eta_enc", eta_enc, strict=True)
        eta_dec = check_number("eta_dec", eta_dec, strict=True)
        sigma_1 = check_number("sigma_1", sigma_1, strict=True)
        learnable_sigma_1 = _check_flag("learnable_sigma_1", learnable_sigma_1)
        latent_dim = _check_size("latent_dim", latent_dim)
        d2 = latent_dim if latent_dim_2 is None else _check_size("latent_dim_2", latent_dim_2)
        shape = tuple(_check_size("data_shape", s) for s in data_shape)
        encoder = LinearEncoder(shape, latent_dim, learnable_sigma_1, sigma_1)
        decoder = LinearDecoder(latent_dim, math.prod(shape), sigma=eta_dec)
        super().__init__(data_shape, latent_dim, encoder, decoder,
                         StandardNormal(int(d2), scale=eta_enc), optimizer, lr_scheduler)
        self.latent_dim_2 = int(d2)
        self.encoder_z2 = LinearEncoder((self.latent_dim,), self.latent_dim_2, True, eta_enc)
        self.decoder_z1 = LinearDecoder(self.latent_dim_2, self.latent_dim, sigma=eta_dec)
        self.beta_1 = check_number("beta_1", beta_1)
        self.beta_2 = check_number("beta_2", beta_2)
        self.eta_enc, self.eta_dec, self.sigma_1 = eta_enc, eta_dec, sigma_1
        self.learnable_sigma_1 = learnable_sigma_1
        self.analytic_expectation = _check_flag("analytic_expectation", analytic_expectation)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])

    # ----------------------------------------------------------------- maths
    def encode_z2(self, z1: Tensor) -> Normal:
        """q(z₂|z₁) = N(W₂ z₁, diag s₂²) with loc/scale of shape (B, latent_dim_2)."""
        return self.encoder_z2(z1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """log p(x|z₁) (B,), the z₁ term E[log q(z₁|x) − log p(z₁|z₂)] per z₁ dimension
        (B, d₁) and E KL(q(z₂|z₁) ‖ p(z₂)) per z₂ dimension (B, d₂)."""
        q1 = self.encode(x)
        w2, v = self.encoder_z2.weight, self.decoder_z1.weight
        s2 = self.encoder_z2.scale
        var_dec, var_enc = self.decoder_z1.likelihood.variance, self.eta_enc**2
        if self.analytic_expectation:
            log_px = self.decoder.expected_log_prob(x, q1)
            s1 = q1.scale[0] ** 2  # input-independent
            r = torch.eye(self.latent_dim, dtype=v.dtype, device=v.device) - v @ w2
            resid = (q1.loc @ r.T) ** 2 + (r**2 * s1).sum(-1) + (v**2 * s2**2).sum(-1)
            kl_z1 = 0.5 * (resid / var_dec - torch.log(q1.scale**2 / var_dec) - 1)
            mean_sq = (q1.loc @ w2.T) ** 2 + (w2**2 * s1).sum(-1)
            ratio = s2**2 / var_enc
            kl_z2 = 0.5 * (mean_sq / var_enc + ratio - torch.log(ratio) - 1)
        else:
            z1 = q1.rsample()
            log_px = self.decoder.log_prob(x, z1)
            q2 = self.encode_z2(z1)
            z2 = q2.rsample()
            p1 = Normal(self.decoder_z1(z2), var_dec.sqrt().expand_as(z1))
            kl_z1 = q1.log_prob(z1) - p1.log_prob(z1)
            kl_z2 = self.prior.kl(q2)
        return {"posterior": q1, "log_px": log_px, "kl_z1": kl_z1, "kl_z2": kl_z2}

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted loss of a batch and its logged terms."""
        out = self(x)
        recon = -out["log_px"].mean()
        kl_z1 = out["kl_z1"].sum(-1).mean()
        kl_z2 = out["kl_z2"].sum(-1).mean()
        loss = recon + self.beta_1 * kl_z1 + self.beta_2 * kl_z2
        return loss, {"loss": loss, "recon": recon, "kl_z1": kl_z1, "kl_z2": kl_z2,
                      "kl": kl_z1 + kl_z2, "elbo": -(recon + kl_z1 + kl_z2)}

    def conditional_z1(self, z2: Tensor) -> Normal:
        """p(z₁|z₂) = N(V z₂, η_dec² I) with loc/scale of shape (B, latent_dim)."""
        loc = self.decoder_z1(z2)
        return Normal(loc, self.decoder_z1.likelihood.variance.sqrt().expand_as(loc))

    def _sample_first_level(self, n: int) -> Tensor:
        return self.conditional_z1(self.prior.sample(n)).sample()

    def latent_terms(self, batch: Any) -> list[LatentTerm]:
        """Both levels, each against its own prior, in closed form at the posterior means
        (:func:`~ilvae.models.contract.two_level_terms`)."""
        x, _ = self.unpack(batch)
        return two_level_terms(self.encode(x), self.encode_z2, self.conditional_z1, self.prior)

    # ------------------------------------------------------------ diagnostics
    def decoder_singular_values(self, level: int = 2) -> Tensor:
        """Measured singular values, decreasing, float64: of V (z₂ → z₁, ``level=2``, the ω of
        the theory, length d₂) or of U (z₁ → x, ``level=1``, length d₁)."""
        if level == 2:
            return self.decoder_z1.singular_values()
        if level == 1:
            return self.decoder.singular_values()
        check("level", level, "1 or 2")

    @torch.no_grad()
    def kl_per_dimension(self, x: Tensor) -> Tensor:
        """E_x E_{q(z₁|x)} KL(q(z₂ⱼ|z₁) ‖ p(z₂ⱼ)) in closed form, float64 (latent_dim_2,)."""
        q1 = self.encode(x)
        w2 = self.encoder_z2.weight.double()
        s1 = q1.scale[0].double() ** 2
        mean_sq = ((q1.loc.double() @ w2.T) ** 2).mean(0) + (w2**2 * s1).sum(-1)
        ratio = self.encoder_z2.scale.double() ** 2 / self.eta_enc**2
        return 0.5 * (mean_sq / self.eta_enc**2 + ratio - torch.log(ratio) - 1)

    @torch.no_grad()
    def measured_collapse(self, x: Tensor, eps: float = 0.01) -> Tensor:
        """Collapsed z₂ dimensions: E KL(q(z₂ⱼ|z₁) ‖ p(z₂ⱼ)) < ``eps`` nats (mean over x and
        q(z₁|x)), i.e. q(z₂ⱼ|z₁) ≈ p(z₂ⱼ) whatever z₁ (ε-collapse, METHODS §1)."""
        return self.kl_per_dimension(x) < eps

    @torch.no_grad()
    def measured_inactive(self, x: Tensor, eps: float = 0.01) -> Tensor:
        """z₁ dimensions that carry no information about x: ½ E_x[μ₁ᵢ(x)²]/σ₁ᵢ² < ``eps``.

        With a fixed isotropic σ₁ the loss is invariant under rotations of z₁, so only the
        number of inactive directions is identified: the zero singular values of U
        (``decoder_singular_values(1)``), as for :meth:`LinearVAE.measured_inactive`.
        """
        q1 = self.encode(x)
        return 0.5 * (q1.loc.double() ** 2).mean(0) / q1.scale[0].double() ** 2 < eps

    def theory_prediction(self, x: Tensor) -> theory.LinearHVAEPrediction:
        """:func:`ilvae.theory.linear_hvae` for this model's settings on the data ``x``."""
        if self.learnable_sigma_1:
            raise NotImplementedError("the closed forms of ilvae.theory.linear_hvae assume a "
                                      "fixed sigma_1; set learnable_sigma_1=false")
        return theory.linear_hvae(theory.second_moment(x), self.beta_1, self.beta_2,
                                  self.eta_enc, self.eta_dec, self.sigma_1,
                                  latent_dim=self.latent_dim, latent_dim_2=self.latent_dim_2)


def fit_full_batch(model: nn.Module, x: Tensor, rounds: int = 8) -> nn.Module:
    """Minimise ``model.loss(x)`` over the whole data set with L-BFGS (strong Wolfe line
    search) until the loss changes by less than 1e-7 relative between rounds.

    Linear models have closed-form optima (:mod:`ilvae.theory`); full-batch L-BFGS on the exact
    expected loss reaches them, so a comparison measures the objective, not optimiser noise.
    """
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=100, history_size=30,
                            tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss, _ = model.loss(x)
        loss.backward()
        return loss

    previous = math.inf
    for _ in range(rounds):
        loss = float(opt.step(closure).detach())
        if abs(previous - loss) < 1e-7 * abs(loss):
            break
        previous = loss
    return model
