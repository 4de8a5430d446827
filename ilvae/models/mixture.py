"""Gaussian-mixture VAE (GMVAE) and its inverse-Lipschitz version IL-LIDMVAE (Kinoshita et al.,
ICML 2023).

Generative model, K components::

    c ~ Cat(1/K),   z | c ~ N(μ_c, diag σ_c²),   x | z ~ p(x | θ = decoder(z)).

Inference model: q(c|x) = Cat(softmax(g(x))) and q(z|x, c) = N(m(x, c), diag s(x, c)²), with
m, s an encoder applied to the concatenation [x, onehot(c)]. The loss enumerates the K
components (Rui Shu's GMVAE form) instead of sampling c, so it is differentiable in q(c|x)::

    loss = E_batch[ Σ_c q(c|x) ( −log p(x|z_c) + β KL(q(z|x,c) ‖ p(z|c)) ) + β KL(q(c|x) ‖ p(c)) ],
    z_c ~ q(z|x, c) reparameterised, one draw per component,

log p(x|z) summed over data dimensions and the KL terms over latent dimensions. With β = 1 this
is −ELBO of the joint q(c, z|x). The decoder runs K times per batch.

IL-LIDMVAE: the paper gives two constants, "L₁ = L₂ = 5.0" on the toy data and "L₁ = L₂ = 1.5"
on Fashion-MNIST, without saying which maps they belong to [open]. ``l1_reading`` picks one:

* ``"decoder"`` (default; the official LIDGMVAE code of Wang et al., which maps the one-hot class
  code to the component mean with a plain dense layer): the component means are free,
  μ_c = h(e_c) = e_cᵀM, and L₁, L₂ are the constants of the decoder's two Brenier maps g₁, g₂
  (``decoder=il_brenier`` with ``L1``, ``L2`` and ``L = L1·L2·s_min``, its whole constant). The
  model's own ``L1`` stays ``None``; :attr:`MixtureVAE.L1` and :attr:`MixtureVAE.L2` read the
  decoder's.
* ``"prior_means"``: L₁ is the constant of the class code → mean map h,
  ‖h(u) − h(u′)‖ ≥ L₁‖u − u′‖, so every two means stay at least L₁√2 apart and q(c|x) cannot
  collapse by merging components; L₂ is the decoder's whole ``L``. h depends on ``L1``:

  - ``L1=None``: free means (a plain GMVAE), h(u) = uᵀM.
  - ``L1 ≥ 0`` and latent_dim ≥ K: h = Q ∘ g with g = :class:`~ilvae.decoders.ILBrenierDecoder`
    (K → latent_dim, ``L=L1``), an L₁-inverse-Lipschitz map of all of R^K (``L1=0`` is the
    Brenier map of LIDVAE), and Q a learned rotation of R^m (an isometry, so h keeps the constant
    L₁). Without Q (``mean_rotation=False``) h is strongly monotone, (h(u) − h(u′))·(u − u′) ≥
    L₁‖u − u′‖², which ties the direction μ_j − μ_i to e_j − e_i.
  - ``L1 ≥ 0`` and latent_dim < K: no map R^K → R^m is injective, so the guarantee is kept on the
    K codes only: h(u) = uᵀM with M = N · max(1, (1 + 10⁻⁵) L₁√2 / min_{i≠j}‖N_i − N_j‖), N free
    (the margin covers rounding).

Constants in data units [derived]: for an L-inverse-Lipschitz decoder f and z, z′ i.i.d.,
tr Cov f(z) = ½E‖f(z) − f(z′)‖² ≥ L² tr Cov z, so the model's own data (Gaussian likelihood, x
the decoder's output plus noise) have

    tr Cov x ≥ L² (Σ_c p(c) tr diag σ_c² + (1/(2K²)) Σ_{i,j} ‖μ_i − μ_j‖²)
             ≥ L₂² ((K − 1)/K · L₁²)            (reading "prior_means", L = L₂)

and with σ_c fixed (``learn_prior_scale=False``) at least L² m σ_c². When the data's total
standard deviation √(tr Cov x) is smaller, the model cannot reproduce the data's scale:
:meth:`MixtureVAE.scale_conflict` computes this and :meth:`MixtureVAE.check_data` (at the start
of fitting) warns in one line naming L1, L2 and the data's spread. Under reading "decoder" with
learned σ_c the latent scale is free, so no constant conflicts with the data.

:meth:`MixtureVAE.encode` returns the moment-matched Gaussian of the marginal posterior
q(z|x) = Σ_c q(c|x) q(z|x, c) (mean Σ_c q_c m_c, variance Σ_c q_c (s_c² + m_c²) − mean²), so the
importance-weighted NLL (with the marginal prior p(z) = Σ_c p(c) p(z|c), ``model.prior.log_prob``)
applies to this model as to the VAE. KL terms against the mixture prior itself:
:meth:`MixtureVAE.kl_terms`.

Measured on the two-Gaussian toy data, σ = 7.5, Bayes limit 0.827 (K = 2, m = 2, Gaussian
likelihood σ_x = 1, MLP widths 64, ICNN widths [64, 64] with the earlier output-weight scale
``output_init="fan_in"``, Adam 3e-3, batch 256, 3000 steps; test-split accuracy,
KL_c = E KL(q(c|x) ‖ p(c))). With the current default ``output_init="unit"`` the decoder
starts steep and needs gradient clipping here (norm 5, as in the toy study and the LIDVAE
code): reading "decoder" at L₁ = L₂ = 5 then gave 0.818, 0.821, 0.825 (seeds 0–2), and without
clipping 0.736, 0.753, 0.770. The quick ``toy`` study (clipped) gives, seed 0: LIDMVAE 0.801,
IL-LIDMVAE (L₁ = L₂ = 5) 0.821.
Reading "prior_means" in raw data units (means 14.1 apart, data spread √(tr Cov x) = 12.7):

=============  ==================  ==================  ==================
L₁ = L₂        seed 0              seed 1              seed 2
=============  ==================  ==================  ==================
0 (LIDMVAE)    0.558, KL_c 0.011   0.830, KL_c 0.317   0.828, KL_c 0.333
1              0.821, KL_c 0.332   0.827, KL_c 0.320   0.827, KL_c 0.336
5 (paper)      0.666, KL_c 0.376   0.683, KL_c 0.359   0.694, KL_c 0.392
=============  ==================  ==================  ==================

At L₁ = L₂ = 5 the model's own spread is at least L₁L₂/√2 = 17.7 > 12.7, so the constants fight
the fit; the same reading on data and σ_x scaled by 3 (spread 38.2) gave 0.821–0.828. Reading
"decoder" (default), same data and settings, decoder constant L₁L₂ (the slow test of this module):

=============  ==================  ==================  ==================
L₁ = L₂        seed 0              seed 1              seed 2
=============  ==================  ==================  ==================
0 (LIDMVAE)    0.811, KL_c 0.327   0.818, KL_c 0.274   0.824, KL_c 0.283
5 (paper)      0.817, KL_c 0.387   0.828, KL_c 0.380   0.830, KL_c 0.333
=============  ==================  ==================  ==================

So the paper's constants reach the Bayes limit in this reading, but LIDMVAE with free means did
not collapse on these seeds either (the paper reports that it does at σ = 7.5).
Without the rotation Q (h monotone), reading "prior_means" at L₁ = L₂ = 5 split the data along
e₂ − e₁ = (−1, 1), orthogonal to the class axis (1, 1): accuracy 0.532 and 0.500 (2 seeds).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.distributions import Normal

from ilvae._config import build_component
from ilvae.decoders.base import DecoderCallable
from ilvae.encoders import Encoder, EncoderCallable, MLPEncoder, check_hidden, mlp
from ilvae.errors import ConfigurationError, check, check_number
from ilvae.metrics.cluster_accuracy import ClusterAccuracy
from ilvae.metrics.iw_nll import importance_weighted_nll
from ilvae.models.base import LatentVariableModel
from ilvae.models.contract import LatentTerm
from ilvae.priors import GaussianMixturePrior, Prior

#: The readings of the paper's L₁ (module docstring).
L1_READINGS = ("decoder", "prior_means")

# Likelihoods whose parameter θ = decoder(z) is the mean of x in data units.
_DATA_UNIT_LIKELIHOODS = ("gaussian", "gaussian_learned")


def mixture_loss(log_px: Tensor, kl_z: Tensor, logits: Tensor,
                 beta: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The enumerated GMVAE loss from per-component terms.

    ``log_px`` and ``kl_z`` (K, B): log p(x|z_c) and Σ_i KL(q(z_i|x,c) ‖ p(z_i|c)); ``logits``
    (B, K) of q(c|x). Returns the loss (module docstring) and its logged terms: ``recon`` =
    E_batch Σ_c q_c(−log p(x|z_c)), ``kl_z`` = E_batch Σ_c q_c KL_z, ``kl_c`` = E_batch
    KL(q(c|x) ‖ Cat(1/K)), ``kl`` = kl_z + kl_c, ``elbo`` = −(recon + kl).
    """
    log_q = torch.log_softmax(logits, dim=-1)
    q = log_q.exp()
    recon = -(q.t() * log_px).sum(0).mean()
    kl_z_term = (q.t() * kl_z).sum(0).mean()
    kl_c = (q * (log_q + math.log(logits.shape[-1]))).sum(-1).mean()
    kl = kl_z_term + kl_c
    loss = recon + beta * kl
    return loss, {"loss": loss, "recon": recon, "kl_z": kl_z_term, "kl_c": kl_c, "kl": kl,
                  "elbo": -(recon + kl)}


class MixtureVAE(LatentVariableModel):
    """GMVAE with K learned components; IL-LIDMVAE with an ``il_brenier`` decoder, its
    constants L₁, L₂ read as ``l1_reading`` says. See the module docstring for the model, the
    loss and the two readings.

    Args:
        data_shape: shape of one example; supplied by the datamodule in the CLI.
        latent_dim: m.
        num_components: K.
        L1: with ``l1_reading="prior_means"``: inverse-Lipschitz constant of the one-hot code →
            component-mean map h (≥ 0; settable later as ``model.L1``), ``None`` for free means
            (plain GMVAE). With ``l1_reading="decoder"`` it must stay ``None``: L₁ and L₂ are
            then the ``il_brenier`` decoder's ``L1`` and ``L2``.
        l1_reading: ``"decoder"`` (default, LIDGMVAE-style: free means, L₁ and L₂ on the
            decoder's two Brenier maps) or ``"prior_means"`` (L₁ on the mean map, L₂ the
            decoder's ``L``). Checkpoints saved before this option existed used
            ``"prior_means"``: load them with ``load_from_checkpoint(path,
            l1_reading="prior_means")``.
        encoder: encoder callable ``(data_shape, latent_dim) -> Encoder`` for q(z|x, c); it is
            built with ``data_shape = (D + K,)`` and receives the flattened [x, onehot(c)].
        decoder: decoder callable ``(latent_dim, data_dim) -> Decoder`` or a registered name.
        classifier_hidden: hidden widths of the MLP that gives the logits of q(c|x).
        mean_hidden: hidden widths of each ICNN of h (L1 set, latent_dim ≥ K).
        mean_rotation: follow that h by a learned rotation of R^m (module docstring).
        prior_scale: initial σ_c of every component (> 0).
        learn_prior_scale: train σ_c or keep it fixed at ``prior_scale``.
        beta: weight β ≥ 0 of both KL terms.
        num_classes: label classes for ``val/cluster_accuracy`` (default K).
        optimizer, lr_scheduler: LightningCLI callables (default Adam, lr 1e-3).

    The likelihood ``gaussian_adaptive`` is refused: its σ̂² is a batch statistic of one call,
    which under enumeration would weigh every component's residual equally instead of by
    q(c|x).
    """

    def __init__(self, data_shape: tuple[int, ...] = (64,), latent_dim: int = 16,
                 num_components: int = 10, L1: float | None = None,
                 l1_reading: Literal["decoder", "prior_means"] = "decoder",
                 encoder: EncoderCallable | None = None,
                 decoder: DecoderCallable | None = None,
                 classifier_hidden: list[int] = [512],  # noqa: B006
                 mean_hidden: list[int] = [64], mean_rotation: bool = True,  # noqa: B006
                 prior_scale: float = 1.0, learn_prior_scale: bool = True, beta: float = 1.0,
                 num_classes: int | None = None, optimizer: OptimizerCallable | None = None,
                 lr_scheduler: LRSchedulerCallable | None = None) -> None:
        if isinstance(num_components, bool) or int(num_components) != num_components \
                or num_components < 1:
            check("num_components", num_components, "a positive integer")
        K = int(num_components)
        if l1_reading not in L1_READINGS:
            check("l1_reading", l1_reading, f"one of {', '.join(map(repr, L1_READINGS))}")
        if L1 is not None and l1_reading == "decoder":
            check("L1", L1, "None with l1_reading='decoder' (L1 and L2 are then the il_brenier "
                  "decoder's L1, L2); for L1 on the class code → mean map set "
                  "l1_reading='prior_means'")
        if L1 is not None:
            L1 = check_number("L1", L1)
        check_number("prior_scale", prior_scale, strict=True)
        try:
            classifier_hidden = check_hidden(classifier_hidden, "classifier_hidden")
            mean_hidden = check_hidden(mean_hidden, "mean_hidden")
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc
        spec = MLPEncoder if encoder is None else encoder

        def conditional_encoder(shape: tuple[int, ...], m: int) -> Encoder:
            return build_component(spec, (math.prod(shape) + K,), m, base=Encoder,
                                   field="encoder")

        def mixture_prior(m: int) -> Prior:
            return GaussianMixturePrior(m, K, L1, prior_scale, learn_prior_scale, mean_hidden,
                                        mean_rotation)

        super().__init__(data_shape, latent_dim, conditional_encoder, decoder, mixture_prior,
                         optimizer, lr_scheduler)
        if self.decoder.likelihood.name == "gaussian_adaptive":
            check("decoder.likelihood", "gaussian_adaptive", "'gaussian' or 'gaussian_learned' "
                  "(MixtureVAE: the adaptive batch variance ignores q(c|x))")
        self.num_components = K
        self.l1_reading = l1_reading
        self.beta = check_number("beta", beta)
        self.classifier = mlp([self.data_dim, *classifier_hidden, K], "relu")
        num_classes = K if num_classes is None else num_classes
        self.val_cluster_accuracy = ClusterAccuracy(K, num_classes)
        self.test_cluster_accuracy = ClusterAccuracy(K, num_classes)
        self._save_blocks(ignore=[])
        # The mixture prior is rebuilt from this model's own arguments, not from a spec.
        self.hparams.pop("prior", None)

    @property
    def L1(self) -> float | None:
        """The paper's L₁ under ``l1_reading``: the constant of the class → mean map
        ("prior_means"; None for free means) or of the decoder's g₁ ("decoder"; None for a
        decoder without one)."""
        if self.l1_reading == "prior_means":
            return self.prior.L
        return _decoder_constant(self.decoder, "L1")

    @L1.setter
    def L1(self, value: float) -> None:
        if self.l1_reading == "decoder":
            raise ConfigurationError("L1 cannot be set with l1_reading='decoder': it is the "
                                     "decoder's; anneal model.decoder.L instead")
        self.prior.L = value

    @property
    def L2(self) -> float | None:
        """The paper's L₂ under ``l1_reading``: the decoder's whole constant ``L``
        ("prior_means") or the constant of its g₂ ("decoder"); None for a decoder without one."""
        name = "L" if self.l1_reading == "prior_means" else "L2"
        return _decoder_constant(self.decoder, name)

    # --------------------------------------------------------- data scale
    def scale_conflict(self, x: Tensor) -> str | None:
        """A one-line message when the constants cannot fit data ``x`` of shape (N, ...), else
        None. For a Gaussian likelihood the model's own data have (module docstring)

            √(tr Cov x) ≥ L · √(between + within),  between = (K − 1)/K · L₁² ("prior_means"),
            within = m σ_c² (fixed σ_c),

        L the decoder's whole constant; the data's spread is their √(tr Cov x).
        """
        L = _decoder_constant(self.decoder, "L")
        if not L or self.decoder.likelihood.name not in _DATA_UNIT_LIKELIHOODS:
            return None
        K = self.num_components
        between = (K - 1) / K * self.prior.L ** 2 if self.prior.L else 0.0
        within = 0.0 if isinstance(self.prior.log_scale, nn.Parameter) else float(
            self.prior.scales().detach().pow(2).sum(-1).min())
        needed = L * math.sqrt(between + within)
        xf = x.detach().flatten(1).double()
        spread = math.sqrt(float(xf.var(0).sum())) if xf.shape[0] > 1 else 0.0
        if needed <= spread:
            return None
        scale = "" if within == 0 else \
            f", fixed prior_scale={float(self.prior.scales().min()):g}"
        return (f"l1_reading={self.l1_reading!r} with L1={_fmt(self.L1)}, L2={_fmt(self.L2)}"
                f"{scale} (K={K}) makes the model's data spread √(tr Cov x) at least "
                f"{needed:.3g}, more than the data's spread {spread:.3g}: the constants are in "
                "other units than the data; rescale the data (and sigma) or lower L1, L2")

    def check_data(self, datamodule: Any) -> None:
        """The base checks, then a one-line warning when the constants L1, L2 cannot fit the
        training data's scale (:meth:`scale_conflict`)."""
        super().check_data(datamodule)
        if datamodule is None or not hasattr(datamodule, "tensors"):
            return
        message = self.scale_conflict(datamodule.tensors("fit")[0])
        if message is not None:
            rank_zero_warn(message)

    # ----------------------------------------------------------------- maths
    def cluster_logits(self, x: Tensor) -> Tensor:
        """Logits of q(c|x), shape (B, K)."""
        return self.classifier(x.flatten(1))

    def cluster_probabilities(self, x: Tensor) -> Tensor:
        """q(c|x), shape (B, K)."""
        return torch.softmax(self.cluster_logits(x), dim=-1)

    def component_posterior(self, x: Tensor) -> Normal:
        """q(z|x, c) for every c: a Normal with loc/scale of shape (K, B, m)."""
        xf = x.flatten(1)
        K, (B, D) = self.num_components, xf.shape
        codes = torch.eye(K, dtype=xf.dtype, device=xf.device)
        inputs = torch.cat([xf.expand(K, B, D), codes.unsqueeze(1).expand(K, B, K)], dim=-1)
        q = self.encoder(inputs.reshape(K * B, D + K))
        shape = (K, B, self.latent_dim)
        return Normal(q.loc.reshape(shape), q.scale.reshape(shape))

    def encode(self, x: Tensor) -> Normal:
        """Moment-matched Gaussian of q(z|x) = Σ_c q(c|x) q(z|x, c); loc/scale (B, m)."""
        weights = self.cluster_probabilities(x).t().unsqueeze(-1)
        q = self.component_posterior(x)
        loc = (weights * q.loc).sum(0)
        second = (weights * (q.scale ** 2 + q.loc ** 2)).sum(0)
        return Normal(loc, (second - loc ** 2).clamp_min(0).sqrt().clamp_min(1e-12))

    @torch.no_grad()
    def kl_terms(self, x: Tensor) -> dict[str, Tensor]:
        """KL of the mixture's ELBO against its own prior, closed form, averaged over x:

            kl_per_dim_i = E_x Σ_c q(c|x) KL(q(z_i|x, c) ‖ p(z_i|c))   (m,)
            kl_z = Σ_i kl_per_dim_i,   kl_c = E_x KL(q(c|x) ‖ p(c)),   kl = kl_z + kl_c.
        """
        xf = x.flatten(1)
        log_q = torch.log_softmax(self.cluster_logits(xf), dim=-1)
        per_dim = self.prior.component_kl(self.component_posterior(xf))  # (K, B, m)
        kl_per_dim = (log_q.exp().t().unsqueeze(-1) * per_dim).sum(0).mean(0)
        kl_c = (log_q.exp() * (log_q + math.log(self.num_components))).sum(-1).mean()
        kl_z = kl_per_dim.sum()
        return {"kl_per_dim": kl_per_dim, "kl_z": kl_z, "kl_c": kl_c, "kl": kl_z + kl_c}

    # -------------------------------------------------------------- contract
    def latent_terms(self, batch: Any) -> list[LatentTerm]:
        """The level z against the mixture prior, as in :meth:`kl_terms` but per example:
        posterior the moment-matched q(z|x) of :meth:`encode`,
        kl_i(x) = Σ_c q(c|x) KL(q(z_i|x, c) ‖ p(z_i|c)) (B, m) and
        kl_rest(x) = KL(q(c|x) ‖ p(c)) (B,), so the level's total KL is the ELBO's."""
        x, _ = self.unpack(batch)
        xf = x.flatten(1)
        log_q = torch.log_softmax(self.cluster_logits(xf), dim=-1)
        per_dim = self.prior.component_kl(self.component_posterior(xf))  # (K, B, m)
        kl = (log_q.exp().t().unsqueeze(-1) * per_dim).sum(0)
        kl_c = (log_q.exp() * (log_q + math.log(self.num_components))).sum(-1)
        return [LatentTerm("z", self.encode(x), kl, kl_rest=kl_c)]

    @property
    def schedulable(self) -> tuple[str, ...]:
        """``beta``; ``L`` when the decoder has an inverse-Lipschitz constant; ``L1`` with
        ``l1_reading="prior_means"`` and a constant mean map (L₂ is then the decoder's ``L``;
        with ``l1_reading="decoder"`` L₁, L₂ are fixed factors of the decoder's ``L``, which
        keeps their ratio when ``L`` is set)."""
        names = ["beta"]
        if hasattr(self.decoder, "L"):
            names.append("L")
        if self.l1_reading == "prior_means" and self.prior.L is not None:
            names.append("L1")
        return tuple(names)

    def hparam_owner(self, name: str) -> tuple[Any, str]:
        return (self.decoder, "L") if name == "L" else (self, name)

    def schedulable_note(self, name: str) -> str:
        if name in ("L1", "L2") and self.l1_reading == "decoder":
            return (f"; with l1_reading='decoder' {name} is a factor of the decoder's L: "
                    "schedule L")
        if name == "L1":
            return "; L1 needs l1_reading='prior_means' and a number L1 (not free means)"
        return ""

    def iw_nll(self, x: Tensor, num_samples: int = 500,
               chunk_size: int | None = None) -> Tensor:
        """Importance-weighted NLL per example, (B,) float64 nats, against the mixture prior
        p(z) = Σ_c p(c) p(z|c), with the moment-matched q(z|x) of :meth:`encode` as proposal
        (any proposal gives a valid bound;
        :func:`~ilvae.metrics.iw_nll.importance_weighted_nll`)."""
        return importance_weighted_nll(self, x, num_samples, chunk_size)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """One enumerated pass: ``logits`` (B, K) of q(c|x), ``posterior`` q(z|x, c) (K, B, m),
        reparameterised ``z`` (K, B, m), ``theta`` (K, B, D), ``log_px`` and ``kl_z`` (K, B)."""
        xf = x.flatten(1)
        K, B = self.num_components, xf.shape[0]
        logits = self.cluster_logits(xf)
        posterior = self.component_posterior(xf)
        z = posterior.rsample()
        theta = self.decoder(z.reshape(K * B, self.latent_dim))
        log_px = self.decoder.likelihood.log_prob(xf.repeat(K, 1), theta).reshape(K, B)
        kl_z = self.prior.component_kl(posterior).sum(-1)
        return {"logits": logits, "posterior": posterior, "z": z,
                "theta": theta.reshape(K, B, -1), "log_px": log_px, "kl_z": kl_z}

    def _step(self, batch: Any, stage: str) -> Any:
        x, y = self.unpack(batch)
        if stage == "train":
            x = self.decoder.likelihood.prepare(x)
        out = self(x)
        loss, terms = mixture_loss(out["log_px"], out["kl_z"], out["logits"], self.beta)
        terms.pop("loss")
        with torch.no_grad():
            q = torch.softmax(out["logits"], -1).t()
            mean = self.decoder.likelihood.mean(out["theta"])
            sq = ((x.flatten(1) - mean) ** 2).mean(-1)
            terms["gamma_star"] = (q * sq).sum(0).mean()
        output = self.log_terms(stage, loss, terms, x.shape[0])
        if stage != "train" and y is not None:
            self._update_accuracy(out["logits"].detach(), y, stage)
        return output

    def _update_accuracy(self, logits: Tensor, y: Tensor, stage: str) -> None:
        labelled = y >= 0
        if not labelled.any():
            return
        metric = getattr(self, f"{stage}_cluster_accuracy")
        if int(y[labelled].max()) >= metric.num_classes:
            raise ConfigurationError(
                f"labels go up to {int(y[labelled].max())} but num_classes="
                f"{metric.num_classes}; set the model's num_classes")
        metric.update(logits[labelled], y[labelled])
        self.log(f"{stage}/cluster_accuracy", metric, on_step=False, on_epoch=True)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Marginal posterior parameters, q(c|x) (and the label when the data have one)."""
        x, y = self.unpack(batch)
        posterior = self.encode(x)
        out = {"loc": posterior.loc, "scale": posterior.scale,
               "cluster_probabilities": self.cluster_probabilities(x)}
        if y is not None:
            out["y"] = y
        return out

    # ----------------------------------------------------------- generation
    @torch.no_grad()
    def sample(self, n: int, component: int | None = None) -> Tensor:
        """E[x|z] for n draws z ~ p(z) (or z ~ p(z|c) with c = ``component``), data-shaped."""
        z = self.prior.sample(n, component)
        return self.decoder.mean(z).reshape(n, *self.data_shape)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """E[x|z] at the mean of q(z|x, c*), c* = argmax q(c|x)."""
        q = self.component_posterior(x)
        best = self.cluster_logits(x).argmax(-1)
        loc = q.loc[best, torch.arange(x.shape[0], device=x.device)]
        return self.decoder.mean(loc).reshape(x.shape[0], *self.data_shape)


def _fmt(value: float | None) -> str:
    return "None" if value is None else f"{value:g}"


def _decoder_constant(decoder: nn.Module, name: str) -> float | None:
    """``decoder.L`` / ``L1`` / ``L2`` as a float, None for a decoder without constants."""
    value = getattr(decoder, name, None) if hasattr(decoder, "L") else None
    return None if value is None else float(value)


__all__ = ["L1_READINGS", "GaussianMixturePrior", "MixtureVAE", "mixture_loss"]
