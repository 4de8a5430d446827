"""Plots of the ``remedies`` study: the IW-NLL / mutual-information trade-off of each remedy and
its per-dimension KL."""

from __future__ import annotations

import math
from typing import Any

from ilvae.reproduce.common import StudyContext


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def nll_against_mi(ctx: StudyContext, summary: dict[tuple[str, str], dict[str, Any]],
                   names: list[str], regimes: list[tuple[str, int]]) -> None:
    """Test IW-NLL (grey levels) against mutual information, one point per Bernoulli remedy
    (mean over seeds, bars: standard deviation), one panel per regime."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(regimes), figsize=(5.5 * len(regimes), 4.2), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    markers = "os^vDP*Xhp<>"
    for ax, (regime, depth) in zip(axes[0], regimes, strict=True):
        for i, name in enumerate(names):
            row = summary.get((regime, name))
            if row is None or row["likelihood"] != "Bernoulli":
                continue
            xerr = 0.0 if math.isnan(row["mutual_info_sd"]) else row["mutual_info_sd"]
            yerr = 0.0 if math.isnan(row["iw_nll_sd"]) else row["iw_nll_sd"]
            # The same colour and marker for a remedy in every panel.
            ax.errorbar(row["mutual_info_mean"], row["iw_nll_mean"], xerr=xerr, yerr=yerr,
                        fmt=markers[i % len(markers)], color=colors[i % len(colors)],
                        capsize=2, label=name)
        ax.set_xlabel("mutual information I(x; z) (nats)")
        ax.set_ylabel("test IW-NLL, grey levels (nats)")
        ax.set_title(f"{regime} decoder ({depth} hidden layer{'s' if depth > 1 else ''})")
    axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    ctx.add_plot(fig, "nll_vs_mi", "The trade-off each remedy makes: test IW-NLL (lower is "
                 "better) against the mutual information between x and z (higher: less "
                 "collapse). AR-ELBO (a Gaussian density) is left out.")


def kl_bars(ctx: StudyContext, summary: dict[tuple[str, str], dict[str, Any]],
            names: list[str], regimes: list[tuple[str, int]],
            floors: dict[str, float]) -> None:
    """Per-dimension test KL of each remedy, dimensions sorted by KL, one bar colour per
    regime; the free-bits λ as a dashed line."""
    plt = _pyplot()
    cols = 4
    n_rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.2 * cols, 2.2 * n_rows), squeeze=False,
                             sharey=True)
    width = 0.8 / len(regimes)
    for ax, name in zip(axes.flat, names, strict=False):
        for i, (regime, _) in enumerate(regimes):
            row = summary.get((regime, name))
            if row is None:
                continue
            values = sorted(row["kl_per_dim_mean"], reverse=True)
            ax.bar([j + i * width for j in range(len(values))], values, width=width,
                   label=regime)
        if name in floors:
            ax.axhline(floors[name], color="tab:red", ls="--", lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("KL (nats)")
    fig.tight_layout()
    ctx.add_plot(fig, "kl_per_dimension", "Test KL of each latent dimension per remedy "
                 "(dimensions sorted by KL, mean over seeds); blue: shallow decoder, orange: "
                 "deep decoder; dashed: the free-bits λ.")
