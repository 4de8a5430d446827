"""The rows of the ``remedies`` study: one declarative :class:`Remedy` spec per collapse remedy
(model, encoder and decoder arguments, callbacks, the claims of its paper), whether this build
can train it, and the check of those claims against the measured table."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

LATENT = 16
ENCODER = "ilvae.encoders.MLPEncoder"
BETA = 0.5
FREE_BITS = 0.5
KL_TARGET = 40.0
BN_GAMMA = 0.5
DELTA = 2.0  # δ-VAE committed rate, nats in total over the latent dimensions
MMD_WEIGHT = 1000.0
#: Relative slack of the "at least" checks, and the band of the target-KL check.
FLOOR_SLACK = 0.05
TARGET_BAND = 0.1
#: The MI estimator is capped at log N: a VAE within this many nats of the cap is saturated, and
#: "more MI" is then checked as "at least as much, within MI_TIE nats".
MI_SATURATED, MI_TIE = 0.1, 0.05


# ------------------------------------------------------------------ the rows
@dataclass(frozen=True)
class Claim:
    """A statement of a remedy's paper that the table can check.

    ``kind``: ``kl_at_least`` (test KL ≥ value), ``per_dim_kl_at_least`` (every dimension's test
    KL ≥ value), ``kl_near`` (|KL − value| ≤ 10 % of value), ``more_kl_than_vae``,
    ``more_mi_than_vae``, ``more_active_than_vae`` (at least as many active units, strictly
    more when the VAE leaves some inactive) or ``all_active`` (every latent active). The floors
    allow 5 % slack (test data, not the training batches the guarantee is made on).
    """

    kind: str
    text: str
    value: float = math.nan


CLAIM_KINDS = ("kl_at_least", "per_dim_kl_at_least", "kl_near", "more_kl_than_vae",
               "more_mi_than_vae", "more_active_than_vae", "all_active")


@dataclass(frozen=True)
class Remedy:
    """One row: what to change against the plain VAE.

    ``decoder`` is a registered decoder name or a class path; every decoder also gets the
    regime's ``hidden`` widths and the encoder ``hidden=[512]``. ``callbacks`` are (class path,
    arguments as a function of the run's optimisation steps).
    """

    name: str
    what: str
    decoder: str = "mlp"
    decoder_args: dict[str, Any] = field(default_factory=dict)
    encoder_args: dict[str, Any] = field(default_factory=dict)
    model_args: dict[str, Any] = field(default_factory=dict)
    callbacks: tuple[tuple[str, Callable[[int], dict[str, Any]]], ...] = ()
    model_class: str = "ilvae.models.VAE"
    claims: tuple[Claim, ...] = ()


def remedies() -> list[Remedy]:
    """Every row of the table, in the report's order."""
    anneal = "ilvae.callbacks.KLAnnealing"
    ready = [
        Remedy("vae", "the plain ELBO (Kingma & Welling 2014)"),
        Remedy("beta_vae", f"β = {BETA:g} (KL weight; Higgins et al. 2017)",
               model_args={"beta": BETA},
               claims=(Claim("more_kl_than_vae", f"β = {BETA:g} < 1 keeps more information in "
                             "the latent than the VAE (higher KL)"),)),
        Remedy("kl_annealing", "β warmed up linearly from 0 to 1 over the first half of the "
               "steps (Bowman et al. 2016)", callbacks=((anneal, lambda n: {"length": n // 2}),)),
        Remedy("cyclical", "β cycled from 0 to 1 four times, ramp over half a cycle (Fu et al. "
               "2019)", callbacks=((anneal, lambda n: {"length": n, "cycles": 4,
                                                         "ratio": 0.5}),)),
        Remedy("free_bits", f"Σ_i max(λ, KL_i), λ = {FREE_BITS:g} nats (Kingma et al. 2016)",
               model_args={"free_bits": FREE_BITS},
               claims=(Claim("per_dim_kl_at_least", f"free bits: every dimension's KL ≥ λ = "
                             f"{FREE_BITS:g} nats", FREE_BITS),)),
        Remedy("target_kl", f"β ∈ [0, 1] PI-controlled towards KL = {KL_TARGET:g} nats "
               "(ControlVAE, Shao et al. 2020)",
               callbacks=(("ilvae.callbacks.TargetKLController",
                           lambda n: {"kl_target": KL_TARGET, "kp": 0.01, "ki": 1e-3}),),
               claims=(Claim("kl_near", f"target KL: test KL within {TARGET_BAND:.0%} of "
                             f"{KL_TARGET:g} nats", KL_TARGET),)),
        Remedy("ar_elbo", "Gaussian decoder, variance set to its batch optimum (Takida et al. "
               "2022)", decoder="ar_elbo"),
        Remedy("lidvae", "injective Brenier decoder, L = 0 (Wang et al. 2021)",
               decoder="il_brenier", decoder_args={"L": 0.0},
               claims=(Claim("all_active", "LIDVAE keeps every latent active"),)),
        Remedy("il_lidvae", "inverse-Lipschitz Brenier decoder, L = 1 (Kinoshita et al. 2023)",
               decoder="il_brenier", decoder_args={"L": 1.0},
               claims=(Claim("all_active", "IL-LIDVAE keeps every latent active"),)),
    ]
    pending = {r.name: r for r in pending_remedies()}
    order = ["vae", "beta_vae", "kl_annealing", "cyclical", "free_bits", "target_kl", "lagging",
             "bn_vae", "delta_vae", "skip_vae", "mmd_vae", "ar_elbo", "lidvae", "il_lidvae"]
    by_name = {r.name: r for r in ready} | pending
    return [by_name[name] for name in order]


def pending_remedies() -> list[Remedy]:
    """The five rows whose parts are the newest in the package (a row whose arguments the build
    lacks is reported as not available, never guessed around)."""
    return [
        Remedy("lagging", "encoder updated to convergence while it lags the decoder (He et al. "
               "2019)", model_class="ilvae.models.LaggingVAE",
               claims=(Claim("more_mi_than_vae", "lagging inference: higher mutual information "
                             "than the VAE"),)),
        Remedy("bn_vae", f"posterior means batch-normalised, fixed γ = {BN_GAMMA:g} (Zhu et al. "
               "2020)", encoder_args={"mean_batch_norm_gamma": BN_GAMMA},
               claims=(Claim("kl_at_least", f"BN-VAE: KL ≥ m γ²/2 = {LATENT * BN_GAMMA**2 / 2:g} "
                             "nats", LATENT * BN_GAMMA**2 / 2),)),
        Remedy("delta_vae", f"posterior variances bounded to a committed rate δ = {DELTA:g} nats "
               "(Razavi et al. 2019)", encoder_args={"committed_rate": DELTA},
               claims=(Claim("kl_at_least", f"δ-VAE: KL ≥ δ = {DELTA:g} nats for every x",
                             DELTA),)),
        Remedy("skip_vae", "z fed to every decoder layer (Dieng et al. 2019)",
               decoder="skip_mlp",
               claims=(Claim("more_active_than_vae", "Skip-VAE: more active units than the "
                             "VAE"),)),
        Remedy("mmd_vae", f"KL replaced by {MMD_WEIGHT:g} · MMD(q(z), p(z)) (MMD-VAE "
               "form of InfoVAE, Zhao et al. 2019)",
               model_class="ilvae.models.MMDVAE", model_args={"mmd_weight": MMD_WEIGHT},
               claims=(Claim("more_mi_than_vae", "MMD-VAE: higher mutual information than the "
                             "VAE"),)),
    ]


def _unknown_arguments(cls: type, kwargs: dict[str, Any]) -> list[str]:
    parameters = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return []
    return sorted(set(kwargs) - set(parameters))


def unavailable(remedy: Remedy) -> str | None:
    """Why this build cannot train ``remedy`` (a missing class, decoder or argument), or None."""
    from ilvae import decoders
    from ilvae._config import import_class

    try:
        parts = [(import_class(remedy.model_class), remedy.model_args, remedy.model_class),
                 (import_class(ENCODER), remedy.encoder_args, ENCODER),
                 (decoders.resolve(remedy.decoder), remedy.decoder_args,
                  f"decoder {remedy.decoder!r}")]
        parts += [(import_class(path), make(100), path) for path, make in remedy.callbacks]
    except (ImportError, AttributeError, ValueError) as exc:
        return str(exc)
    for cls, kwargs, label in parts:
        unknown = _unknown_arguments(cls, kwargs)
        if unknown:
            return f"{label} has no argument {', '.join(unknown)}"
    return None


# ------------------------------------------------------------------ checks
def check(summary: dict[str, dict[str, Any]], rows: list[Remedy], latent: int = LATENT,
          mi_cap: float = math.inf) -> list[tuple[str, bool, str]]:
    """(claim, agrees, evidence) for every claim of every row present in ``summary`` (one
    regime's :func:`summarise` rows by remedy name). Claims against the VAE need its row;
    ``mi_cap`` is the ceiling log N of the mutual-information estimator."""
    out = []
    vae = summary.get("vae")
    for remedy in rows:
        row = summary.get(remedy.name)
        if row is None:
            continue
        for claim in remedy.claims:
            if claim.kind not in CLAIM_KINDS:
                raise ValueError(f"claim kind={claim.kind!r} is not allowed: expected one of "
                                 f"{', '.join(CLAIM_KINDS)}")
            if claim.kind.endswith("_than_vae") and vae is None:
                continue
            out.append((claim.text, *_verdict(claim, row, vae, latent, mi_cap)))
    return out


def _verdict(claim: Claim, row: dict[str, Any], vae: dict[str, Any] | None,
             latent: int, mi_cap: float) -> tuple[bool, str]:
    kl, au, mi = row["kl_mean"], row["active_units_mean"], row["mutual_info_mean"]
    if claim.kind == "kl_at_least":
        return kl >= claim.value * (1 - FLOOR_SLACK), f"KL {kl:.3g} vs {claim.value:g}"
    if claim.kind == "per_dim_kl_at_least":
        low = min(row["kl_per_dim_mean"])
        below = sum(v < claim.value * (1 - FLOOR_SLACK) for v in row["kl_per_dim_mean"])
        return below == 0, (f"smallest per-dimension KL {low:.3g} vs λ = {claim.value:g}; "
                            f"{below} of {latent} below")
    if claim.kind == "kl_near":
        return abs(kl - claim.value) <= TARGET_BAND * claim.value, \
            f"KL {kl:.3g} vs target {claim.value:g}"
    if claim.kind == "all_active":
        return au >= latent, f"{au:g} of {latent} active"
    assert vae is not None
    if claim.kind == "more_kl_than_vae":
        return kl > vae["kl_mean"], f"KL {kl:.3g} vs VAE {vae['kl_mean']:.3g}"
    if claim.kind == "more_mi_than_vae":
        base = vae["mutual_info_mean"]
        evidence = f"MI {mi:.4g} vs VAE {base:.4g}"
        if base >= mi_cap - MI_SATURATED:
            return mi >= base - MI_TIE, evidence + (f"; the VAE is within {MI_SATURATED:g} nats "
                                                    f"of the log N = {mi_cap:.3g} cap, so "
                                                    f"compared within {MI_TIE:g} nats")
        return mi > base, evidence
    base = vae["active_units_mean"]
    return (au > base if base < latent else au >= base), \
        f"{au:g} vs VAE {base:g} of {latent} active"
