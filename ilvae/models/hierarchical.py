"""Nonlinear two-level Markov hierarchical VAE x → z₁ → z₂ (Dang et al., "Beyond vanilla
variational autoencoders: detecting posterior collapse in conditional and hierarchical
variational autoencoders", ICLR 2024, arXiv 2306.05023), the nonlinear counterpart of
:class:`ilvae.models.LinearHVAE`."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.distributions import Normal

from ilvae.decoders.base import DecoderCallable
from ilvae.decoders.mlp import MLPDecoder
from ilvae.encoders import EncoderCallable, MLPEncoder, check_hidden, make_activation
from ilvae.errors import ConfigurationError, check, check_number
from ilvae.metrics import ActiveUnits, KLPerDimension
from ilvae.models.base import LatentVariableModel
from ilvae.models.contract import LatentTerm, two_level_terms
from ilvae.priors import StandardNormal

# Likelihood terms per IW chunk: keeps the K-sample passes cache-sized (as ImportanceWeightedNLL).
_CHUNK_VALUES = 2**21
# Logged terms of the objective besides the loss, in this order.


def _positive_int(field: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value \
            or value < minimum:
        raise ConfigurationError(f"{field}={value!r} is not allowed: expected an integer "
                                 f">= {minimum}")
    return int(value)


def _repeat(x: Tensor, k: int) -> Tensor:
    """(B, ...) → (k·B, ...), the k copies stacked sample-major."""
    return x.unsqueeze(0).expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])


class HierarchicalVAE(LatentVariableModel):
    """Two-level Markov HVAE of Dang et al. (2024) with neural networks for every map:

        q(z₁|x)  = N(μ₁(x), σ₁² I)  (σ₁ fixed, the paper's setting)  or the encoder's own
                   amortised N(μ₁(x), diag s₁(x)²)  (``learnable_sigma_1=True``),
        q(z₂|z₁) = N(μ₂(z₁), diag s₂(z₁)²),           p(z₂) = N(0, η_enc² I),
        p(z₁|z₂) = N(g(z₂), η_dec² I),                p(x|z₁) = the decoder's likelihood,

        loss = −E_q log p(x|z₁) + β₁ E_q[log q(z₁|x) − log p(z₁|z₂)]
               + β₂ E_{q(z₁|x)} KL(q(z₂|z₁) ‖ p(z₂)),

    q = q(z₁|x) q(z₂|z₁); log-densities summed over data / latent dimensions, mean over the
    batch; β₁ = β₂ = 1 is the ELBO. This is the decomposition of the paper and of its authors'
    code, where the z₁ term is written KL(q(z₁|x) ‖ p(z₁|z₂)) inside E_{q(z₁,z₂|x)}: since z₂
    is drawn given z₁ it is not a KL between fixed distributions, and it is computed as
    −H[q(z₁|x)] (closed form, exact) minus log p(z₁|z₂) at one reparameterised sample
    z₁ ~ q(z₁|x), z₂ ~ q(z₂|z₁). E log p(x|z₁) is the one-sample estimate at that z₁, and
    KL(q(z₂|z₁) ‖ p(z₂)) is in closed form given that z₁ (one-sample estimate of the outer
    expectation). (The authors' ReLU MHVAE script also adds the constant d₁σ₁²/(2η_dec²) to
    the z₁ term, and scores the reconstruction as ‖x − μ‖²/η_dec², twice −log p(x|z₁) up to a
    constant, so its β's act as β/2 in this ELBO convention, which is :mod:`ilvae.theory`'s.)

    μ₁ (and s₁) come from the plug-in ``encoder``; μ₂, s₂ from an MLP (``hidden_2``,
    ``activation_2``; ``hidden_2=[]`` makes μ₂ affine) and g from an MLP of the same widths;
    p(x|z₁) is the plug-in ``decoder`` with its likelihood. The paper's theory takes p(x|z₁)
    Gaussian with the same std η_dec: set ``decoder.likelihood=gaussian``,
    ``decoder.sigma=eta_dec`` for that. A learnable σ₁ is outside the theory, and the objective
    can then be unbounded below when β₁ > β₂ (see :class:`~ilvae.models.LinearHVAE`).

    ``encode(x)`` is q(z₁|x), ``encode_z2(z1)`` q(z₂|z₁), ``prior`` p(z₂), ``decoder_z1``
    p(z₁|z₂) (its ``likelihood`` is the N(·, η_dec² I)) and ``decoder`` p(x|z₁).

    Logged: ``{stage}/loss``, ``recon``, ``kl_z1`` (the z₁ term above), ``kl_z2``, ``kl``
    (their sum), ``elbo``, as epoch means (the loss also per step, ``train/loss_step``);
    ``train/beta_1``, ``train/beta_2``. At validation
    and test also ``{stage}/iw_nll`` (:meth:`iw_nll`, K = ``num_iw_samples``; 0 skips it), and
    per epoch ``{stage}/kl_z2_per_dim/j`` (E KL(q(z₂ⱼ|z₁) ‖ p(z₂ⱼ)), one z₁ sample per
    example), ``{stage}/epsilon_collapsed_z2`` (dimensions with that mean below ``eps`` nats)
    and ``{stage}/active_units_z1``, ``{stage}/active_units_z2`` (Burda et al.'s AU on μ₁(x)
    and on μ₂(μ₁(x)), threshold ``au_threshold``). :meth:`latent_terms` gives
    :class:`~ilvae.callbacks.CollapseMonitor` both levels, each against its own prior, and
    :meth:`iw_nll` its ``val/iw_nll``; ``schedulable`` names ``beta_1`` and ``beta_2``.

    Args:
        data_shape: shape of one example (supplied by the datamodule in the CLI).
        latent_dim: d₁, the size of z₁.
        latent_dim_2: d₂, the size of z₂ (default d₁).
        encoder: encoder callable ``(data_shape, d₁) -> Encoder`` for q(z₁|x) (default MLP).
        decoder: decoder callable ``(d₁, data_dim) -> Decoder``, registered name or class.
        hidden_2, activation_2: hidden widths and activation of the z₁ ↔ z₂ networks.
        beta_1, beta_2: weights β₁, β₂ ≥ 0.
        eta_enc: std of p(z₂) (> 0).  eta_dec: std of p(z₁|z₂) (> 0).
        sigma_1: the fixed std σ₁ of q(z₁|x) (> 0; unused when ``learnable_sigma_1``).
        learnable_sigma_1: use the encoder's amortised std instead of σ₁.
        num_iw_samples: K of the validation/test IW-NLL (0: not computed).
        eps, au_threshold: thresholds of the logged collapse counts (nats; variance).
        optimizer, lr_scheduler: LightningCLI callables (default Adam, lr 1e-3).
    """

    latent_levels = ("z1", "z2")

    def __init__(self, data_shape: tuple[int, ...] = (64,), latent_dim: int = 16,
                 latent_dim_2: int | None = None, encoder: EncoderCallable | None = None,
                 decoder: DecoderCallable | None = None,
                 hidden_2: list[int] = [128],  # noqa: B006 (read-only default)
                 activation_2: str = "relu", beta_1: float = 1.0, beta_2: float = 1.0,
                 eta_enc: float = 1.0, eta_dec: float = 1.0, sigma_1: float = 1.0,
                 learnable_sigma_1: bool = False, num_iw_samples: int = 100,
                 eps: float = 0.01, au_threshold: float = 0.01,
                 optimizer: OptimizerCallable | None = None,
                 lr_scheduler: LRSchedulerCallable | None = None) -> None:
        eta_enc = check_number("eta_enc", eta_enc, strict=True)
        eta_dec = check_number("eta_dec", eta_dec, strict=True)
        sigma_1 = check_number("sigma_1", sigma_1, strict=True)
        latent_dim = _positive_int("latent_dim", latent_dim)
        d2 = latent_dim if latent_dim_2 is None else _positive_int("latent_dim_2", latent_dim_2)
        if not isinstance(learnable_sigma_1, bool):
            raise ConfigurationError(f"learnable_sigma_1={learnable_sigma_1!r} is not allowed: "
                                     "expected true or false")
        try:
            hidden_2 = check_hidden(hidden_2, "hidden_2")
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"hidden_2={hidden_2!r} is not allowed: expected a list "
                                     "of positive integers") from exc
        try:
            make_activation(activation_2)
        except (ValueError, TypeError) as exc:
            # make_activation names the allowed activations; keep its message, this field.
            raise ConfigurationError(str(exc).replace("activation=", "activation_2=")) from exc
        super().__init__(data_shape, latent_dim, encoder, decoder,
                         StandardNormal(d2, scale=eta_enc), optimizer, lr_scheduler)
        self.latent_dim_2 = d2
        self.encoder_z2 = MLPEncoder((latent_dim,), d2, hidden=hidden_2, activation=activation_2)
        self.decoder_z1 = MLPDecoder(d2, latent_dim, hidden=hidden_2, activation=activation_2,
                                     likelihood="gaussian", sigma=eta_dec)
        self.beta_1 = check_number("beta_1", beta_1)
        self.beta_2 = check_number("beta_2", beta_2)
        self.eta_enc, self.eta_dec, self.sigma_1 = eta_enc, eta_dec, sigma_1
        self.learnable_sigma_1 = learnable_sigma_1
        self.num_iw_samples = _positive_int("num_iw_samples", num_iw_samples, minimum=0)
        self.eps = check_number("eps", eps, strict=True)
        self.au_threshold = check_number("au_threshold", au_threshold)
        # Epoch accumulators of the collapse counts; their states are not saved in checkpoints.
        self.collapse_metrics = nn.ModuleDict({stage: nn.ModuleDict({
            "kl_z2": KLPerDimension(prior_scale=eta_enc),
            "au_z1": ActiveUnits(threshold=self.au_threshold),
            "au_z2": ActiveUnits(threshold=self.au_threshold)}) for stage in ("val", "test")})
        self.save_hyperparameters(ignore=["encoder", "decoder", "optimizer", "lr_scheduler"])
        for name in ("encoder", "decoder"):  # saved as specs so checkpoints rebuild the blocks
            self.hparams[name] = getattr(self, name).config

    # ----------------------------------------------------------------- maths
    def encode(self, x: Tensor) -> Normal:
        """q(z₁|x) with loc/scale of shape (B, latent_dim)."""
        posterior = self.encoder(x)
        if self.learnable_sigma_1:
            return posterior
        return Normal(posterior.loc, posterior.loc.new_full((), self.sigma_1)
                      .expand_as(posterior.loc))

    def encode_z2(self, z1: Tensor) -> Normal:
        """q(z₂|z₁) with loc/scale of shape (B, latent_dim_2)."""
        return self.encoder_z2(z1)

    def conditional_z1(self, z2: Tensor) -> Normal:
        """p(z₁|z₂) = N(g(z₂), η_dec² I) with loc/scale of shape (B, latent_dim)."""
        loc = self.decoder_z1(z2)
        return Normal(loc, self.decoder_z1.likelihood.variance.sqrt().expand_as(loc))

    def forward(self, x: Tensor) -> dict[str, Any]:
        """One reparameterised pass: q(z₁|x), q(z₂|z₁), z₁, z₂, log p(x|z₁) (B,), the z₁ term
        −H[q(z₁|x)] − log p(z₁|z₂) per z₁ dimension (B, d₁) and KL(q(z₂|z₁) ‖ p(z₂)) per z₂
        dimension (B, d₂)."""
        q1 = self.encode(x)
        z1 = q1.rsample()
        q2 = self.encode_z2(z1)
        z2 = q2.rsample()
        log_px = self.decoder.log_prob(x, z1)
        kl_z1 = -q1.entropy() - self.conditional_z1(z2).log_prob(z1)
        return {"posterior": q1, "posterior_z2": q2, "z1": z1, "z2": z2, "log_px": log_px,
                "kl_z1": kl_z1, "kl_z2": self.prior.kl(q2)}

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted loss of a batch and its logged terms (``loss``, ``recon``, ``kl_z1``,
        ``kl_z2``, ``kl``, ``elbo``)."""
        return self._objective(self(x))

    def _objective(self, out: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        recon = -out["log_px"].mean()
        kl_z1 = out["kl_z1"].sum(-1).mean()
        kl_z2 = out["kl_z2"].sum(-1).mean()
        loss = recon + self.beta_1 * kl_z1 + self.beta_2 * kl_z2
        return loss, {"loss": loss, "recon": recon, "kl_z1": kl_z1, "kl_z2": kl_z2,
                      "kl": kl_z1 + kl_z2, "elbo": -(recon + kl_z1 + kl_z2)}

    @torch.no_grad()
    def iw_nll(self, x: Tensor, num_samples: int | None = None,
               chunk_size: int | None = None) -> Tensor:
        """Importance-weighted NLL (Burda et al., 2016) of the two-level model, per example
        (B,) float64 nats, with K = ``num_samples`` (default ``num_iw_samples``) draws
        (z₁ₖ, z₂ₖ) ~ q(z₁|x) q(z₂|z₁):

            NLL_K(x) = −log (1/K) Σ_k p(x|z₁ₖ) p(z₁ₖ|z₂ₖ) p(z₂ₖ) / (q(z₁ₖ|x) q(z₂ₖ|z₁ₖ)).

        K = 1 is the negative one-sample ELBO (all terms sampled); E NLL_K ≥ −log p(x) and
        decreases to it as K grows. Runs in evaluation mode (each module's flag is restored)."""
        k_total = self.num_iw_samples if num_samples is None else int(num_samples)
        if k_total < 1:
            check("num_samples", num_samples, "an integer >= 1 or None")
        modules = list(self.modules())
        flags = [m.training for m in modules]
        self.eval()
        try:
            q1 = self.encode(x)
            batch = x.shape[0]
            chunk = chunk_size or max(1, _CHUNK_VALUES // max(1, x[:1].numel() * batch))
            log_w = []
            for start in range(0, k_total, chunk):
                k = min(chunk, k_total - start)
                z1 = q1.sample((k,))  # (k, B, d₁)
                flat = z1.reshape(k * batch, -1)
                q2 = self.encode_z2(flat)
                z2 = q2.sample()
                log_p = (self.decoder.log_prob(_repeat(x, k), flat)
                         + self.conditional_z1(z2).log_prob(flat).sum(-1)
                         + self.prior.log_prob(z2) - q2.log_prob(z2).sum(-1))
                log_w.append((log_p.reshape(k, batch) - q1.log_prob(z1).sum(-1)).double())
            return math.log(k_total) - torch.logsumexp(torch.cat(log_w), dim=0)
        finally:
            for module, flag in zip(modules, flags, strict=True):
                module.training = flag

    # -------------------------------------------------------------- contract
    schedulable = ("beta_1", "beta_2")

    def latent_terms(self, batch: Any) -> list[LatentTerm]:
        """Both levels, each against its own prior, in closed form at the posterior means
        (deterministic, so a validation measurement does not depend on a draw):
        :func:`~ilvae.models.contract.two_level_terms` with p(z₁|z₂) = :meth:`conditional_z1`."""
        x, _ = self.unpack(batch)
        return two_level_terms(self.encode(x), self.encode_z2, self.conditional_z1, self.prior)

    # ------------------------------------------------------------ diagnostics
    @torch.no_grad()
    def kl_per_dimension(self, x: Tensor, num_samples: int = 1) -> Tensor:
        """E_x E_{q(z₁|x)} KL(q(z₂ⱼ|z₁) ‖ p(z₂ⱼ)), float64 (latent_dim_2,): the closed-form KL
        averaged over the rows of ``x`` and ``num_samples`` draws of z₁ each."""
        z1 = self.encode(x).sample((num_samples,)).flatten(0, 1)
        return self.prior.kl(self.encode_z2(z1)).double().mean(0)

    @torch.no_grad()
    def measured_collapse(self, x: Tensor, eps: float | None = None,
                          num_samples: int = 1) -> Tensor:
        """Collapsed z₂ dimensions, bool (latent_dim_2,): :meth:`kl_per_dimension` below ``eps``
        nats (default ``self.eps``), i.e. q(z₂ⱼ|z₁) ≈ p(z₂ⱼ) whatever z₁ (ε-collapse, METHODS §1;
        the same rule as :meth:`LinearHVAE.measured_collapse`)."""
        return self.kl_per_dimension(x, num_samples) < (self.eps if eps is None else eps)

    @torch.no_grad()
    def active_units(self, x: Tensor, threshold: float | None = None) -> dict[str, int]:
        """Active units (Burda et al., 2016) of each level on the rows of ``x``: z₁ on μ₁(x),
        z₂ on μ₂(μ₁(x)), the posterior mean of z₂ through the mean of z₁ (exact for affine μ₂)."""
        threshold = self.au_threshold if threshold is None else threshold
        q1 = self.encode(x)
        counts = {}
        for level, posterior in (("z1", q1), ("z2", self.encode_z2(q1.loc))):
            metric = ActiveUnits(threshold=threshold)
            metric.update(posterior)
            counts[level] = int(metric.compute())
        return counts

    # -------------------------------------------------------------- training
    def _step(self, batch: Any, stage: str) -> Tensor:
        x, _ = self.unpack(batch)
        train = stage == "train"
        if train:
            x = self.decoder.likelihood.prepare(x)
        out = self(x)
        loss, terms = self._objective(out)
        terms.pop("loss")
        output = self.log_terms(stage, loss, terms, x.shape[0])
        if train:
            return output
        metrics = self.collapse_metrics[stage]
        metrics["kl_z2"].update(out["posterior_z2"])
        metrics["au_z1"].update(out["posterior"])
        metrics["au_z2"].update(self.encode_z2(out["posterior"].loc))
        if self.num_iw_samples > 0:
            self.log(f"{stage}/iw_nll", self.iw_nll(x).mean().float(), on_step=False,
                     on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        return loss

    def _log_collapse(self, stage: str) -> None:
        metrics = self.collapse_metrics[stage]
        if metrics["kl_z2"].update_count:
            per_dim = metrics["kl_z2"].compute()["kl_per_dim"]
            # Already synchronised across processes by torchmetrics: no sync_dist here.
            values = {f"{stage}/kl_z2_per_dim/{j}": v for j, v in enumerate(per_dim.float())}
            values[f"{stage}/epsilon_collapsed_z2"] = (per_dim < self.eps).sum().float()
            values[f"{stage}/active_units_z1"] = metrics["au_z1"].compute().float()
            values[f"{stage}/active_units_z2"] = metrics["au_z2"].compute().float()
            self.log_dict(values, on_step=False, on_epoch=True, sync_dist=False)
        for metric in metrics.values():
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_collapse("val")

    def on_test_epoch_end(self) -> None:
        self._log_collapse("test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Parameters of q(z₁|x) and of q(z₂|z₁) at z₁ = μ₁(x), with the label if any."""
        x, y = self.unpack(batch)
        q1 = self.encode(x)
        q2 = self.encode_z2(q1.loc)
        out = {"loc": q1.loc, "scale": q1.scale, "loc_z2": q2.loc, "scale_z2": q2.scale}
        if y is not None:
            out["y"] = y
        return out

    # ----------------------------------------------------------- generation
    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """E[x|z₁] for z₂ ~ p(z₂), z₁ ~ p(z₁|z₂), shaped like the data."""
        z1 = self.conditional_z1(self.prior.sample(n)).sample()
        return self.decoder.mean(z1).reshape(n, *self.data_shape)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """E[x|z₁] at the posterior mean z₁ = μ₁(x)."""
        return self.decoder.mean(self.encode(x).loc).reshape(x.shape[0], *self.data_shape)
