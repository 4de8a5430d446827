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

IL-LIDMVAE, in the reading adopted by METHODS §3: the component means are μ_c = h(e_c), with
e_c ∈ R^K the one-hot code and h an L₁-inverse-Lipschitz map, ‖h(u) − h(u′)‖ ≥ L₁‖u − u′‖, so
every two means stay at least L₁√2 apart and q(c|x) cannot collapse by merging components; L₂ is
the decoder's own ``L`` (``decoder=il_brenier``). The mean map h depends on ``L1``:

* ``L1=None``: free means (a plain GMVAE), h(u) = uᵀM.
* ``L1 ≥ 0`` and latent_dim ≥ K: h = Q ∘ g with g = :class:`~ilvae.decoders.ILBrenierDecoder`
  (K → latent_dim, ``L=L1``), an L₁-inverse-Lipschitz map of all of R^K (``L1=0`` is the Brenier
  map of LIDVAE), and Q a learned rotation of R^m (an isometry, so h keeps the constant L₁).
  Without Q (``mean_rotation=False``) h is strongly monotone, (h(u) − h(u′))·(u − u′) ≥
  L₁‖u − u′‖², which ties the direction μ_j − μ_i to e_j − e_i: see the measurements below.
* ``L1 ≥ 0`` and latent_dim < K: no map R^K → R^m is injective, so the guarantee is kept on the
  K codes only: h(u) = uᵀM with M = N · max(1, (1 + 10⁻⁵) L₁√2 / min_{i≠j}‖N_i − N_j‖), N free
  (the margin covers rounding).

:meth:`MixtureVAE.encode` returns the moment-matched Gaussian of the marginal posterior
q(z|x) = Σ_c q(c|x) q(z|x, c) (mean Σ_c q_c m_c, variance Σ_c q_c (s_c² + m_c²) − mean²), so the
collapse metrics and the importance-weighted NLL (with the marginal prior p(z) = Σ_c p(c) p(z|c),
``model.prior.log_prob``) apply to this model as to the VAE.

Measured on the two-Gaussian toy data, σ = 7.5, Bayes limit 0.827 (the slow study in the tests
of this module: K = 2, m = 2, Gaussian likelihood σ_x = 1, MLP widths 64, ICNN widths [64, 64],
Adam 3e-3, batch 256, 3000 steps; test-split accuracy, KL_c = E KL(q(c|x) ‖ p(c))):

=============  ==================  ==================  ==================
L₁ = L₂        seed 0              seed 1              seed 2
=============  ==================  ==================  ==================
0 (LIDMVAE)    0.558, KL_c 0.011   0.830, KL_c 0.317   0.828, KL_c 0.333
1              0.821, KL_c 0.332   0.827, KL_c 0.320   0.827, KL_c 0.336
5 (paper)      0.666, KL_c 0.376   0.683, KL_c 0.359   0.694, KL_c 0.392
=============  ==================  ==================  ==================

A plain training loop with the same settings (batches drawn with replacement) gave the same
picture on more seeds: L = 0 collapsed q(c|x) on 2 of 6 seeds (KL_c 0.015, 0.008) and reached
0.827–0.830 on the other 4; L = 1 reached 0.820–0.827 on 5 of 5; L = 5 gave 0.67–0.69 on 3 of 4
seeds and put all data in one component on the fourth (0.508, KL_c = log 2).

So L = 0 collapses on some seeds only, L₁ = L₂ = 1 reaches the Bayes limit on every seed tried,
and the paper's L₁ = L₂ = 5 prevents the collapse without reaching the Bayes limit: in this
reading the decoded means are at least L₁√2·L₂ ≈ 35 apart while the data means are 14.1 apart,
so the separation the constants impose fights the fit. Without the rotation Q (h monotone),
L₁ = L₂ = 5 split the data along e₂ − e₁ = (−1, 1), orthogonal to the class axis (1, 1):
accuracy 0.532 and 0.500 (2 seeds, 30 epochs, Adam 1e-3, batch 128); Q started at the identity
escaped that saddle only slowly (0.58–0.65 after 2000 steps).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.distributions import Normal
from torch.nn.utils.parametrizations import orthogonal

from ilvae._config import build_component
from ilvae.decoders.base import DecoderCallable
from ilvae.decoders.il_brenier import ILBrenierDecoder
from ilvae.encoders import Encoder, EncoderCallable, MLPEncoder, check_hidden, mlp
from ilvae.errors import ConfigurationError
from ilvae.metrics.cluster_accuracy import ClusterAccuracy
from ilvae.models.base import LatentVariableModel, check_number
from ilvae.priors import Prior

# Relative margin by which the rescaled means exceed L₁√2, so rounding cannot undercut it.
_MARGIN = 1e-5


class _FreeMeans(nn.Module):
    """h(u) = uᵀM with M (K, m) free: the means of a plain GMVAE (no guarantee, ``L`` is None)."""

    L = None

    def __init__(self, num_components: int, latent_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_components, latent_dim))

    def forward(self, u: Tensor) -> Tensor:
        return u @ self.weight


class _SeparatedMeans(nn.Module):
    """h(u) = uᵀM, M = N · max(1, (1 + 10⁻⁵) L√2 / min_{i≠j}‖N_i − N_j‖): on the one-hot codes,
    ‖h(e_i) − h(e_j)‖ ≥ L‖e_i − e_j‖ = L√2 for every pair, for any N with distinct rows."""

    def __init__(self, num_components: int, latent_dim: int, L: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_components, latent_dim))
        self.register_buffer("_L", torch.tensor(float(L), dtype=torch.float64))

    @property
    def L(self) -> float:
        return float(self._L)

    @L.setter
    def L(self, value: float) -> None:
        self._L.fill_(check_number("L1", value))

    def matrix(self) -> Tensor:
        n = self.weight
        if n.shape[0] < 2:
            return n
        distance = torch.pdist(n.double()).min()
        target = (1 + _MARGIN) * float(self._L) * math.sqrt(2.0)
        scale = (target / distance.clamp_min(torch.finfo(torch.float64).tiny)).clamp_min(1.0)
        return n * scale.to(n.dtype)

    def forward(self, u: Tensor) -> Tensor:
        return u @ self.matrix()


class _BrenierMeans(nn.Module):
    """h(u) = Q g(u): g an L-inverse-Lipschitz :class:`ILBrenierDecoder` R^K → R^m, Q a rotation
    (orthogonal parametrisation of torch, or the identity), so ‖h(u) − h(u′)‖ ≥ L‖u − u′‖."""

    def __init__(self, num_components: int, latent_dim: int, L: float, hidden: list[int],
                 rotation: bool) -> None:
        super().__init__()
        self.brenier = ILBrenierDecoder(num_components, latent_dim, L=L, hidden=hidden,
                                        likelihood="gaussian")
        self.rotation = None
        if rotation:
            linear = nn.Linear(latent_dim, latent_dim, bias=False)
            # A random start: Q = I would start every run with μ_j − μ_i near e_j − e_i.
            nn.init.orthogonal_(linear.weight)
            self.rotation = orthogonal(linear)

    @property
    def L(self) -> float:
        return self.brenier.L

    @L.setter
    def L(self, value: float) -> None:
        self.brenier.L = check_number("L1", value)

    def forward(self, u: Tensor) -> Tensor:
        v = self.brenier(u)
        return v if self.rotation is None else self.rotation(v)


class GaussianMixturePrior(Prior):
    """p(z) = (1/K) Σ_c N(z; μ_c, diag σ_c²) with μ_c = h(e_c) (see the module docstring).

    Args:
        latent_dim: m.
        num_components: K.
        L1: inverse-Lipschitz constant of the class → mean map h; ``None`` for free means.
        scale: initial (or fixed) σ_c, the same for every component and dimension.
        learn_scale: train log σ_c (one per component and dimension) or keep it fixed.
        hidden: hidden widths of each ICNN of h (used when L1 is set and m ≥ K).
        rotation: follow that h by a learned rotation Q of R^m (L1 set and m ≥ K).

    ``log_prob`` and ``sample`` are those of the marginal mixture; ``kl`` (inherited) is the
    one-sample estimate against it. The model's loss uses :meth:`component_kl` instead.
    """

    def __init__(self, latent_dim: int, num_components: int = 10, L1: float | None = None,
                 scale: float = 1.0, learn_scale: bool = True,
                 hidden: list[int] = [64], rotation: bool = True) -> None:  # noqa: B006
        super().__init__(latent_dim)
        self.num_components = int(num_components)
        check_number("scale", scale, strict=True)
        if L1 is None:
            self.mean_map: nn.Module = _FreeMeans(self.num_components, latent_dim)
        elif latent_dim >= self.num_components:
            self.mean_map = _BrenierMeans(self.num_components, latent_dim, L1,
                                          check_hidden(hidden), rotation)
        else:
            self.mean_map = _SeparatedMeans(self.num_components, latent_dim, L1)
        log_scale = torch.full((self.num_components, latent_dim), math.log(scale))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def L(self) -> float | None:
        """Guaranteed L₁ with ‖μ_i − μ_j‖ ≥ L₁√2 (None for free means)."""
        return self.mean_map.L

    @L.setter
    def L(self, value: float) -> None:
        if self.mean_map.L is None:
            raise ConfigurationError("L1 cannot be set on a mixture with free means (L1=None)")
        self.mean_map.L = value

    def codes(self) -> Tensor:
        """The one-hot codes e_1 … e_K as a (K, K) identity."""
        return torch.eye(self.num_components, dtype=self.log_scale.dtype,
                         device=self.log_scale.device)

    def means(self) -> Tensor:
        """μ_c = h(e_c), shape (K, m)."""
        return self.mean_map(self.codes()).to(self.log_scale.dtype)

    def scales(self) -> Tensor:
        """σ_c, shape (K, m)."""
        return self.log_scale.exp()

    def component_log_prob(self, z: Tensor) -> Tensor:
        """log N(z; μ_c, diag σ_c²) summed over dimensions: (..., m) → (..., K)."""
        return Normal(self.means(), self.scales()).log_prob(z.unsqueeze(-2)).sum(-1)

    def log_prob(self, z: Tensor) -> Tensor:
        return torch.logsumexp(self.component_log_prob(z), dim=-1) - math.log(
            self.num_components)

    def sample(self, n: int, component: int | Tensor | None = None) -> Tensor:
        """n draws z ~ p(z), or z ~ p(z|c) for a fixed ``component`` c."""
        device = self.log_scale.device
        if component is None:
            c = torch.randint(self.num_components, (n,), device=device)
        else:
            c = torch.as_tensor(component, device=device).expand(n)
        eps = torch.randn(n, self.latent_dim, device=device, dtype=self.log_scale.dtype)
        return self.means()[c] + self.scales()[c] * eps

    def component_kl(self, posterior: Normal) -> Tensor:
        """KL(q(z|x,c) ‖ p(z|c)) per dimension, closed form, for a posterior of shape (K, B, m):

            log(σ_c/s) + (s² + (m − μ_c)²) / (2σ_c²) − ½.
        """
        mu = self.means().unsqueeze(1)
        log_sigma = self.log_scale.unsqueeze(1)
        var_ratio = (posterior.scale / log_sigma.exp()) ** 2
        return 0.5 * (var_ratio + ((posterior.loc - mu) / log_sigma.exp()) ** 2 - 1
                      - torch.log(var_ratio))


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
    """GMVAE with K learned components; IL-LIDMVAE when ``L1`` is set and the decoder is
    ``il_brenier`` (its ``L`` is L₂). See the module docstring for the model and the loss.

    Args:
        data_shape: shape of one example; supplied by the datamodule in the CLI.
        latent_dim: m.
        num_components: K.
        L1: inverse-Lipschitz constant of the one-hot code → component-mean map h (≥ 0);
            ``None`` gives free means (plain GMVAE). Settable later as ``model.L1``.
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

    collapse_monitor_unsupported = ("its prior over z is a mixture p(z|c), not N(0, η² I); "
                                   "its validation step logs the KL terms kl_z and kl_c")

    def __init__(self, data_shape: tuple[int, ...] = (64,), latent_dim: int = 16,
                 num_components: int = 10, L1: float | None = None,
                 encoder: EncoderCallable | None = None,
                 decoder: DecoderCallable | None = None,
                 classifier_hidden: list[int] = [512],  # noqa: B006
                 mean_hidden: list[int] = [64], mean_rotation: bool = True,  # noqa: B006
                 prior_scale: float = 1.0, learn_prior_scale: bool = True, beta: float = 1.0,
                 num_classes: int | None = None, optimizer: OptimizerCallable | None = None,
                 lr_scheduler: LRSchedulerCallable | None = None) -> None:
        if isinstance(num_components, bool) or int(num_components) != num_components \
                or num_components < 1:
            raise ConfigurationError(f"num_components={num_components!r} is not allowed: "
                                     "expected a positive integer")
        K = int(num_components)
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
            raise ConfigurationError(
                "decoder likelihood='gaussian_adaptive' is not supported by MixtureVAE (its "
                "batch variance ignores q(c|x)); use 'gaussian' or 'gaussian_learned'")
        self.num_components = K
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
        """Guaranteed inverse-Lipschitz constant of the class → mean map (None: free means)."""
        return self.prior.L

    @L1.setter
    def L1(self, value: float) -> None:
        self.prior.L = value

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

    def _step(self, batch: Any, stage: str) -> Tensor:
        x, y = self.unpack(batch)
        if stage == "train":
            x = self.decoder.likelihood.prepare(x)
        out = self(x)
        loss, terms = mixture_loss(out["log_px"], out["kl_z"], out["logits"], self.beta)
        on_step, size = stage == "train", x.shape[0]
        self.log(f"{stage}/loss", terms.pop("loss"), on_step=on_step, on_epoch=True,
                 prog_bar=True, batch_size=size)
        self.log_dict({f"{stage}/{k}": v for k, v in terms.items()}, on_step=on_step,
                      on_epoch=True, batch_size=size)
        with torch.no_grad():
            q = torch.softmax(out["logits"], -1).t()
            mean = self.decoder.likelihood.mean(out["theta"])
            sq = ((x.flatten(1) - mean) ** 2).mean(-1)
            self.log(f"{stage}/gamma_star", (q * sq).sum(0).mean(), on_step=False,
                     on_epoch=True, batch_size=size)
        if stage == "train":
            self.log("train/beta", float(self.beta), on_step=True, on_epoch=False)
            if hasattr(self.decoder, "L"):
                self.log("train/L", float(self.decoder.L), on_step=True, on_epoch=False)
            if self.L1 is not None:
                self.log("train/L1", float(self.L1), on_step=True, on_epoch=False)
        elif y is not None:
            self._update_accuracy(out["logits"].detach(), y, stage)
        return loss

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


__all__ = ["GaussianMixturePrior", "MixtureVAE", "mixture_loss"]
