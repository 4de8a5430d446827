"""Study ``linear-theory`` (METHODS §4, §6; Dang et al., ICLR 2024; Lucas et al., 2019).

Linear models have closed-form optima, which makes them the framework's sharpest correctness
check: a trained model must collapse exactly the predicted dimensions with decoder singular
values close to the predicted ones. One table per theorem:

1. linear VAE with learnable encoder variance over a β / η_dec grid crossing the thresholds
   √β·η_dec = θ_i (:func:`ilvae.theory.linear_vae`);
2. linear VAE with fixed encoder variance: the predicted *inactive* dimensions, and no strict
   collapse (posterior N(0, σ_i²) ≠ prior);
3. the fixed-σ² vs adaptive-σ² (AR-ELBO) linear picture of §4, as closed-form predictions;
4. linear CVAE over β and the x–y correlation (:func:`ilvae.theory.linear_cvae`);
5. two-level linear HVAE over β₁, β₂, σ₁ (:func:`ilvae.theory.linear_hvae`).

Training protocol: full-batch optimisation of the exact expected loss (the linear-Gaussian
expectation over q in closed form) with L-BFGS (Adam with a cosine schedule for the CVAE), so
the measurement reflects the objective's optimum rather than optimiser noise. "Collapsed" is
measured as mean KL of a dimension < 0.01 nats; singular-value error is the largest relative
error over dimensions predicted active.
"""

from __future__ import annotations

import math
import time

import torch

from ilvae import theory
from ilvae.models.linear import fit_full_batch
from ilvae.reproduce.common import StudyContext

TITLE = "Linear theory: predicted vs measured collapse in linear VAEs, CVAEs and HVAEs"

SPECTRUM = [3.0, 2.0, 1.2, 0.5, 0.25]


def _sv_error(measured: torch.Tensor, predicted: torch.Tensor) -> float:
    active = predicted > 0
    if not active.any():
        return 0.0
    return float(((measured[active] - predicted[active]).abs() / predicted[active]).max())


def _linear_vae(ctx: StudyContext, x: torch.Tensor) -> list[dict]:
    from ilvae.models import LinearVAE

    grid = [(b, 1.0) for b in ((0.64, 1.69, 4.0) if ctx.quick else
                               (0.16, 0.64, 1.0, 1.69, 2.25, 4.0, 9.0, 12.25))]
    grid += [(1.0, e) for e in ((0.9, 1.5) if ctx.quick else (0.6, 0.9, 1.3, 1.5, 1.9))]
    rows = []
    for beta, eta_dec in grid:
        torch.manual_seed(ctx.seed)
        model = LinearVAE(data_shape=(x.shape[1],), latent_dim=len(SPECTRUM), beta=beta,
                          eta_dec=eta_dec)
        fit_full_batch(model, x)
        pred = model.theory_prediction(x)
        measured = int(model.measured_collapse(x).sum())
        rows.append(ctx.add_row(theorem="linear VAE (learnable variance)", model="LinearVAE",
                                beta=beta, eta_dec=eta_dec, eta_enc=1.0,
                                predicted_collapsed=pred.num_collapsed,
                                measured_collapsed=measured,
                                singular_value_error=_sv_error(
                                    model.decoder_singular_values(), pred.singular_values)))
    return rows


def _fixed_variance(ctx: StudyContext, x: torch.Tensor) -> list[dict]:
    from ilvae.models import LinearVAE

    rows = []
    for std in ((0.6,) if ctx.quick else (0.4, 0.6, 0.9)):
        torch.manual_seed(ctx.seed)
        model = LinearVAE(data_shape=(x.shape[1],), latent_dim=len(SPECTRUM),
                          learnable_variance=False, encoder_std=std)
        fit_full_batch(model, x)
        pred = model.theory_prediction(x)
        omega = model.decoder_singular_values()
        # One fixed std for every dimension makes the loss rotation invariant in z: only the
        # number of inactive directions is identified, i.e. the zero decoder singular values.
        inactive = int((omega < 0.02 * omega.max()).sum())
        rows.append(ctx.add_row(
            theorem="linear VAE (fixed variance)", model="LinearVAE", encoder_std=std,
            beta=1.0, eta_dec=1.0, predicted_inactive=int(pred.inactive.sum()),
            measured_inactive=inactive,
            predicted_collapsed=pred.num_collapsed,
            measured_collapsed=int(model.measured_collapse(x).sum()),
            singular_value_error=_sv_error(omega, pred.singular_values)))
    return rows


def _sigma_picture(ctx: StudyContext, x: torch.Tensor) -> list[dict]:
    cov = theory.covariance(x)
    rows = []
    for sigma2 in (0.3, 1.0, 2.5):
        fixed = theory.linear_fixed_sigma(cov, sigma2, latent_dim=len(SPECTRUM))
        rows.append(ctx.add_row(theorem="fixed vs adaptive σ² (prediction)", model="linear",
                                sigma=math.sqrt(sigma2),
                                predicted_collapsed=fixed.num_collapsed))
    for k in (2, 3, 4):
        adaptive = theory.linear_adaptive_sigma(cov, latent_dim=k)
        rows.append(ctx.add_row(theorem="fixed vs adaptive σ² (prediction)",
                                model=f"adaptive σ², m={k}",
                                sigma=math.sqrt(adaptive.sigma2),
                                predicted_collapsed=adaptive.num_collapsed))
    return rows


def _cvae(ctx: StudyContext) -> list[dict]:
    from ilvae.datamodules import LinearConditionalData
    from ilvae.models import ConditionalVAE

    rows = []
    grid = [(0.0, 1.0), (0.866, 1.0), (0.0, 4.0)] if ctx.quick else \
        [(rho, b) for rho in (0.0, 0.5, 0.866, 0.968) for b in (1.0, 4.0)]
    steps, lr = 400, 0.05
    for rho, beta in grid:
        dm = LinearConditionalData(correlation=rho, num_samples=4000, val_fraction=0.0,
                                   seed=ctx.seed)
        x, y, label = dm.tensors("train")
        torch.manual_seed(ctx.seed)
        model = ConditionalVAE(data_shape=dm.data_shape, target_shape=dm.target_shape,
                               latent_dim=4, linear=True, beta=beta)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 1e-3)
        for _ in range(steps):
            opt.zero_grad()
            out = model(x, y)
            loss = -(out["log_py"]).mean() + beta * out["kl"].sum(-1).mean()
            loss.backward()
            opt.step()
            sched.step()
        pred = model.theory_prediction(x, y)
        rows.append(ctx.add_row(
            theorem="linear CVAE", model="ConditionalVAE(linear)", correlation=rho, beta=beta,
            eta_dec=1.0, predicted_collapsed=pred.num_collapsed,
            measured_collapsed=int(model.measured_collapse(x, y, eps=0.01).sum()),
            singular_value_error=_sv_error(model.decoder_singular_values(),
                                           pred.singular_values)))
    return rows


def _hvae(ctx: StudyContext, x: torch.Tensor) -> list[dict]:
    from ilvae.models import LinearHVAE

    grid = [(1.0, 1.0, 0.4), (2.0, 1.0, 0.5), (1.0, 1.0, 1.2)] if ctx.quick else \
        [(b1, b2, s1) for b1 in (0.5, 1.0, 2.0) for b2 in (0.5, 1.0) for s1 in (0.4, 0.8, 1.2)]
    rows = []
    for b1, b2, s1 in grid:
        torch.manual_seed(ctx.seed)
        model = LinearHVAE(data_shape=(x.shape[1],), latent_dim=len(SPECTRUM), beta_1=b1,
                           beta_2=b2, sigma_1=s1)
        fit_full_batch(model, x)
        pred = model.theory_prediction(x)
        rows.append(ctx.add_row(
            theorem="linear HVAE (z₂)", model="LinearHVAE", beta_1=b1, beta_2=b2, sigma_1=s1,
            eta_dec=1.0, predicted_collapsed=pred.num_collapsed,
            measured_collapsed=int(model.measured_collapse(x).sum()),
            singular_value_error=_sv_error(model.decoder_singular_values(2),
                                           pred.singular_values)))
    return rows


def run(ctx: StudyContext) -> None:
    from ilvae.datamodules import LinearGaussianData

    dm = LinearGaussianData(spectrum=SPECTRUM, data_dim=6, num_samples=1000,
                            exact_spectrum=True, val_fraction=0.0, seed=ctx.seed)
    x = dm.tensors("fit")[0]
    full_sizes = {"vae": 13, "fixed": 3, "cvae": 8, "hvae": 18}  # settings of the full grids
    timed: dict[str, tuple[float, int]] = {}

    def timed_rows(key: str, make, *args) -> list[dict]:
        start = time.time()
        rows = make(ctx, *args)
        timed[key] = (time.time() - start, len(rows))
        return rows

    sections = [
        ("Linear VAE, learnable encoder variance: collapse iff θ_i < √β·η_dec",
         timed_rows("vae", _linear_vae, x),
         ["beta", "eta_dec", "predicted_collapsed", "measured_collapsed",
          "singular_value_error"]),
        ("Linear VAE, fixed encoder variance: inactive iff θ_i ≤ √β(η_dec/η_enc)σ_i, never "
         "strictly collapsed", timed_rows("fixed", _fixed_variance, x),
         ["encoder_std", "predicted_inactive", "measured_inactive", "predicted_collapsed",
          "measured_collapsed", "singular_value_error"]),
        ("Linear CVAE: collapse iff θ_i(E) < β·η_dec²", timed_rows("cvae", _cvae),
         ["correlation", "beta", "predicted_collapsed", "measured_collapsed",
          "singular_value_error"]),
        ("Linear two-level HVAE: collapse of z₂", timed_rows("hvae", _hvae, x),
         ["beta_1", "beta_2", "sigma_1", "predicted_collapsed", "measured_collapsed",
          "singular_value_error"]),
    ]
    ctx.expect_full_size(sum(sec / n * full_sizes[k] for k, (sec, n) in timed.items()),
                         "measured seconds per trained setting of each theorem here × the "
                         f"{sum(full_sizes.values())} settings of the full grids")
    for heading, rows, cols in sections:
        agree = sum(r["predicted_collapsed"] == r["measured_collapsed"] and
                    r.get("predicted_inactive") == r.get("measured_inactive") for r in rows)
        worst = max(r["singular_value_error"] for r in rows)
        ctx.add_table(heading, rows, cols, note=f"data: 6-D Gaussian with spectrum "
                      f"{SPECTRUM} (exact), 1,000 points; agreement {agree}/{len(rows)}; "
                      f"worst singular-value error {worst:.2%}.")
        ctx.finding(heading, agree == len(rows),
                    f"{agree}/{len(rows)} settings match; worst singular-value error "
                    f"{worst:.2%}")
    _plot(ctx)
    picture = _sigma_picture(ctx, x)
    ctx.add_table("Fixed vs adaptive decoder variance (closed-form predictions, METHODS §4)",
                  picture, ["model", "sigma", "predicted_collapsed"],
                  note="Fixed σ²: direction j collapses iff λ_j ≤ σ². Adaptive σ² (AR-ELBO, "
                  "maximum likelihood = mean of the discarded eigenvalues) for latent size m. "
                  "Predictions only; the trained counterparts are in the tables above.")


def _plot(ctx: StudyContext) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ctx.rows if "measured_collapsed" in r]
    fig, ax = plt.subplots(figsize=(4.2, 4))
    for theorem in dict.fromkeys(r["theorem"] for r in rows):
        pts = [(r["predicted_collapsed"], r["measured_collapsed"]) for r in rows
               if r["theorem"] == theorem]
        jitter = 0.06 * (len(ax.collections) - 1.5)
        ax.scatter([p + jitter for p, _ in pts], [m for _, m in pts], label=theorem, s=30)
    top = max(max(r["predicted_collapsed"], r["measured_collapsed"]) for r in rows) + 0.5
    ax.plot([-0.5, top], [-0.5, top], "k--", lw=1)
    ax.set_xlabel("predicted collapsed dimensions (closed form)")
    ax.set_ylabel("measured collapsed dimensions (trained)")
    ax.legend(fontsize=7)
    ctx.add_plot(fig, "linear_theory", "Measured against predicted number of collapsed "
                 "dimensions for every trained linear model (points on the diagonal agree).")
