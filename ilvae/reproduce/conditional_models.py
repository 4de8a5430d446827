"""The models the ``conditional`` study trains and evaluates (Dang et al., ICLR 2024):
:class:`ExactLinearCVAE`, the linear CVAE trained to the optimum of its exact expected loss, and
:class:`JointView`, a CVAE seen as a model of u = [x, y] so that the unconditional collapse
metrics apply; :func:`exact_nll` is the linear CVAE's −log p(y|x) in closed form."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ilvae.models import ConditionalVAE

EPS = 0.01  # ε of ε-collapse (nats), METHODS §1


class ExactLinearCVAE(ConditionalVAE):
    """The linear CVAE (``linear=True``) trained to the optimum of its exact expected loss.

    With μ = W[x; y], posterior std s (a vector), U = [U₁ U₂] the decoder weight, η = η_dec and
    η_e = η_enc, the expectation over q of the per-pair loss −log p(y|x,z) + β Σ_i KL_i is

        ‖y − U₁μ − U₂x‖²/(2η²) + Σ_i s_i² ‖U₁[:, i]‖²/(2η²) + (d_y/2) log(2πη²)
        + β Σ_i ½ (μ_i²/η_e² + s_i²/η_e² − log(s_i²/η_e²) − 1),

    and its average over the pairs depends on the data only through S = E[uuᵀ], u = [x; y]
    (:meth:`expected_loss`); the Monte Carlo loss of :class:`~ilvae.models.ConditionalVAE`
    has this expectation. Training minimises exactly this average over the whole training set
    (one batch, one Lightning step per round of L-BFGS, manual optimisation), with two
    standard devices that change the path, not the objective:

    - variable projection: for a given encoder (W, s) the loss is quadratic in U, so U is set
      to its minimiser U* = S_yv (S_vv + diag(s², 0))⁻¹ with v = [μ; x], and L-BFGS runs on
      (W, s) alone (the gradient of the profiled loss equals the partial gradient at U*); at U*
      the squared-error terms are tr S_yy − tr(U* S_vy), so a closure needs only the
      (m + d_x)-sized moments of v, never U* itself;
    - whitening: W is parameterised as W̃ Pᵀ with P = V Λ^{-½} from S = V Λ Vᵀ (zero on
      directions the data do not vary in), which removes the data's conditioning (the
      eigenvalues of S of image data span several decades) from the problem.

    After every round the model's own weights (``encoder.weight``, ``encoder.log_scale``,
    ``decoder.weight``) hold W, s and U*, so every measurement reads the ordinary linear CVAE.
    """

    def __init__(self, lbfgs_iterations: int = 100, **kwargs: Any) -> None:
        super().__init__(linear=True, **kwargs)
        self.automatic_optimization = False
        self.lbfgs_iterations = int(lbfgs_iterations)
        dim = math.prod(self.data_shape) + math.prod(self.target_shape)
        self.encoder_whitened = nn.Parameter(torch.zeros(self.latent_dim, dim))
        self._basis: tuple[Tensor, ...] | None = None
        self.rounds = 0  # L-BFGS rounds (training steps) and loss evaluations, for timing
        self.closures = 0

    # ----------------------------------------------------------------- the exact objective
    def expected_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The expected loss above with the model's current weights, averaged over (x, y)."""
        u = torch.cat([x.flatten(1), y.flatten(1)], dim=1)
        return self.expected_loss_from_moment(u.T @ u / u.shape[0])

    def expected_loss_from_moment(self, moment: Tensor, w: Tensor | None = None,
                                  u: Tensor | None = None) -> Tensor:
        """The same average from S = E[uuᵀ]: with A = P_y − U₁W − U₂P_x (so that
        y − U₁μ − U₂x = A u) the mean squared residual is tr(A S Aᵀ) and the mean of μ_i² is
        (W S Wᵀ)_ii. ``w``/``u`` replace the encoder/decoder weights when given."""
        m = self.latent_dim
        w = self.encoder.weight.weight if w is None else w
        u = self.decoder.weight.weight if u is None else u
        s2 = (2 * self.encoder.log_scale).exp()
        u1, u2 = u[:, :m], u[:, m:]
        eye = torch.eye(u.shape[0], dtype=u.dtype, device=u.device)
        a = torch.cat([-u2, eye], dim=1) - u1 @ w
        squared = ((a @ moment) * a).sum() + (s2 * (u1**2).sum(0)).sum()
        return self._loss(squared, ((w @ moment) * w).sum(1), s2, u.shape[0])

    def _loss(self, squared: Tensor, mu2: Tensor, s2: Tensor, dy: int) -> Tensor:
        """The expected loss from its data terms: ``squared`` = E‖y − U₁μ − U₂x‖² +
        Σ_i s_i²‖U₁[:, i]‖², ``mu2`` = E μ_i² per latent, ``s2`` = s², ``dy`` = size of y."""
        eta2, e2 = float(self.eta_dec) ** 2, float(self.eta_enc) ** 2
        recon = squared / (2 * eta2) + 0.5 * dy * math.log(2 * math.pi * eta2)
        kl = 0.5 * (mu2 / e2 + s2 / e2 - torch.log(s2 / e2) - 1)
        return recon + self.beta * kl.sum()

    # ------------------------------------------------------------------------- training
    def _prepare(self, moment: Tensor) -> None:
        """Whitening bases of u and of x from S, and W̃ from the initial W (projected onto
        the directions the data vary in)."""
        dx = math.prod(self.data_shape)

        def basis(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            ev, vec = torch.linalg.eigh(matrix)
            keep = ev > 1e-10 * ev.max().clamp(min=1e-300)
            scale = torch.where(keep, ev.clamp(min=1e-300).rsqrt(), torch.zeros_like(ev))
            return vec * scale, vec * torch.where(keep, ev.sqrt(), torch.zeros_like(ev)), keep

        p, p_inverse, keep = basis(moment)
        q, _, keep_x = basis(moment[:dx, :dx])
        with torch.no_grad():
            self.encoder_whitened.copy_(self.encoder.weight.weight @ p_inverse)
        # Everything in the moments of v = [W̃ Pᵀu; Qᵀx] that does not depend on the encoder,
        # computed once (Pᵀ S P = diag(keep) by construction of P).
        self._basis = (p, q, keep_x, keep.to(moment.dtype), q.T @ moment[:dx, :dx] @ q,
                       moment[dx:, :dx] @ q, p.T @ moment[:, :dx] @ q, moment[dx:] @ p)

    def _profile(self, moment: Tensor, weights: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """(loss at U*, W, U*) for the current W̃ and s; ``moment`` is the S given to
        :meth:`_prepare`. With ``weights=False`` only the loss is computed (W, U* are None)."""
        assert self._basis is not None
        p, q, keep_x, keep, sxx, syx, spx, syp = self._basis
        m, dx = self.latent_dim, math.prod(self.data_shape)
        wt = self.encoder_whitened
        s2 = (2 * self.encoder.log_scale).exp()
        # The moments S_vv, S_yv of v = [μ; Qᵀx] in the whitened coordinates, so a closure
        # costs O(m d d_y + (m + d_x)² d_y) and never forms a (d × d) or (d_y × d) product.
        smm = wt @ (wt * keep).T  # E[μμᵀ] = W S Wᵀ
        wsx = wt @ spx
        svv = torch.cat([torch.cat([smm, wsx], dim=1), torch.cat([wsx.T, sxx], dim=1)], dim=0)
        ridge = torch.cat([s2, (~keep_x).to(s2.dtype)])  # s² on μ; 1 on x's null directions
        chol = torch.linalg.cholesky(svv + torch.diag(ridge))
        syv = torch.cat([syp @ wt.T, syx], dim=1)
        # At U* = S_yv (S_vv + ridge)⁻¹ (its columns on x's null directions are 0):
        # E‖y − U* v‖² + Σ s_i²‖U₁[:, i]‖² = tr S_yy − tr(S_yv (S_vv + ridge)⁻¹ S_vy).
        half = torch.linalg.solve_triangular(chol, syv.T, upper=False)
        squared = torch.trace(moment[dx:, dx:]) - (half**2).sum()
        loss = self._loss(squared, torch.diagonal(smm), s2, moment.shape[0] - dx)
        if not weights:
            return loss, None, None  # type: ignore[return-value]
        with torch.no_grad():
            w = wt @ p.T
            u_star = torch.cholesky_solve(syv.T, chol).T
            u = torch.cat([u_star[:, :m], u_star[:, m:] @ q.T], dim=1)
        return loss, w, u

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self.unpack(batch)
        u = torch.cat([x.flatten(1), y.flatten(1)], dim=1)
        moment = u.T @ u / u.shape[0]
        if self._basis is None:
            self._prepare(moment)
        opt = self.optimizers()

        def closure() -> Tensor:
            self.closures += 1
            opt.zero_grad()
            loss = self._profile(moment, weights=False)[0]
            self.manual_backward(loss)
            return loss

        with torch.no_grad():
            before = float(self._profile(moment, weights=False)[0])
        opt.step(closure=closure)
        self.rounds += 1
        with torch.no_grad():
            loss, w, u_star = self._profile(moment)
            self.encoder.weight.weight.copy_(w)
            self.decoder.weight.weight.copy_(u_star)
            kl = self.kl_per_dimension(x, y)
        # Converged: a whole round of L-BFGS moved the loss by less than 1e-9 relative.
        if abs(before - float(loss)) <= 1e-9 * max(1.0, abs(float(loss))):
            self.trainer.should_stop = True
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=x.shape[0])
        self.log("train/epsilon_collapsed", float((kl < EPS).sum()), on_step=True,
                 on_epoch=False)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.LBFGS([self.encoder_whitened, self.encoder.log_scale], lr=1.0,
                                 max_iter=self.lbfgs_iterations, history_size=50,
                                 tolerance_grad=1e-12, tolerance_change=1e-15,
                                 line_search_fn="strong_wolfe")


class _JointDecoder(nn.Module):
    def __init__(self, model: ConditionalVAE, x_dim: int) -> None:
        super().__init__()
        self.model, self.x_dim = model, x_dim

    def log_prob(self, u: Tensor, z: Tensor) -> Tensor:
        x, y = u[:, : self.x_dim], u[:, self.x_dim:]
        return self.model.decoder.log_prob(y, torch.cat([z, x], dim=1))


class JointView(nn.Module):
    """A CVAE seen as a model of u = [x, y] so that the unconditional metrics apply:
    ``encode(u)`` = q(z|x, y), ``decoder.log_prob(u, z)`` = log p(y|x, z), ``prior`` = p(z).
    Its importance-weighted NLL is therefore −log p(y|x) (nats per pair)."""

    def __init__(self, model: ConditionalVAE) -> None:
        super().__init__()
        self.model = model
        self.x_dim = math.prod(model.data_shape)
        self.decoder = _JointDecoder(model, self.x_dim)
        self.prior = model.prior

    def encode(self, u: Tensor):
        return self.model.encode(u[:, : self.x_dim], u[:, self.x_dim:])


def _joint(x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.cat([x.flatten(1), y.flatten(1)], dim=1).to(dtype)


def exact_nll(model: ConditionalVAE, x: Tensor, y: Tensor) -> float:
    """−(1/N) Σ log p(y|x) of the linear CVAE in closed form: y|x ~ N(U₂x, η_e² U₁U₁ᵀ + η² I)."""
    with torch.no_grad():
        u = model.decoder.weight.weight.double()
        u1, u2 = u[:, : model.latent_dim], u[:, model.latent_dim:]
        cov = float(model.eta_enc) ** 2 * u1 @ u1.T
        cov = cov + float(model.eta_dec) ** 2 * torch.eye(u.shape[0], dtype=torch.float64)
        mean = x.flatten(1).double() @ u2.T
        dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
        return float(-dist.log_prob(y.flatten(1).double()).mean())
