"""The generic VAE LightningModule: VAE, β-VAE, free bits, LIDVAE, IL-LIDVAE and AR-ELBO are
all this one module with a different decoder or weight (Kingma & Welling 2014; Higgins et al.
2017; Wang et al. 2021; Kinoshita et al. 2023; Takida et al. 2022)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from ilvae.checkpointing import load_block_weights
from ilvae.decoders.base import DecoderCallable
from ilvae.encoders import EncoderCallable
from ilvae.errors import check, check_number
from ilvae.likelihoods import Bernoulli, binarization_generator, binarize_fixed
from ilvae.metrics.iw_nll import importance_weighted_nll
from ilvae.models.base import LatentVariableModel
from ilvae.objectives import beta_vae_loss
from ilvae.priors import PriorCallable


class VAE(LatentVariableModel):
    """Variational autoencoder trained on the (β-weighted) evidence lower bound

        loss = −E_batch[log p(x|z)] + β · Σ_i max(λ, E_batch KL(q(z_i|x) ‖ p(z_i))),
        z ~ q(z|x) (reparameterised),

    with log p(x|z) summed over data dimensions (the decoder's likelihood), β = ``beta`` and
    λ = ``free_bits`` (0 disables it). ``beta`` is a plain attribute that schedule callbacks
    change during training; it is logged as ``train/beta`` (and the decoder's
    inverse-Lipschitz constant as ``train/L`` when it has one) whenever it changes.

    Args:
        data_shape: shape of one example; supplied by the datamodule in the CLI.
        latent_dim: m, the number of latent dimensions.
        encoder: encoder callable ``(data_shape, latent_dim) -> Encoder``.
        decoder: decoder callable ``(latent_dim, data_dim) -> Decoder``, a registered decoder
            name (``mlp``, ``lipschitz``, ``il_brenier``, ``ar_elbo``, plug-ins) or a class.
        prior: prior callable ``(latent_dim) -> Prior``.
        beta: KL weight β ≥ 0.
        free_bits: per-dimension free-bits threshold λ ≥ 0 in nats.
        optimizer, lr_scheduler: LightningCLI callables (default Adam, lr 1e-3).
        compile: compile the encoder and the decoder with ``torch.compile`` when a Trainer sets
            the model up (``configure_model``). They are compiled in place
            (``nn.Module.compile``), so parameter names, checkpoints and the blocks' methods do
            not change; the first training steps include the compilation.
        init_from: a Lightning checkpoint (e.g. an :class:`~ilvae.models.Autoencoder` run's
            ``last.ckpt``) whose ``init_blocks`` weights initialise this model's, loaded
            weights-only; names and shapes must match
            (:func:`~ilvae.checkpointing.load_block_weights`). The pretrained-encoder recipe
            of Li et al. (EMNLP 2019), see ``configs/remedies/pretrained_free_bits.yaml``.
            Not stored in the hyper-parameters: a checkpoint of this model holds the weights.
        init_blocks: which blocks ``init_from`` initialises: ``encoder``, ``decoder`` or both
            (default).
    """

    def __init__(self, data_shape: tuple[int, ...] = (64,), latent_dim: int = 16,
                 encoder: EncoderCallable | None = None,
                 decoder: DecoderCallable | None = None,
                 prior: PriorCallable | None = None, beta: float = 1.0,
                 free_bits: float = 0.0, optimizer: OptimizerCallable | None = None,
                 lr_scheduler: LRSchedulerCallable | None = None,
                 compile: bool = False, init_from: str | None = None,
                 init_blocks: list[str] | None = None) -> None:
        super().__init__(data_shape, latent_dim, encoder, decoder, prior, optimizer,
                         lr_scheduler)
        self.beta = check_number("beta", beta)
        self.free_bits = check_number("free_bits", free_bits)
        if not isinstance(compile, bool):
            check("compile", compile, "true or false")
        blocks = ("encoder", "decoder") if init_blocks is None else tuple(init_blocks)
        if not blocks or not set(blocks) <= {"encoder", "decoder"}:
            check("init_blocks", init_blocks, "a non-empty list of 'encoder', 'decoder'")
        if init_from is not None:
            load_block_weights(self, init_from, blocks, field="init_from")
        # The weights are in the state dict from here on: a checkpoint of this model must not
        # read the initialising file again when it is loaded.
        self._save_blocks(ignore=["init_from", "init_blocks"])

    def configure_model(self) -> None:
        # Lightning calls this hook before every fit/validate/test/predict: compile only once.
        if self.hparams.get("compile", False) and not getattr(self, "blocks_compiled", False):
            self.encoder.compile()
            self.decoder.compile()
            self.blocks_compiled = True

    # ----------------------------------------------------------------- maths
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """One pass: posterior, a reparameterised z, θ = decoder(z), log p(x|z) (B,), KL (B, m).

        γ* = per-dimension MSE of E[x|z] (Dai et al. 2020) is logged as ``{stage}/gamma_star``.
        """
        posterior = self.encode(x)
        z = posterior.rsample()
        theta = self.decoder(z)
        log_px = self.decoder.likelihood.log_prob(x.flatten(1), theta)
        kl = self.prior.kl(posterior, z)
        return {"posterior": posterior, "z": z, "theta": theta, "log_px": log_px, "kl": kl}

    def _step(self, batch: Any, stage: str) -> Any:
        x, _ = self.unpack(batch)
        if stage == "train":
            x = self.decoder.likelihood.prepare(x)
        out = self(x)
        loss, terms = self.objective(out)
        terms.pop("loss")
        with torch.no_grad():
            target = x.flatten(1)
            mean = self.decoder.likelihood.mean(out["theta"])
            dtype = torch.promote_types(mean.dtype, target.dtype)
            terms["gamma_star"] = (mean.to(dtype) - target).square_().mean()  # mean((E[x|z] − x)²)
        return self.log_terms(stage, loss, terms, x.shape[0])

    def objective(self, out: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one batch and its logged terms (``loss``, ``recon``, ``kl``, ``elbo``)
        from the output of :meth:`forward`; a model adding a term (e.g.
        :class:`~ilvae.models.MMDVAE`) extends it."""
        return self._loss(out["log_px"], out["kl"])

    def _loss(self, log_px: Tensor, kl: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """:func:`~ilvae.objectives.beta_vae_loss`; without free bits the KL penalty is the
        batch-mean KL it reports anyway, so it is computed once (and β = 1 needs no product)."""
        beta = self.beta
        if self.free_bits > 0 or not isinstance(beta, (int, float)) or isinstance(beta, bool):
            return beta_vae_loss(log_px, kl, beta, self.free_bits)
        recon = -log_px.mean()
        kl_total = kl.sum(-1).mean()
        loss = recon + (kl_total if beta == 1 else beta * kl_total)
        return loss, {"loss": loss, "recon": recon, "kl": kl_total, "elbo": -(recon + kl_total)}

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The test metrics of :meth:`_step` (``test/elbo`` etc., on the data as given: grey
        levels for a Bernoulli likelihood) and, for a Bernoulli likelihood,
        ``test/elbo_binarized``: the same ELBO on the fixed binarisation
        :func:`~ilvae.likelihoods.binarize_fixed` of the test split, the number the literature
        reports. The binarisation's generator restarts with every test epoch and is consumed
        batch by batch, so an unshuffled single-process test loop scores exactly
        ``binarize_fixed(x_test)`` (under multi-process testing each process binarises its own
        shard from the same stream)."""
        loss = self._step(batch, "test")
        if isinstance(self.decoder.likelihood, Bernoulli):
            x, _ = self.unpack(batch)
            generator = getattr(self, "_binarization_generator", None)
            if generator is None:
                generator = self._binarization_generator = binarization_generator()
            out = self(binarize_fixed(x, generator))
            elbo = (out["log_px"] - out["kl"].sum(-1)).mean()
            self.log("test/elbo_binarized", elbo, on_step=False, on_epoch=True,
                     batch_size=x.shape[0], sync_dist=True)
        return loss

    def on_test_epoch_start(self) -> None:
        self._binarization_generator = binarization_generator()

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Posterior parameters of each example (and its label when the data have one)."""
        x, y = self.unpack(batch)
        posterior = self.encode(x)
        out = {"loc": posterior.loc, "scale": posterior.scale}
        if y is not None:
            out["y"] = y
        return out

    # -------------------------------------------------------------- contract
    @property
    def schedulable(self) -> tuple[str, ...]:
        """``beta``, and ``L`` (the decoder's inverse-Lipschitz constant) when the decoder
        has one."""
        return ("beta", "L") if hasattr(self.decoder, "L") else ("beta",)

    def hparam_owner(self, name: str) -> tuple[Any, str]:
        return (self.decoder, "L") if name == "L" else (self, name)

    def schedulable_note(self, name: str) -> str:
        if name == "L":
            return (f"; the decoder {type(self.decoder).__name__} has no inverse-Lipschitz "
                    "constant `L`: use a decoder that has one (e.g. il_brenier)")
        return ""

    def iw_nll(self, x: Tensor, num_samples: int = 500,
               chunk_size: int | None = None) -> Tensor:
        """Importance-weighted NLL per example, (B,) float64 nats, K = ``num_samples``
        (:func:`~ilvae.metrics.iw_nll.importance_weighted_nll`)."""
        return importance_weighted_nll(self, x, num_samples, chunk_size)

    # ----------------------------------------------------------- generation
    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """E[x|z] for n draws z ~ p(z), shaped like the data."""
        z = self.prior.sample(n)
        return self.decoder.mean(z).reshape(n, *self.data_shape)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """E[x|z] at the posterior mean z = E_q[z|x]."""
        return self.decoder.mean(self.encode(x).loc).reshape(x.shape[0], *self.data_shape)
