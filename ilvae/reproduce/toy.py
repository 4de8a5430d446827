"""Study ``toy`` (METHODS §3, §7; Kinoshita et al., ICML 2023, toy-data figures).

Two-Gaussian data, means (0, 0) and (10, 10), common σ. For σ in a grid and L in a grid, six
models: GMVAE (free component means, MLP decoder), LIDMVAE (L₁ = L₂ = 0), IL-LIDMVAE
(L₁ = L₂ = L), and VAE (MLP decoder), LIDVAE (L = 0), IL-LIDVAE (L).

Posterior accuracy:
* mixture models: accuracy of argmax q(c|x) after Hungarian matching of the 2 clusters to the
  2 components (``cluster_accuracy``);
* VAE models (no discrete latent): accuracy of a logistic regression fitted on the training
  posterior means E_q[z|x] and scored on the test posterior means — how much of the component
  identity the continuous posterior keeps (``posterior_accuracy``).
Both are compared with the Bayes limit Φ(7.071/σ) (``bayes_accuracy``), 0.5 meaning a posterior
that ignores the data. The relative Fisher divergence E‖∇_z log p(x|z)‖² (z from the encoder) is
reported with the bound m·L²/σ_dec² of a Gaussian L-inverse-Lipschitz decoder (σ_dec = 1 here).
"""

from __future__ import annotations

import math

import torch

from ilvae.reproduce.common import StudyContext, evaluate, fit

TITLE = "Toy data: posterior collapse against σ and L (Kinoshita et al., 2023)"


def _decoder(kind: str, L: float) -> dict:
    if kind == "mlp":
        return {"class_path": "mlp", "init_args": {"hidden": [64, 64], "likelihood": "gaussian"}}
    return {"class_path": "il_brenier", "init_args": {"L": L, "hidden": [64, 64],
                                                       "likelihood": "gaussian"}}


def _models(L_grid: list[float]) -> list[tuple[str, str, float, dict]]:
    """(family, name, L, kwargs)."""
    out = [("mixture", "GMVAE", math.nan, {"L1": None, "decoder": _decoder("mlp", 0)}),
           ("vae", "VAE", math.nan, {"decoder": _decoder("mlp", 0)})]
    for L in L_grid:
        mix = "LIDMVAE" if L == 0 else "IL-LIDMVAE"
        vae = "LIDVAE" if L == 0 else "IL-LIDVAE"
        out.append(("mixture", mix, L, {"L1": L, "decoder": _decoder("il", L)}))
        out.append(("vae", vae, L, {"decoder": _decoder("il", L)}))
    return out


def _adam(params):
    return torch.optim.Adam(params, lr=3e-3)


def _posterior_accuracy(model, x_train, y_train, x_test, y_test) -> float:
    from sklearn.linear_model import LogisticRegression

    with torch.no_grad():
        f_train = model.encode(x_train).loc.numpy()
        f_test = model.encode(x_test).loc.numpy()
    clf = LogisticRegression(max_iter=1000).fit(f_train, y_train.numpy())
    return float(clf.score(f_test, y_test.numpy()))


def _cluster_accuracy(model, x, y) -> float:
    from ilvae.metrics import ClusterAccuracy

    metric = ClusterAccuracy(num_clusters=2, num_classes=2)
    with torch.no_grad():
        metric.update(model.cluster_probabilities(x), y)
    return float(metric.compute())


def run(ctx: StudyContext) -> None:
    from ilvae.datamodules import TwoGaussians
    from ilvae.models import VAE
    from ilvae.models.mixture import MixtureVAE

    sigmas = [2.5, 7.5] if ctx.quick else [0.5, 1.0, 2.5, 5.0, 7.5]
    L_grid = [0.0, 1.0, 5.0] if ctx.quick else [0.0, 0.5, 1.0, 2.0, 5.0]
    n = 10000
    # Adam 3e-3, batch 256: the settings measured to converge on this data (models/mixture.py).
    steps = 1000 if ctx.quick else 3000
    scatter: dict[tuple[str, float], tuple] = {}  # posterior means at the largest σ, for plots
    for sigma in sigmas:
        dm = TwoGaussians(sigma=sigma, num_samples=n, batch_size=256, seed=ctx.seed)
        dm.setup("fit")
        x_train, y_train = dm.tensors("train")
        x_test, y_test = dm.tensors("test")
        for family, name, L, kwargs in _models(L_grid):
            torch.manual_seed(ctx.seed)
            kwargs = dict(kwargs, optimizer=_adam)
            if family == "mixture":
                model = MixtureVAE(data_shape=(2,), latent_dim=2, num_components=2,
                                   classifier_hidden=[64], lr_scheduler=None, **kwargs)
            else:
                model = VAE(data_shape=(2,), latent_dim=2,
                            encoder={"class_path": "ilvae.encoders.MLPEncoder",
                                     "init_args": {"hidden": [64]}}, **kwargs)
            sec = fit(ctx, f"sigma{sigma:g}_{name}_L{L:g}", model, dm, max_steps=steps,
                      max_epochs=-1, gradient_clip_val=5.0)
            model.eval()
            metrics = evaluate(model, x_test, iw_samples=0, fisher=True)
            if family == "mixture":
                acc = _cluster_accuracy(model, x_test, y_test)
            else:
                acc = _posterior_accuracy(model, x_train, y_train, x_test, y_test)
            if sigma == max(sigmas):
                with torch.no_grad():
                    loc = model.encode(x_test[:2000]).loc
                scatter[(name, L)] = (loc.numpy(), y_test[:2000].numpy(), acc)
            ctx.add_row(model=name, family=family, sigma=sigma, L=L,
                        accuracy=acc, bayes_accuracy=dm.bayes_accuracy,
                        relative_fisher=metrics["relative_fisher"],
                        relative_fisher_bound=metrics["relative_fisher_bound"],
                        kl=metrics["kl"], active_units=metrics["active_units"],
                        mutual_info=metrics["mutual_info"], seconds_per_epoch=sec)
    _full_size(ctx, steps)
    _report(ctx, sigmas, L_grid)
    _scatter(ctx, scatter, max(sigmas))


def _full_size(ctx: StudyContext, steps: int) -> None:
    """Expected full-size time: each model kind's measured seconds per step × its full steps."""
    per_step: dict[str, list[float]] = {}
    for run_name, seconds, n in ctx.timings:
        per_step.setdefault(run_name.split("_")[1], []).append(seconds / max(n, 1))
    mean = {k: sum(v) / len(v) for k, v in per_step.items()}
    full_L = [0.0, 0.5, 1.0, 2.0, 5.0]
    full_runs = [name for _, name, _, _ in _models(full_L)] * 5  # five σ values
    ctx.expect_full_size(sum(mean.get(name, max(mean.values())) * 3000 for name in full_runs),
                         f"{len(full_runs)} runs of 3,000 steps at each model's seconds per "
                         f"step measured here ({ctx.seconds_per_step() * 1e3:.1f} ms on average),"
                         " training only")


def _report(ctx: StudyContext, sigmas: list[float], L_grid: list[float]) -> None:
    rows = ctx.rows
    cols = ["model", "sigma", "L", "accuracy", "bayes_accuracy", "relative_fisher",
            "relative_fisher_bound", "kl", "active_units"]
    ctx.add_table("Posterior accuracy and relative Fisher divergence", rows, cols,
                  note="accuracy: cluster accuracy of q(c|x) for mixture models, "
                  "logistic-regression accuracy on E_q[z|x] for VAE models; Bayes limit "
                  "Φ(7.071/σ).")
    top = max(L_grid)
    big = max(sigmas)

    def get(name: str, sigma: float, L: float | None = None) -> dict | None:
        for r in rows:
            if r["model"] == name and r["sigma"] == sigma and (
                    L is None or r["L"] == L):
                return r
        return None

    il_mix, lid_mix = get("IL-LIDMVAE", big, top), get("LIDMVAE", big, 0.0)
    if il_mix and lid_mix:
        ctx.finding(f"σ = {big:g}: IL-LIDMVAE (L₁ = L₂ = {top:g}) reaches near the Bayes limit "
                    f"({il_mix['bayes_accuracy']:.3f})",
                    il_mix["accuracy"] >= il_mix["bayes_accuracy"] - 0.05,
                    f"accuracy {il_mix['accuracy']:.3f}")
        ctx.finding(f"σ = {big:g}: LIDMVAE (L = 0) collapses toward 0.5",
                    lid_mix["accuracy"] <= 0.65,
                    f"accuracy {lid_mix['accuracy']:.3f}")
    one = get("IL-LIDMVAE", big, 1.0)
    if one:
        ctx.finding(f"σ = {big:g}: IL-LIDMVAE with L₁ = L₂ = 1 reaches near the Bayes limit",
                    one["accuracy"] >= one["bayes_accuracy"] - 0.05,
                    f"accuracy {one['accuracy']:.3f}")
    il_vae, lid_vae = get("IL-LIDVAE", big, top), get("LIDVAE", big, 0.0)
    if il_vae and lid_vae:
        ctx.finding(f"σ = {big:g}: IL-LIDVAE keeps more component information than LIDVAE",
                    il_vae["accuracy"] >= lid_vae["accuracy"],
                    f"IL {il_vae['accuracy']:.3f} vs L=0 {lid_vae['accuracy']:.3f}")
    bound_ok = [r for r in rows if not math.isnan(r["relative_fisher_bound"])]
    if bound_ok:
        ctx.finding("Relative Fisher divergence ≥ m·L²/σ² for every IL model (on test data, "
                    "z from the encoder)",
                    all(r["relative_fisher"] >= r["relative_fisher_bound"] for r in bound_ok),
                    "; ".join(f"{r['model']} σ={r['sigma']:g} L={r['L']:g}: "
                              f"{r['relative_fisher']:.3g} ≥ {r['relative_fisher_bound']:.3g}"
                              for r in bound_ok if r["L"] > 0))
    _plots(ctx, sigmas, L_grid)


def _plots(ctx: StudyContext, sigmas: list[float], L_grid: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    rows = ctx.rows
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    grid = torch.linspace(min(sigmas), max(sigmas), 100)
    axes[0].plot(grid, norm.cdf(7.071 / grid), "k--", label="Bayes limit Φ(7.071/σ)")
    names = sorted({(r["model"], r["L"]) for r in rows}, key=lambda t: (t[0], str(t[1])))
    for name, L in names:
        pts = sorted((r["sigma"], r["accuracy"]) for r in rows
                     if r["model"] == name and (r["L"] == L or (math.isnan(L)
                                                               and math.isnan(r["L"]))))
        label = name if math.isnan(L) else f"{name} L={L:g}"
        axes[0].plot(*zip(*pts, strict=True), "o-", label=label)
    axes[0].set_xlabel("σ")
    axes[0].set_ylabel("posterior accuracy")
    axes[0].legend(fontsize=7)
    for sigma in sigmas:
        pts = sorted((r["L"], r["relative_fisher"]) for r in rows
                     if r["model"] in ("LIDVAE", "IL-LIDVAE") and r["sigma"] == sigma)
        if pts:
            axes[1].plot(*zip(*pts, strict=True), "o-", label=f"IL-LIDVAE σ={sigma:g}")
    ls = torch.linspace(0, max(L_grid), 50)
    axes[1].plot(ls, 2 * ls**2, "k--", label="bound m·L²/σ_dec² (m = 2)")
    axes[1].set_xlabel("L")
    axes[1].set_ylabel("relative Fisher divergence")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    ctx.add_plot(fig, "toy", "Left: posterior accuracy against σ with the Bayes limit. Right: "
                 "relative Fisher divergence of (IL-)LIDVAE against L with the m·L²/σ² bound.")


def _scatter(ctx: StudyContext, scatter: dict, sigma: float) -> None:
    """Posterior means E_q[z|x] of test points coloured by their true component, one panel per
    model (the style of the IL paper's toy figures)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [[k for k in scatter if k[0] in ("GMVAE", "LIDMVAE", "IL-LIDMVAE")],
                [k for k in scatter if k[0] in ("VAE", "LIDVAE", "IL-LIDVAE")]]
    cols = max(len(f) for f in families)
    fig, axes = plt.subplots(2, cols, figsize=(2.6 * cols, 5.4), squeeze=False)
    for r, keys in enumerate(families):
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(keys):
                ax.axis("off")
                continue
            name, L = keys[c]
            loc, label, acc = scatter[keys[c]]
            for k, colour in ((0, "tab:blue"), (1, "tab:orange")):
                pts = loc[label == k]
                ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.4, c=colour)
            title = name if math.isnan(L) else f"{name} L={L:g}"
            ax.set_title(f"{title}\nacc {acc:.3f}", fontsize=8)
            ax.tick_params(labelsize=6)
    fig.tight_layout()
    ctx.add_plot(fig, "toy_posterior", f"Posterior means E_q[z|x] of 2,000 test points at "
                 f"σ = {sigma:g}, coloured by the true component (top: mixture models, bottom: "
                 "VAE models). A collapsed posterior puts both colours on one blob.")
