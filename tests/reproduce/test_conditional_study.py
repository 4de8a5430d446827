"""``ilvae reproduce conditional`` (Dang et al., ICLR 2024; METHODS §6): the linear CVAE trained
by the study collapses exactly the latents the closed form predicts, with the prediction
recomputed here from the data by numpy; the exact objective, the IW-NLL adapter and the exact
NLL the study relies on are checked against independent Monte Carlo computations."""

import json
import math

import numpy as np
import pytest
import torch

from ilvae import reproduce
from ilvae.reproduce import conditional as study

EPS = 0.01


def _numpy_residual_eigenvalues(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """θ = eigenvalues of E = E[yyᵀ] − E[yxᵀ]E[xxᵀ]⁺E[xyᵀ] of the centred pairs, by least
    squares in numpy (not ilvae.theory): E = E[r rᵀ] with r the residual of y on x."""
    x = x.flatten(1).double().numpy()
    y = y.flatten(1).double().numpy()
    x, y = x - x.mean(0), y - y.mean(0)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    r = y - x @ coef
    return np.sort(np.linalg.eigvalsh(r.T @ r / len(r)))[::-1]


def _check_linear_rows(rows, latent_dim):
    from ilvae.datamodules.conditional import MNIST5kQuarters

    x, y, _ = MNIST5kQuarters(seed=0, val_fraction=0.1).tensors("train")
    theta = {"real": _numpy_residual_eigenvalues(x, y)}
    lin = [r for r in rows if r.get("model") == "ConditionalVAE(linear)"]
    assert lin
    for row in lin:
        tau = row["beta"] * row["eta_dec"] ** 2
        if row["x"] == "real":
            expected = theta["real"][:latent_dim]
            assert np.allclose(row["theta"], expected, rtol=1e-6, atol=1e-9)
        else:  # the control: x shuffled, so E is near the covariance of y
            expected = np.array(row["theta"])
            # In-sample, a least-squares fit on 196 unrelated inputs still explains about
            # 196/3600 ≈ 5 % of y's second moment.
            assert row["residual_fraction"] > 0.9
        assert row["predicted_collapsed"] == int((expected < tau).sum())
        kl_star = np.maximum(0.5 * np.log(np.maximum(expected, 1e-300) / tau), 0.0)
        assert row["predicted_epsilon_collapsed"] == int((kl_star < EPS).sum())
        # The trained linear CVAE: the measured count and every dimension's KL.
        assert row["epsilon_collapsed"] == row["predicted_epsilon_collapsed"], row
        measured = np.sort(row["kl_per_dim"])[::-1]
        assert np.abs(measured - kl_star).max() < 2e-3, (row["beta"], row["eta_dec"])
        # The IW estimate of −log p(y|x) is an upper bound of the exact value up to MC noise;
        # with K = 20 draws for 588 pixels its gap is a few nats (≈ 1–2 % of the NLL here).
        assert row["nll_exact"] - 0.05 < row["iw_nll"] < row["nll_exact"] + 5.0
    return lin


def _findings(report: str) -> dict[str, bool]:
    lines = report.split("| claim | agrees |")[1].split("\n\n")[0].splitlines()[2:]
    return {ln.split(" | ")[0].lstrip("| "): ln.split(" | ")[1] == "yes" for ln in lines}


def test_tiny_grid_linear_cvae_collapses_what_the_closed_form_predicts(tmp_path):
    ctx = reproduce.run_study("conditional", tmp_path, quick=True, betas=[1.0, 4.0],
                              etas=[0.5], control_etas=[0.5], epochs=1, iw_samples=20)
    lin = _check_linear_rows(ctx.rows, 16)
    assert sorted((r["x"], r["beta"]) for r in lin) == [("real", 1.0), ("real", 4.0),
                                                         ("shuffled", 1.0), ("shuffled", 4.0)]
    # The settings cross the threshold: the counts differ between β = 1 and β = 4.
    real = {r["beta"]: r["epsilon_collapsed"] for r in lin if r["x"] == "real"}
    assert real[1.0] < real[4.0]
    report = (tmp_path / "report.md").read_text()
    findings = _findings(report)
    linear = [ok for claim, ok in findings.items() if claim.startswith("Linear CVAE")]
    assert linear == [True]
    assert (tmp_path / "conditional.png").stat().st_size > 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert all(r["seed"] == 0 for r in rows)
    assert any(r.get("model") == "runtime estimate" and r["estimated_seconds"] > 0
               for r in rows)
    assert (tmp_path / "runs" / "linear_real_beta1_eta0.5").is_dir()
    assert "full, mnist5k" in report and "total (h)" in report
    assert all(r["data"].startswith("MNIST5k quarters") for r in lin)


@pytest.mark.slow
def test_quick_study_agrees_with_the_closed_form_in_every_setting(tmp_path):
    ctx = reproduce.run_study("conditional", tmp_path, quick=True)
    lin = _check_linear_rows(ctx.rows, 16)
    assert len(lin) == 12
    report = (tmp_path / "report.md").read_text()
    findings = _findings(report)
    assert len(findings) == 4
    assert [ok for c, ok in findings.items() if c.startswith("Linear CVAE")] == [True]
    for name in ("report.md", "results.json", "conditional.png"):
        assert (tmp_path / name).stat().st_size > 0


# -- the pieces the study relies on ------------------------------------------------------------


def _random_linear(beta=1.5, eta=0.7, m=3, dx=2, dy=4, seed=0):
    torch.manual_seed(seed)
    model = study.ExactLinearCVAE(data_shape=(dx,), target_shape=(dy,), latent_dim=m,
                                  beta=beta, eta_dec=eta).double()
    with torch.no_grad():
        for p in (model.encoder.weight.weight, model.decoder.weight.weight):
            p.normal_(0, 0.6)
        model.encoder.log_scale.normal_(-0.3, 0.3)
    x = torch.randn(64, dx, dtype=torch.float64)
    y = x @ torch.randn(dx, dy, dtype=torch.float64) + torch.randn(64, dy, dtype=torch.float64)
    return model, x, y


def test_exact_expected_loss_is_the_mean_of_the_monte_carlo_loss():
    """The study's closed-form objective = E_q[−log p(y|x,z)] + β Σ KL, averaged over pairs,
    estimated here by the model's own reparameterised forward pass."""
    model, x, y = _random_linear()
    exact = float(model.expected_loss(x, y).detach())
    torch.manual_seed(1)
    draws = []
    with torch.no_grad():
        for _ in range(4000):
            out = model(x, y)
            draws.append(float((-out["log_py"] + model.beta * out["kl"].sum(1)).mean()))
    draws = np.array(draws)
    assert abs(draws.mean() - exact) < 4 * draws.std() / math.sqrt(len(draws))
    assert abs(draws.mean() - exact) < 0.01 * abs(exact)


def test_profiled_decoder_is_the_least_squares_optimum():
    """U* of the variable projection minimises the exact loss over the decoder: the gradient
    of the loss in U vanishes there, and the profiled loss is the loss at U*."""
    model, x, y = _random_linear()
    u = torch.cat([x, y], dim=1)
    moment = u.T @ u / len(u)
    model._prepare(moment)
    loss, w, u_star = model._profile(moment)
    with torch.no_grad():
        model.encoder.weight.weight.copy_(w)
        model.decoder.weight.weight.copy_(u_star)
    assert torch.allclose(w, model.encoder.weight.weight)
    model.zero_grad()
    direct = model.expected_loss(x, y)
    direct.backward()
    assert math.isclose(float(direct), float(loss), rel_tol=1e-10)
    assert float(model.decoder.weight.weight.grad.abs().max()) < 1e-8
    assert float(model.encoder.weight.weight.grad.abs().max()) > 1e-3  # W is not optimal yet


def test_iw_nll_of_the_joint_view_converges_to_the_exact_conditional_nll():
    """−log p(y|x) of a linear CVAE: the IW estimate through the study's JointView (any q,
    many draws) against the exact Gaussian marginal N(U₂x, U₁U₁ᵀ + η²I) of exact_nll, which is
    itself checked against a direct numpy evaluation of the Gaussian density."""
    from ilvae.metrics import ImportanceWeightedNLL

    model, x, y = _random_linear(m=2)
    x, y = x[:16], y[:16]
    with torch.no_grad():  # a broad proposal q(z|x,y) ≈ N(small, 1.5²) that covers p(z|x,y)
        model.encoder.weight.weight.mul_(0.1)
        model.encoder.log_scale.fill_(math.log(1.5))
    u = model.decoder.weight.weight.detach().numpy()
    cov = u[:, :2] @ u[:, :2].T + 0.49 * np.eye(4)
    diff = y.numpy() - x.numpy() @ u[:, 2:].T
    _, logdet = np.linalg.slogdet(cov)
    maha = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
    numpy_nll = float(np.mean(0.5 * (maha + logdet + 4 * math.log(2 * math.pi))))
    assert math.isclose(study.exact_nll(model, x, y), numpy_nll, rel_tol=1e-9)
    torch.manual_seed(0)
    iw = ImportanceWeightedNLL(num_samples=20000)
    iw.update(torch.cat([x, y], dim=1), study.JointView(model))
    assert abs(float(iw.compute()) - numpy_nll) < 0.02
