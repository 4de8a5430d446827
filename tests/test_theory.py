"""Closed forms of ilvae.theory against independent computations: direct numerical minimisation
of the linear models' expected losses over full matrices (and, for the HVAE, over each mode's
scalar problem), probabilistic PCA's likelihood, eigen decompositions, and the monotonicity
facts stated in METHODS §4 and §6."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from sklearn.decomposition import PCA

from ilvae import theory

torch.set_num_threads(1)

SLOW = pytest.mark.slow


def _rotation(d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]


def _moment(spectrum, d=None, seed=0):
    """A = Q diag(spectrum²) Qᵀ with a random rotation Q."""
    s = torch.tensor(spectrum, dtype=torch.float64)
    d = d or len(s)
    q = _rotation(d, seed)[:, : len(s)]
    return (q * s**2) @ q.T


def _minimise(fun, n, restarts=2, seed=0, scale=0.5, maxiter=2000):
    """Best of a few L-BFGS runs from random starts; ``fun(p) -> (value, gradient)``."""
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(restarts):
        res = minimize(fun, rng.normal(size=n) * scale, jac=True, method="L-BFGS-B",
                       options={"maxiter": maxiter, "gtol": 1e-11, "ftol": 1e-15})
        if best is None or res.fun < best.fun:
            best = res
    return best


# ------------------------------------------------------------- expected losses, full matrices
def _vae_objective(a, m, beta, eta_enc, eta_dec, sigma=None):
    """2η_dec² × the expected negative β-ELBO of the linear VAE with its analytic gradient,
    written out from the model's definition (log s² free when ``sigma`` is None)."""
    d = a.shape[0]
    c = beta * eta_dec**2

    def split(p):
        u = p[: d * m].reshape(d, m)
        w = p[d * m: 2 * d * m].reshape(m, d)
        s2 = np.exp(p[2 * d * m:]) if sigma is None else np.asarray(sigma, float) ** 2
        return u, w, s2

    def fun(p):
        u, w, s2 = split(p)
        r = np.eye(d) - u @ w
        ra = r @ a
        col = (u**2).sum(0)
        val = (np.trace(ra @ r.T) + (col * s2).sum()
               + c * (np.trace(w @ a @ w.T) / eta_enc**2 + s2.sum() / eta_enc**2
                      - np.log(s2).sum()))
        gu = -2 * ra @ w.T + 2 * u * s2
        gw = -2 * u.T @ ra + 2 * c / eta_enc**2 * w @ a
        grads = [gu.ravel(), gw.ravel()]
        if sigma is None:
            grads.append(s2 * (col + c / eta_enc**2) - c)
        return val, np.concatenate(grads)

    n = 2 * d * m + (m if sigma is None else 0)
    return fun, split, n


def _closed_form_point(a, pred):
    """The full matrices (U, W, log s²) the prediction describes: latent i uses the
    eigenvector of A whose √eigenvalue is the θ paired with it."""
    ev, vec = np.linalg.eigh(a)
    roots = np.sqrt(np.clip(ev, 0, None))
    free = list(range(len(ev)))
    m = len(pred.theta)
    u, w = np.zeros((len(ev), m)), np.zeros((m, len(ev)))
    for i, theta in enumerate(pred.theta.numpy()):
        j = min(free, key=lambda k: abs(roots[k] - theta))
        free.remove(j)
        u[:, i] = pred.singular_values[i].item() * vec[:, j]
        if theta > 0:
            w[i] = pred.encoder_singular_values[i].item() / theta * vec[:, j]
    return u, w, np.log(pred.encoder_variance.numpy())


def _check_vae_optimum(a, pred, beta, eta_enc, eta_dec, sigma=None):
    """The closed form is a stationary point of the expected loss, no random start of a
    numerical minimisation gets below it, and the minimiser found has its singular values."""
    a = a.numpy()
    m = len(pred.theta)
    fun, split, n = _vae_objective(a, m, beta, eta_enc, eta_dec, sigma)
    u, w, log_s2 = _closed_form_point(a, pred)
    point = np.concatenate([u.ravel(), w.ravel()] + ([log_s2] if sigma is None else []))
    value, grad = fun(point)
    assert np.abs(grad).max() < 1e-9
    best = _minimise(fun, n)
    assert best.fun >= value - 1e-9
    u_num, w_num, s2_num = split(best.x)
    assert np.allclose(np.linalg.svd(u_num, compute_uv=False),
                       np.sort(pred.singular_values.numpy())[::-1], atol=2e-3)
    return u_num, w_num, s2_num


@pytest.mark.parametrize("beta,eta_enc,eta_dec", [(2.0, 0.7, 1.1), (4.0, 1.5, 0.8),
                                                  pytest.param(1.0, 1.0, 1.0, marks=SLOW)])
def test_linear_vae_learnable_variance_equals_minimum_of_the_expected_loss(beta, eta_enc,
                                                                           eta_dec):
    a = _moment([3.0, 2.0, 1.2, 0.5])
    pred = theory.linear_vae(a, beta, eta_enc, eta_dec, latent_dim=3)
    _, w, s2 = _check_vae_optimum(a, pred, beta, eta_enc, eta_dec)
    # collapsed dimensions: encoder row 0 and posterior variance = prior variance
    rows = np.linalg.norm(w, axis=1)
    assert (rows < 1e-3).sum() == pred.num_collapsed
    assert np.allclose(s2[rows < 1e-3], eta_enc**2, atol=1e-3)
    assert list(pred.collapsed.numpy()) == list(pred.singular_values.numpy() == 0)


@pytest.mark.parametrize("sigma", [[2.0, 0.3, 1.0], [1.2, 1.2, 1.2],
                                   pytest.param([0.5, 1.0, 2.0], marks=SLOW)])
def test_linear_vae_fixed_variance_pairs_small_sigma_with_large_theta(sigma):
    a = _moment([3.0, 2.0, 1.2, 0.5])
    beta, eta_enc, eta_dec = 1.5, 0.8, 1.0
    pred = theory.linear_vae(a, beta, eta_enc, eta_dec, learnable_variance=False,
                             encoder_std=sigma, latent_dim=3)
    u, _, _ = _check_vae_optimum(a, pred, beta, eta_enc, eta_dec, sigma=sigma)
    if not pred.exchangeable:  # entry i is latent i: its decoder column is 0 iff inactive
        assert list(pred.inactive.numpy()) == list(np.linalg.norm(u, axis=0) < 1e-3)
    # σ ≠ η_enc: inactive modes keep posterior N(0, σ²) ≠ prior, so nothing strictly collapses
    assert pred.inactive.any() and not pred.collapsed.any()
    assert (pred.kl[pred.inactive] > 0.01).all()


def test_fixed_variance_at_the_prior_scale_collapses_like_the_learnable_case():
    a = _moment([3.0, 2.0, 0.5])
    fixed = theory.linear_vae(a, 1.0, 1.0, 1.0, learnable_variance=False, encoder_std=1.0)
    learned = theory.linear_vae(a, 1.0, 1.0, 1.0)
    assert torch.equal(fixed.collapsed, learned.collapsed)
    assert torch.allclose(fixed.kl[fixed.collapsed], torch.zeros(1, dtype=torch.float64))
    # same threshold, different singular values: ω² = k(θ/σ − k) vs (θ² − βη²)/η_enc²
    assert not torch.allclose(fixed.singular_values[:2], learned.singular_values[:2])


def test_linear_vae_scalar_solution_is_a_stationary_point_of_each_mode():
    rng = np.random.default_rng(1)
    for _ in range(20):
        theta, beta, eta_enc, eta_dec = rng.uniform(0.2, 3.0, size=4)
        a = torch.tensor([[theta**2]], dtype=torch.float64)
        pred = theory.linear_vae(a, beta, eta_enc, eta_dec)
        fun, _, _ = _vae_objective(a.numpy(), 1, beta, eta_enc, eta_dec)
        u = float(pred.singular_values[0])
        lam = float(pred.encoder_singular_values[0])
        p = np.array([u, lam / theta, math.log(float(pred.encoder_variance[0]))])
        value, grad = fun(p)
        assert np.abs(grad).max() < 1e-9
        kl = 0.5 * (lam**2 / eta_enc**2 + math.exp(p[2]) / eta_enc**2
                    - p[2] + 2 * math.log(eta_enc) - 1)
        assert math.isclose(kl, float(pred.kl[0]), abs_tol=1e-9)
        # no better point nearby, and the collapsed point is no better
        for delta in rng.normal(size=(20, 3)) * 1e-3:
            assert fun(p + delta)[0] >= value - 1e-12
        collapsed = np.array([0.0, 0.0, 2 * math.log(eta_enc)])
        assert fun(collapsed)[0] >= value - 1e-12


def test_linear_vae_theta_are_roots_of_the_uncentred_second_moment_and_data_are_accepted():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1]) + 0.7
    a = x.double().T @ x.double() / 400
    from_data = theory.linear_vae(x, 1.0, 1.0, 0.8)
    from_matrix = theory.linear_vae(a, 1.0, 1.0, 0.8)
    expected = np.sqrt(np.sort(np.linalg.eigvalsh(a.numpy()))[::-1])
    assert np.allclose(from_matrix.theta.numpy(), expected)
    assert torch.allclose(from_data.theta, from_matrix.theta)
    assert torch.allclose(theory.second_moment(x.reshape(400, 5, 1)), a)
    # more latents than data dimensions: the extra ones have θ = 0 and collapse
    wide = theory.linear_vae(a, 1.0, 1.0, 0.8, latent_dim=7)
    assert wide.collapsed[5:].all() and wide.theta[5:].eq(0).all()


def test_eta_enc_moves_singular_values_but_not_the_collapsed_set():
    a = _moment([3.0, 2.0, 1.2, 0.7, 0.4])
    base = theory.linear_vae(a, 1.0, 1.0, 1.0)
    for eta_enc in (0.3, 0.8, 2.5):
        pred = theory.linear_vae(a, 1.0, eta_enc, 1.0)
        assert torch.equal(pred.collapsed, base.collapsed)
        assert torch.allclose(pred.singular_values * eta_enc, base.singular_values)


def test_collapse_grows_with_beta_and_eta_dec_and_flips_at_the_threshold():
    a = _moment([3.0, 2.0, 1.2, 0.7, 0.4])
    theta = theory.linear_vae(a, 1.0, 1.0, 1.0).theta
    counts = [theory.linear_vae(a, b, 1.0, 1.0).num_collapsed for b in np.linspace(0.01, 12, 60)]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 5
    counts = [theory.linear_vae(a, 1.0, 1.0, e).num_collapsed for e in np.linspace(0.05, 4, 60)]
    assert counts == sorted(counts)
    t = float(theta[2])
    assert not theory.linear_vae(a, 1.0, 1.0, t * 0.999).collapsed[2]
    assert theory.linear_vae(a, 1.0, 1.0, t * 1.001).collapsed[2]
    assert theory.linear_vae(a, 1.0, 1.0, t * 1.001).singular_values[2] == 0


# ----------------------------------------------------------------------------------- CVAE
def _brute_force_cvae(m_joint, dx, dz, beta, eta_enc, eta_dec, restarts=2):
    """Minimise 2η_dec² × the expected CVAE loss over full U₁, U₂, W = [W₁ W₂], log s²."""
    d = m_joint.shape[0]
    dy = d - dx
    py = np.hstack([np.zeros((dy, dx)), np.eye(dy)])
    px = np.hstack([np.eye(dx), np.zeros((dx, dy))])
    c = beta * eta_dec**2
    sizes = [dy * dz, dy * dx, dz * d, dz]

    def split(p):
        parts = np.split(p, np.cumsum(sizes)[:-1])
        return (parts[0].reshape(dy, dz), parts[1].reshape(dy, dx), parts[2].reshape(dz, d),
                np.exp(parts[3]))

    def fun(p):
        u1, u2, w, s2 = split(p)
        r = py - u1 @ w - u2 @ px
        rm = r @ m_joint
        col = (u1**2).sum(0)
        val = (np.trace(rm @ r.T) + (col * s2).sum()
               + c * (np.trace(w @ m_joint @ w.T) / eta_enc**2 + s2.sum() / eta_enc**2
                      - np.log(s2).sum()))
        grads = [-2 * rm @ w.T + 2 * u1 * s2, -2 * rm @ px.T,
                 -2 * u1.T @ rm + 2 * c / eta_enc**2 * w @ m_joint,
                 s2 * (col + c / eta_enc**2) - c]
        return val, np.concatenate([g.ravel() for g in grads])

    u1, _, _, _ = split(_minimise(fun, sum(sizes), restarts).x)
    return np.linalg.svd(u1, compute_uv=False)


@pytest.mark.parametrize("beta,eta_enc,eta_dec", [(0.5, 0.6, 1.6),
                                                  pytest.param(1.0, 1.0, 1.0, marks=SLOW)])
def test_linear_cvae_equals_minimum_of_the_expected_loss(beta, eta_enc, eta_dec):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 2, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0])
    y = x @ torch.tensor([[0.8, 0.1, 0.0], [0.0, 0.5, 0.3]], dtype=torch.float64)
    y = y + torch.randn(500, 3, generator=g, dtype=torch.float64) * torch.tensor([1.5, 0.9, 0.3])
    sxx, sxy, syy = theory.joint_second_moments(x, y)
    pred = theory.linear_cvae(sxx, sxy, syy, beta, eta_enc, eta_dec, latent_dim=3)
    joint = theory.second_moment(torch.cat([x, y], 1)).numpy()
    omega = _brute_force_cvae(joint, 2, 3, beta, eta_enc, eta_dec)
    assert np.allclose(pred.singular_values.numpy(), omega, atol=2e-3)
    residual = syy - sxy.T @ torch.linalg.inv(sxx) @ sxy
    assert np.allclose(pred.theta.numpy(), np.sort(np.linalg.eigvalsh(residual.numpy()))[::-1])
    assert pred.collapsed.any() and not pred.collapsed.all()


def test_cvae_without_correlation_is_the_vae_of_y_and_correlation_increases_collapse():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(4000, 3, generator=g, dtype=torch.float64) @ torch.diag(
        torch.tensor([1.5, 1.0, 0.6], dtype=torch.float64))
    sxx, _, syy = theory.joint_second_moments(x, noise)
    independent = theory.linear_cvae(sxx, torch.zeros(3, 3, dtype=torch.float64), syy, 0.5)
    vae = theory.linear_vae(syy, 0.5, 1.0, 1.0)
    assert torch.equal(independent.collapsed, vae.collapsed)
    assert torch.allclose(independent.singular_values, vae.singular_values)
    counts = []
    for rho in np.linspace(0.0, 0.99, 12):
        y = rho * x * 1.5 + math.sqrt(1 - rho**2) * noise
        counts.append(theory.linear_cvae(*theory.joint_second_moments(x, y), 0.5).num_collapsed)
    assert counts == sorted(counts) and counts[-1] > counts[0]


# ----------------------------------------------------------------------------------- HVAE
def _hvae_mode_objective(theta, sigma_1, beta_1, beta_2, eta_enc, eta_dec):
    """2η_dec² × one mode's expected HVAE loss in (v, u₁, w₂, u₂, log s₂²), with gradient."""
    c2 = eta_dec**2 / eta_enc**2

    def fun(p):
        v, u1, w2, u2, ls = p
        a = v**2 + sigma_1**2
        s = math.exp(ls)
        e = u1 * v - theta
        r = 1 - u2 * w2
        value = (e**2 + sigma_1**2 * u1**2 + beta_1 * (r**2 * a + u2**2 * s)
                 + beta_2 * (c2 * (w2**2 * a + s) - eta_dec**2 * ls))
        grad = [2 * e * u1 + 2 * v * (beta_1 * r**2 + beta_2 * c2 * w2**2),
                2 * e * v + 2 * sigma_1**2 * u1,
                -2 * beta_1 * r * u2 * a + 2 * beta_2 * c2 * w2 * a,
                -2 * beta_1 * r * w2 * a + 2 * beta_1 * u2 * s,
                beta_1 * u2**2 * s + beta_2 * (c2 * s - eta_dec**2)]
        return value, np.array(grad)

    return fun


def test_linear_hvae_mode_solution_is_the_minimum_of_each_mode_problem():
    rng = np.random.default_rng(7)
    cases = [(3.0, 1.2, 1, 1, 1, 1), (2.0, 0.5, 1, 1, 1, 1), (1.5, 0.8, 1, 2, 0.7, 1),
             (1.2, 0.3, 2, 0.5, 1, 1), (0.6, 0.2, 1, 1, 1, 1)]
    cases += [tuple(rng.uniform(0.2, 3.0, size=6)) for _ in range(7)]
    for theta, sigma_1, b1, b2, ee, ed in cases:
        a = torch.tensor([[theta**2]], dtype=torch.float64)
        pred = theory.linear_hvae(a, b1, b2, ee, ed, sigma_1)
        fun = _hvae_mode_objective(theta, sigma_1, b1, b2, ee, ed)
        starts = np.random.default_rng(0)
        best = min((minimize(fun, starts.normal(size=5), jac=True, method="L-BFGS-B",
                             options={"gtol": 1e-11, "ftol": 1e-15, "maxiter": 1000})
                    for _ in range(3)), key=lambda r: r.fun)
        # the closed-form point, completed with W₂'s singular value β₁ω/(β₁ω² + c₂)
        omega = float(pred.singular_values[0])
        w2 = b1 * omega / (b1 * omega**2 + b2 * ed**2 / ee**2)
        point = np.array([float(pred.encoder_singular_values[0]),
                          float(pred.z1_decoder_singular_values[0]), w2, omega,
                          math.log(float(pred.encoder_variance[0]))])
        value, grad = fun(point)
        case = (theta, sigma_1, b1, b2, ee, ed)
        assert value <= best.fun + 1e-9, case  # no point found below the closed form
        assert np.abs(grad).max() < 1e-9, case  # and it is a stationary point
        assert bool(pred.collapsed[0]) == (omega == 0.0)
        assert bool(pred.z1_inactive[0]) == (float(pred.encoder_singular_values[0]) == 0.0)


def test_linear_hvae_conditions_of_methods_section_6():
    a = _moment([3.0, 2.0, 1.2, 0.5, 0.25])
    theta = theory.linear_hvae(a).z1_theta
    for b1, b2, ed, s1 in [(1, 1, 1, 0.45), (2, 0.5, 1, 0.3), (1, 2, 0.8, 0.6), (1, 1, 1, 1.2)]:
        pred = theory.linear_hvae(a, b1, b2, 1.0, ed, s1)
        a0 = b2 / b1 * ed**2
        ratio = s1**2 * theta**2 / (b2 * ed**2)
        # every case lies clearly on one side of both conditions (ties: the next test)
        assert abs(s1**2 / a0 - 1) > 0.01 and ((ratio / a0 - 1).abs() > 0.01).all()
        expected = (s1**2 < a0) & (ratio < a0)
        assert torch.equal(pred.collapsed, expected)
        if s1**2 > a0:
            assert not pred.collapsed.any()


def test_linear_hvae_ties_fall_on_the_collapsed_side():
    """Powers of two make both ties exact in floating point: θ = 2, σ₁ = ½ gives
    σ₁²θ²/(β₂η_dec²) = a₀ = 1; σ₁ = 1 gives σ₁² = a₀ with θ = 1 = √β₂ η_dec. At a tie the optimum
    has ω = 0 (the z₂ mode is unused), so it counts as collapsed."""
    a = torch.diag(torch.tensor([16.0, 4.0, 1.0, 0.25], dtype=torch.float64))  # θ = 4, 2, 1, ½
    theta = theory.linear_hvae(a).z1_theta
    assert theta.tolist() == [4.0, 2.0, 1.0, 0.5]
    pred = theory.linear_hvae(a, 1.0, 1.0, 1.0, 1.0, 0.5)
    assert 0.5**2 * 2.0**2 / 1.0 == 1.0  # the θ = 2 mode is exactly on σ₁²θ²/(β₂η_dec²) = a₀
    assert pred.collapsed.tolist() == [False, True, True, True]
    assert pred.singular_values[1] == 0
    pred = theory.linear_hvae(a, 1.0, 1.0, 1.0, 1.0, 1.0)  # σ₁² = a₀ = 1
    assert pred.collapsed.tolist() == [False, False, True, True]
    assert pred.singular_values[2:].eq(0).all() and (pred.singular_values[:2] > 0).all()


def test_smaller_beta_2_larger_beta_1_smaller_eta_dec_larger_sigma_1_protect_z2():
    a = _moment([3.0, 2.0, 1.2, 0.7, 0.4, 0.2])
    base = {"beta_1": 1.0, "beta_2": 1.0, "eta_enc": 1.0, "eta_dec": 1.0, "sigma_1": 0.5}
    for name, values in [("beta_2", np.linspace(3.0, 0.05, 40)),
                         ("beta_1", np.linspace(0.05, 3.0, 40)),
                         ("eta_dec", np.linspace(2.0, 0.05, 40)),
                         ("sigma_1", np.linspace(0.05, 2.0, 40))]:
        counts = [theory.linear_hvae(a, **{**base, name: float(v)}).num_collapsed
                  for v in values]
        assert counts == sorted(counts, reverse=True), name
        assert counts[0] > counts[-1], name


def test_linear_hvae_with_fewer_z2_than_z1_dimensions_pairs_the_largest_theta():
    a = _moment([3.0, 2.0, 1.2, 0.5])
    full = theory.linear_hvae(a, 1.0, 1.0, 1.0, 1.0, 0.6, latent_dim=4, latent_dim_2=4)
    part = theory.linear_hvae(a, 1.0, 1.0, 1.0, 1.0, 0.6, latent_dim=4, latent_dim_2=2)
    assert torch.allclose(part.singular_values, full.singular_values[:2])
    extra = theory.linear_hvae(a, 1.0, 1.0, 1.0, 1.0, 0.6, latent_dim=2, latent_dim_2=4)
    assert extra.collapsed[2:].all() and extra.singular_values[2:].eq(0).all()


# -------------------------------------------------------------------- fixed / adaptive σ² (§4)
def _ppca_nll(s, m, sigma2=None):
    """½[log det C + tr(C⁻¹S)], C = WWᵀ + σ²I, with its gradient (σ² free when None)."""
    d = s.shape[0]

    def fun(p):
        w = p[: d * m].reshape(d, m)
        var = math.exp(p[-1]) if sigma2 is None else sigma2
        c = w @ w.T + var * np.eye(d)
        ci = np.linalg.inv(c)
        cisci = ci @ s @ ci
        val = 0.5 * (np.linalg.slogdet(c)[1] + np.trace(ci @ s))
        grads = [(ci @ w - cisci @ w).ravel()]
        if sigma2 is None:
            grads.append([0.5 * var * (np.trace(ci) - np.trace(cisci))])
        return val, np.concatenate(grads)

    return fun, d * m + (sigma2 is None)


def test_fixed_sigma_equals_probabilistic_pca_maximum_likelihood():
    cov = _moment([2.5, 1.6, 1.1, 0.6, 0.3])
    pred = theory.linear_fixed_sigma(cov, 1.0, latent_dim=5)
    fun, n = _ppca_nll(cov.numpy(), 5, sigma2=1.0)
    w = _minimise(fun, n).x.reshape(5, 5)
    assert np.allclose(pred.singular_values.numpy(), np.linalg.svd(w, compute_uv=False),
                       atol=1e-5)
    lam = pred.theta.numpy() ** 2
    assert list(pred.collapsed.numpy()) == list(lam <= 1.0)
    assert pred.num_collapsed == 2 and pred.sigma2 == 1.0


def test_adaptive_sigma_is_the_mean_of_the_discarded_eigenvalues():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3000, 6, generator=g, dtype=torch.float64) * torch.tensor(
        [2.5, 1.6, 1.1, 0.6, 0.3, 0.2], dtype=torch.float64) + 1.0
    cov = theory.covariance(x)
    pred = theory.linear_adaptive_sigma(x, latent_dim=3)
    fun, n = _ppca_nll(cov.numpy(), 3)
    p = _minimise(fun, n).x
    assert math.isclose(pred.sigma2, math.exp(p[-1]), rel_tol=1e-5)
    pca = PCA(n_components=3).fit(x.numpy())  # its variances use 1/(N − 1)
    assert math.isclose(pred.sigma2, pca.noise_variance_ * 2999 / 3000, rel_tol=1e-8)
    # σ² below every kept eigenvalue: nothing collapses, unlike a fixed σ² = 1.5
    assert pred.num_collapsed == 0
    assert theory.linear_fixed_sigma(cov, 1.5, latent_dim=3).num_collapsed == 1


def test_adaptive_sigma_collapses_only_directions_tied_with_the_discarded_spectrum():
    cov = torch.diag(torch.tensor([4.0, 2.0, 0.0, 0.0], dtype=torch.float64))
    pred = theory.linear_adaptive_sigma(cov, latent_dim=3)
    assert pred.sigma2 == 0.0 and list(pred.collapsed) == [False, False, True]
    flat = torch.diag(torch.tensor([4.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    pred = theory.linear_adaptive_sigma(flat, latent_dim=2)
    assert pred.sigma2 == pytest.approx(1.0) and list(pred.collapsed) == [False, True]


# ------------------------------------------------------------------------ comparison helpers
def test_collapse_agreement_sorts_exchangeable_flags_only():
    pred = torch.tensor([False, False, True, True])
    meas = torch.tensor([True, False, False, True])
    assert theory.collapse_agreement(pred, meas, exchangeable=True) == 1.0
    assert theory.collapse_agreement(pred, meas, exchangeable=False) == 0.5
    assert theory.collapse_agreement(pred, torch.tensor([True] * 4)) == 0.5


def test_singular_value_error_is_relative_to_the_largest_predicted_value():
    measured = torch.tensor([0.1, 2.1, 1.0])
    predicted = torch.tensor([2.0, 0.9, 0.0])
    assert theory.singular_value_error(measured, predicted) == pytest.approx(0.1 / 2.0)
    assert theory.singular_value_error(torch.tensor([0.3]), torch.tensor([0.0])) == \
        pytest.approx(0.3)


@pytest.mark.parametrize("kw,field", [({"beta": -1.0}, "beta"), ({"eta_dec": 0.0}, "eta_dec"),
                                      ({"latent_dim": 0}, "latent_dim"),
                                      ({"learnable_variance": False}, "encoder_std")])
def test_bad_arguments_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        theory.linear_vae(torch.eye(3), **kw)


# ----------------------------------------------------------------------------------- slow
def _brute_force_hvae(a, d1, d2, b1, b2, ee, ed, s1, restarts=4):
    """Minimise 2η_dec² × the expected HVAE loss over full U, W₁, W₂, V and log s₂²."""
    d = a.shape[0]
    sizes = [d * d1, d1 * d, d2 * d1, d1 * d2, d2]

    def split(p):
        parts = torch.split(p, sizes)
        return (parts[0].reshape(d, d1), parts[1].reshape(d1, d), parts[2].reshape(d2, d1),
                parts[3].reshape(d1, d2), parts[4].exp())

    def fun(p):
        p = torch.tensor(p, requires_grad=True)
        u, w1, w2, v, s2 = split(p)
        r = torch.eye(d, dtype=a.dtype) - u @ w1
        m1 = w1 @ a @ w1.T + s1**2 * torch.eye(d1, dtype=a.dtype)
        r2 = torch.eye(d1, dtype=a.dtype) - v @ w2
        val = (torch.trace(r @ a @ r.T) + s1**2 * (u**2).sum()
               + b1 * (torch.trace(r2 @ m1 @ r2.T) + (v**2 * s2).sum())
               + b2 * (ed**2 / ee**2 * (torch.trace(w2 @ m1 @ w2.T) + s2.sum())
                       - ed**2 * s2.log().sum()))
        val.backward()
        return val.item(), p.grad.numpy()

    u, w1, _, v, _ = split(torch.tensor(_minimise(fun, sum(sizes), restarts, maxiter=20000).x))
    return torch.linalg.svdvals(v), torch.linalg.svdvals(u), torch.linalg.svdvals(
        w1 @ torch.linalg.cholesky(a))


@SLOW
@pytest.mark.parametrize("b1,b2,ee,ed,s1,d2", [(1, 1, 1, 1, 1.2, 3), (1, 1, 1, 1, 0.5, 3),
                                               (1, 2, 0.7, 1, 0.8, 3), (2, 0.5, 1, 1, 0.3, 3),
                                               (2, 0.5, 1, 1, 0.3, 2), (1, 1, 1, 1, 0.2, 3)])
def test_linear_hvae_equals_minimum_of_the_expected_loss_over_full_matrices(b1, b2, ee, ed,
                                                                            s1, d2):
    a = _moment([3.0, 1.5, 0.6])
    pred = theory.linear_hvae(a, b1, b2, ee, ed, s1, latent_dim=3, latent_dim_2=d2)
    omega, u, lam = _brute_force_hvae(a, 3, d2, b1, b2, ee, ed, s1)
    assert torch.allclose(pred.singular_values, omega, atol=1e-4)
    assert torch.allclose(pred.z1_decoder_singular_values, u, atol=1e-4)
    assert torch.allclose(pred.encoder_singular_values, lam, atol=1e-4)


@SLOW
@pytest.mark.parametrize("seed", range(6))
def test_linear_vae_fixed_variance_random_problems(seed):
    rng = np.random.default_rng(seed)
    a = _moment(list(rng.uniform(0.2, 3.0, size=4)), seed=seed)
    sigma = list(rng.uniform(0.3, 2.0, size=3))
    beta, eta_enc, eta_dec = rng.uniform(0.3, 2.0, size=3)
    pred = theory.linear_vae(a, beta, eta_enc, eta_dec, learnable_variance=False,
                             encoder_std=sigma, latent_dim=3)
    _check_vae_optimum(a, pred, beta, eta_enc, eta_dec, sigma=sigma)
