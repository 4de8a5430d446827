"""Conditional VAE: predict an output y from an input x through a latent z (Sohn et al. 2015),
with the linear variant whose collapse Dang et al. (ICLR 2024) solve in closed form."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from ilvae import decoders as _decoders
from ilvae._config import build_component
from ilvae.decoders.base import Decoder, DecoderCallable
from ilvae.decoders.mlp import MLPDecoder
from ilvae.encoders import Encoder, EncoderCallable, MLPEncoder, check_hidden
from ilvae.errors import ConfigurationError, check, check_number
from ilvae.models.base import LatentVariableModel
from ilvae.models.contract import LatentTerm
from ilvae.objectives import beta_vae_loss
from ilvae.priors import StandardNormal


class _LinearEncoder(Encoder):
    """q(z|u) = N(W u, diag s²): W without bias, s a learned vector that does not depend on u."""

    def __init__(self, data_shape: tuple[int, ...], latent_dim: int, scale: float = 1.0) -> None:
        super().__init__(data_shape, latent_dim)
        self.weight = nn.Linear(self.data_dim, latent_dim, bias=False)
        self.log_scale = nn.Parameter(torch.full((latent_dim,), math.log(scale)))

    def forward(self, u: Tensor) -> Normal:
        loc = self.weight(u.flatten(1))
        return Normal(loc, self.log_scale.exp().expand_as(loc))


class _LinearDecoder(Decoder):
    """θ = U v without bias; v = [z, x], so U = [U₁ U₂] and θ = U₁z + U₂x."""

    def __init__(self, latent_dim: int, data_dim: int, likelihood: str = "gaussian",
                 sigma: float = 1.0, binarize: bool = False) -> None:
        super().__init__(latent_dim, data_dim, likelihood, sigma, binarize)
        self.weight = nn.Linear(latent_dim, data_dim, bias=False)

    def forward(self, v: Tensor) -> Tensor:
        return self.weight(v)


def _shape(field: str, shape: Any) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise ConfigurationError(f"{field}={shape} is not allowed: expected positive sizes "
                                 "(it is supplied by the datamodule)")
    return shape


class ConditionalVAE(LatentVariableModel):
    """Conditional VAE: input (condition) x, output y, latent z.

        encoder  q(z|x, y) = N(μ(x, y), diag s²(x, y))      (a network on the concatenation [x, y])
        decoder  p(y|x, z)                                   (a network on [z, x]; Gaussian with
                                                              fixed std η_dec by default)
        prior    p(z) = N(0, η_enc² I)  (``prior="standard"``)  or  p(z|x) = N(m(x), diag r²(x))
                 (``prior="learned"``, a network of x)

        loss = −E_batch[log p(y|x, z)] + β · E_batch Σ_i KL(q(z_i|x, y) ‖ p(z_i|x)),
        z ~ q(z|x, y) (reparameterised),

    log p(y|x, z) summed over the dimensions of y, the KL in closed form between diagonal
    Gaussians and summed over latent dimensions, both averaged over the batch. Logged as
    ``{stage}/loss``, ``{stage}/recon`` (= −E log p(y|x,z)), ``{stage}/kl``, ``{stage}/elbo`` and
    ``train/beta``; after each validation epoch the mean KL of every latent dimension is kept in
    :attr:`kl_per_dim` and the number of dimensions with mean KL below 0.01 nats is logged as
    ``val/epsilon_collapsed``.

    ``linear=True`` gives the linear CVAE of Dang et al. (2024): encoder μ = W₁x + W₂y and
    decoder mean U₁z + U₂x without biases, encoder std s a learned vector independent of the
    input (initialised at η_enc). Its collapse is predicted in closed form (METHODS §6): with
    E = E[yyᵀ] − E[yxᵀ]E[xxᵀ]⁻¹E[xyᵀ] and θ_i its eigenvalues, latent i collapses iff
    θ_i < β η_dec², and U₁ has singular values ω_i = (1/η_enc)·√max(0, θ_i − β η_dec²)
    (:meth:`theory_prediction` gives the prediction, :meth:`decoder_singular_values` and
    :meth:`measured_collapse` the measurement). With ``prior="learned"`` the prior is linear
    too, p(z|x) = N(Vx, diag r²).

    Args:
        data_shape: shape of one input x; supplied by the datamodule in the CLI.
        target_shape: shape of one output y; supplied by the datamodule in the CLI.
        latent_dim: m, the number of latent dimensions.
        hidden: widths of the hidden layers of the default encoder, decoder and learned prior.
        activation: their activation (``relu``, ``tanh``, ...).
        linear: build the linear CVAE above instead of networks.
        likelihood: likelihood of the default decoder (``gaussian`` when not given, or any
            likelihood name).
        eta_dec: η_dec, the std of the default decoder's Gaussian likelihood (1 when not given).
        eta_enc: η_enc, the std of the standard prior.
        prior: ``"standard"`` (N(0, η_enc² I)) or ``"learned"`` (p(z|x)).
        beta: KL weight β ≥ 0.
        encoder: an encoder callable ``(input_shape, latent_dim) -> Encoder`` on the flattened
            [x, y] (input_shape = (x_dim + y_dim,)) instead of the default MLP.
        decoder: a decoder callable ``(latent_dim + x_dim, y_dim) -> Decoder``, a registered
            decoder name or a class, applied to [z, x] instead of the default MLP; it brings its
            own likelihood, so ``likelihood`` and ``eta_dec`` must then be left out.
        optimizer, lr_scheduler: LightningCLI callables (default Adam, lr 1e-3).
    """

    schedulable = ("beta",)

    def __init__(self, data_shape: tuple[int, ...] = (196,),
                 target_shape: tuple[int, ...] = (588,), latent_dim: int = 16,
                 hidden: list[int] = [512], activation: str = "relu", linear: bool = False,
                 likelihood: str | None = None, eta_dec: float | None = None,
                 eta_enc: float = 1.0, prior: Literal["standard", "learned"] = "standard",
                 beta: float = 1.0, encoder: EncoderCallable | None = None,
                 decoder: DecoderCallable | None = None,
                 optimizer: OptimizerCallable | None = None,
                 lr_scheduler: LRSchedulerCallable | None = None) -> None:
        x_shape = _shape("data_shape", data_shape)
        y_shape = _shape("target_shape", target_shape)
        if int(latent_dim) != latent_dim or latent_dim <= 0:
            check("latent_dim", latent_dim, "a positive integer")
        m, dx, dy = int(latent_dim), math.prod(x_shape), math.prod(y_shape)
        if prior not in ("standard", "learned"):
            check("prior", prior, "'standard' or 'learned'")
        eta_enc = check_number("eta_enc", eta_enc, strict=True)
        if prior == "learned" and eta_enc != 1.0:
            check("eta_enc", eta_enc, "1.0 (left out) with prior='learned': it is the std of "
                  "the standard prior")
        if decoder is not None and (likelihood is not None or eta_dec is not None):
            field, value = ("likelihood", likelihood) if likelihood is not None \
                else ("eta_dec", eta_dec)
            check(field, value, "None when a decoder is given (it sets the default decoder; a "
                  "given decoder has its own)")
        if linear and (encoder is not None or decoder is not None):
            check("linear", linear, "false when an encoder or decoder is given (linear=True "
                  "builds its own)")
        sigma = 1.0 if eta_dec is None else check_number("eta_dec", eta_dec, strict=True)
        name = "gaussian" if likelihood is None else likelihood
        try:
            hidden = check_hidden(hidden)
            if linear:
                enc: Any = _LinearEncoder((dx + dy,), m, scale=eta_enc)
                dec: Any = _LinearDecoder(m + dx, dy, likelihood=name, sigma=sigma)
            else:
                enc = build_component(
                    encoder if encoder is not None else
                    (lambda s, k: MLPEncoder(s, k, hidden=hidden, activation=activation)),
                    (dx + dy,), m, base=Encoder, field="encoder")
                dec = build_component(
                    decoder if decoder is not None else
                    (lambda k, d: MLPDecoder(k, d, hidden=hidden, activation=activation,
                                             likelihood=name, sigma=sigma)),
                    m + dx, dy, base=Decoder, field="decoder", resolve_name=_decoders.resolve)
            learned = None
            if prior == "learned":
                learned = (_LinearEncoder(x_shape, m) if linear else
                           MLPEncoder(x_shape, m, hidden=hidden, activation=activation))
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc
        super().__init__(x_shape, m, enc, dec, StandardNormal(m, scale=eta_enc), optimizer,
                         lr_scheduler)
        if learned is not None:
            self.prior = learned
        self.target_shape = y_shape
        self.linear = bool(linear)
        self.eta_enc = eta_enc
        self.eta_dec = sigma if decoder is None else None
        self.prior_type = prior
        self.beta = check_number("beta", beta)
        self.kl_per_dim: Tensor | None = None
        self._kl_sum: Tensor | None = None
        self._kl_count = 0
        self.save_hyperparameters(ignore=["encoder", "decoder", "optimizer", "lr_scheduler"])
        # Default blocks are rebuilt from the other hyper-parameters; given ones are saved.
        for field, spec in (("encoder", encoder), ("decoder", decoder)):
            self.hparams[field] = None if spec is None else getattr(self, field).config
        if decoder is None:
            self.hparams.update(likelihood=name, eta_dec=sigma)

    # ----------------------------------------------------------------- data
    def unpack(self, batch: Any) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """(x, y) from a batch ``(x, y, ...)``; their shapes must match the model's."""
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ConfigurationError("ConditionalVAE needs batches (x, y, ...) from a conditional "
                                     "datamodule (one with a target_shape)")
        x, y = batch[0], batch[1]
        for field, t, shape in (("data_shape", x, self.data_shape),
                                ("target_shape", y, self.target_shape)):
            if tuple(t.shape[1:]) != shape and (t.dim() < 2 or t[0].numel() != math.prod(shape)):
                raise ConfigurationError(
                    f"batch shape {tuple(t.shape[1:])} does not match the model's {field} "
                    f"{shape}; ConditionalVAE needs a conditional datamodule (one with a "
                    "target_shape, batches (x, y, label))")
        return x, y

    def check_data(self, datamodule: Any) -> None:
        """Raise ``ConfigurationError`` when the training pairs do not fit the model: wrong
        shapes of x or y, a datamodule without targets, or targets outside the likelihood's
        support."""
        if datamodule is None or not hasattr(datamodule, "tensors"):
            return
        try:
            x, y = datamodule.tensors("fit")[:2]
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc
        self.unpack((x[:1], y[:1]))
        try:
            self.decoder.likelihood.check_data(y.flatten(1))
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc

    # ----------------------------------------------------------------- maths
    def encode(self, x: Tensor, y: Tensor) -> Normal:  # type: ignore[override]
        """q(z|x, y), a ``Normal`` with loc/scale of shape (B, latent_dim)."""
        return self.encoder(torch.cat([x.flatten(1), y.flatten(1)], dim=1))

    def decode(self, z: Tensor, x: Tensor) -> Tensor:  # type: ignore[override]
        """Decoder output parameter θ of p(y|x, z) (mean or logits), shape (B, y_dim)."""
        return self.decoder(torch.cat([z, x.flatten(1)], dim=1))

    def prior_distribution(self, x: Tensor) -> Normal:
        """p(z|x): N(0, η_enc² I) broadcast to (B, m) for the standard prior, else the network's."""
        if self.prior_type == "learned":
            return self.prior(x)
        zero = torch.zeros(x.shape[0], self.latent_dim, device=x.device, dtype=x.dtype)
        return Normal(zero, self.prior.scale.to(x.dtype).expand_as(zero))

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        """One pass: posterior, prior, a reparameterised z, θ, log p(y|x,z) (B,), KL (B, m)."""
        posterior = self.encode(x, y)
        prior = self.prior_distribution(x)
        z = posterior.rsample()
        theta = self.decode(z, x)
        log_py = self.decoder.likelihood.log_prob(y.flatten(1), theta)
        kl = kl_divergence(posterior, prior)
        return {"posterior": posterior, "prior": prior, "z": z, "theta": theta,
                "log_py": log_py, "kl": kl}

    def _step(self, batch: Any, stage: str) -> Any:
        x, y = self.unpack(batch)
        if stage == "train":
            y = self.decoder.likelihood.prepare(y)
        out = self(x, y)
        loss, terms = beta_vae_loss(out["log_py"], out["kl"], self.beta)
        n = x.shape[0]
        terms.pop("loss")
        output = self.log_terms(stage, loss, terms, n)
        if stage == "val":
            kl = out["kl"].detach().double().sum(0)
            self._kl_sum = kl if self._kl_sum is None else self._kl_sum + kl
            self._kl_count += n
        return output

    def on_validation_epoch_start(self) -> None:
        self._kl_sum, self._kl_count = None, 0

    def on_validation_epoch_end(self) -> None:
        if self._kl_sum is None:
            return
        total = self.trainer.strategy.reduce(self._kl_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(
            torch.tensor(float(self._kl_count), dtype=torch.float64, device=total.device),
            reduce_op="sum")
        self.kl_per_dim = (total / count).cpu()
        if not self.trainer.sanity_checking:
            self.log("val/epsilon_collapsed", (self.kl_per_dim < 0.01).sum().float(),
                     on_epoch=True, sync_dist=False)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Posterior parameters of each example, and E[y|x, z] at the prior mean of z."""
        x, y = self.unpack(batch)
        posterior = self.encode(x, y)
        return {"loc": posterior.loc, "scale": posterior.scale, "prediction": self.predict(x)}

    # -------------------------------------------------------------- contract
    def latent_terms(self, batch: Any) -> list[LatentTerm]:
        """The level z: q(z|x, y) against the matching prior p(z|x) (N(0, η_enc² I) for the
        standard prior), KL per example and dimension in closed form."""
        x, y = self.unpack(batch)
        posterior = self.encode(x, y)
        return [LatentTerm("z", posterior, kl_divergence(posterior, self.prior_distribution(x)))]

    def reconstructions(self, batch: Any) -> tuple[Tensor, Tensor]:
        """The targets y of ``batch`` and E[y|x, z] at the posterior mean, both shaped like
        the targets."""
        x, y = self.unpack(batch)
        return y.reshape(-1, *self.target_shape), self.reconstruct(x, y)

    # ------------------------------------------------------------- collapse
    @torch.no_grad()
    def kl_per_dimension(self, x: Tensor, y: Tensor) -> Tensor:
        """(1/N) Σ_n KL(q(z_i|x_n, y_n) ‖ p(z_i|x_n)) for each latent dimension i: shape (m,)."""
        return kl_divergence(self.encode(x, y), self.prior_distribution(x)).double().mean(0)

    def measured_collapse(self, x: Tensor | None = None, y: Tensor | None = None, *,
                          eps: float = 0.01) -> Tensor:
        """Collapsed latent dimensions, bool (m,): mean KL of dimension i below ``eps`` nats
        (ε-collapse, METHODS §1). The mean is over the pairs (x, y) when given, else over the
        last validation epoch (:attr:`kl_per_dim`)."""
        if (x is None) != (y is None):
            raise ValueError("measured_collapse takes both x and y, or neither (then the last "
                             "validation epoch is used); give eps by keyword")
        if x is not None:
            kl = self.kl_per_dimension(x, y)
        elif self.kl_per_dim is not None:
            kl = self.kl_per_dim
        else:
            raise ValueError("measured_collapse needs data (x, y) or a finished validation epoch")
        return kl < eps

    def theory_prediction(self, x: Tensor, y: Tensor) -> Any:
        """:func:`ilvae.theory.linear_cvae` for this model's settings on the pairs (x, y)."""
        if not (self.linear and self.prior_type == "standard" and self.eta_dec is not None
                and self.decoder.likelihood.name == "gaussian"):
            raise NotImplementedError("the closed form holds for linear=True with the standard "
                                      "prior and a fixed-variance Gaussian decoder")
        from ilvae import theory

        return theory.linear_cvae(*theory.joint_second_moments(x, y), beta=self.beta,
                                  eta_enc=self.eta_enc, eta_dec=self.eta_dec,
                                  latent_dim=self.latent_dim)

    @torch.no_grad()
    def decoder_singular_values(self) -> Tensor:
        """Singular values of U₁ (decoder weight on z) of the linear CVAE, in descending order."""
        if not self.linear:
            raise ValueError("decoder_singular_values is defined for linear=True only")
        u1 = self.decoder.weight.weight[:, : self.latent_dim]
        return torch.linalg.svdvals(u1.double())

    # ----------------------------------------------------------- generation
    @torch.no_grad()
    def sample(self, x: Tensor) -> Tensor:
        """E[y|x, z] for one draw z ~ p(z|x) per input, shaped like the targets."""
        z = self.prior_distribution(x).sample()
        return self.decoder.likelihood.mean(self.decode(z, x)).reshape(-1, *self.target_shape)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """E[y|x, z] at the prior mean of z, shaped like the targets."""
        z = self.prior_distribution(x).mean
        return self.decoder.likelihood.mean(self.decode(z, x)).reshape(-1, *self.target_shape)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, y: Tensor) -> Tensor:
        """E[y|x, z] at the posterior mean z = E_q[z|x, y], shaped like the targets."""
        z = self.encode(x, y).loc
        return self.decoder.likelihood.mean(self.decode(z, x)).reshape(-1, *self.target_shape)
