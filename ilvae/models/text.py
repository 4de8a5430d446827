"""Text VAE: an LSTM encoder and an LSTM language-model decoder (Bowman et al., 2016), with the
latent code entering the decoder either the standard way (He et al., 2019) or only at the output
layer through an inverse-Lipschitz Brenier map (LIDVAE, Wang, Blei & Cunningham, NeurIPS 2021;
IL-LIDVAE, Kinoshita et al., ICML 2023).

Sentences are token-id rows laid out as in :mod:`ilvae.tokens`:
``w₁ … w_n <eos> <pad> …``. The decoder predicts every non-pad position (the n words and
<eos>) from the previous tokens, with ``<bos>`` as its first input. ``<pad>`` and ``<bos>`` are
never predicted, so the output layer has C = vocab_size − 2 classes: class c is token id c + 2
(``<eos>`` is class 0).

The blocks live where their names say: :class:`~ilvae.encoders.LSTMEncoder`,
:class:`~ilvae.decoders.lstm.LSTMDecoder` and the metric :class:`~ilvae.metrics.text_nll.TextNLL`;
this module holds the model and re-exports the blocks for old imports.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.distributions import Normal

from ilvae._config import build_component
from ilvae.decoders.lstm import CLASS_OFFSET, LSTMDecoder
from ilvae.encoders import LSTMEncoder
from ilvae.errors import ConfigurationError, check, check_int, check_number
from ilvae.metrics.iw_nll import iw_bound
from ilvae.metrics.text_nll import TextNLL
from ilvae.models.base import LatentVariableModel
from ilvae.objectives import beta_vae_loss
from ilvae.priors import Prior, PriorCallable, StandardNormal
from ilvae.tokens import EOS, PAD, SPECIALS, UNK

Z_INJECTIONS = ("standard", "brenier")


class TextVAE(LatentVariableModel):
    """Sentence VAE trained on the (β-weighted) evidence lower bound

        loss = −E_batch[Σ_t log p(w_t | w_<t, z)] + β · Σ_i max(λ, E_batch KL(q(z_i|x) ‖ p(z_i))),

    the token log-likelihoods summed over each sentence's non-pad positions (words and <eos>),
    the KL summed over latent dimensions, both averaged over sentences; β = ``beta``,
    λ = ``free_bits``. See :class:`LSTMDecoder` for how z enters the decoder.

    Logged: ``{stage}/loss``, ``/recon``, ``/kl``, ``/elbo`` (per sentence, nats);
    ``train/beta`` and, with ``"brenier"``, ``train/L`` (the settable ``decoder.L``, so the
    β- and L-annealing callbacks apply). At validation and test, with K = ``num_iw_samples``:

        {stage}/iw_nll = mean over sentences of −log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x),
        {stage}/ppl    = exp(Σ_x NLL_K(x) / Σ_x (n_x + 1)),

    z_k ~ q(z|x), n_x + 1 the words of x plus its <eos> (``<bos>`` and pads are not counted).
    E[NLL_K] ≥ −log p(x), decreasing in K (Burda et al., 2016); K = 0 skips both. With
    :class:`~ilvae.callbacks.CollapseMonitor` switch its own ``iw_nll`` off (this module already
    logs the metric).

    As every :class:`~ilvae.models.base.LatentVariableModel`: the training loss passes through
    the loss guard (a NaN/inf loss stops the run with a report, or the batch is skipped; see
    :mod:`ilvae.loss_guard`), ``val/`` and ``test/`` values are averaged over processes
    (``sync_dist``; ``iw_nll`` and ``ppl`` come from sums reduced across processes), and
    ``load_from_checkpoint`` loads with ``weights_only=True`` by default.

    Args:
        data_shape: ``(max_length,)``; supplied by the datamodule in the CLI.
        vocab_size: token ids, the four special ones included (≥ 5); supplied by the datamodule.
        latent_dim: m.
        embedding_dim, hidden_dim: word-embedding and LSTM widths (encoder and decoder each).
        z_injection: ``"standard"`` or ``"brenier"`` (LIDVAE-style, see :class:`LSTMDecoder`).
        L: inverse-Lipschitz constant of z ↦ u(z) with ``"brenier"`` (0 is LIDVAE).
        brenier_hidden, brenier_activation: widths and activation of each ICNN of the Brenier
            map (``"leaky_relu"`` or ``"softplus"``).
        word_dropout: during training each decoder input word is replaced by ``<unk>`` with this
            probability (Bowman et al., 2016); the likelihood itself is never corrupted.
        beta, free_bits: KL weight β ≥ 0 and per-dimension free-bits threshold λ ≥ 0 (nats).
        prior: prior callable ``(latent_dim) -> Prior`` (default N(0, I)).
        num_iw_samples, iw_chunk_size: K of the importance-weighted NLL, and how many samples
            are decoded at once (memory ∝ chunk · batch · max_length · vocab_size).
        optimizer, lr_scheduler: LightningCLI callables (default Adam, lr 1e-3).

    >>> model = TextVAE(data_shape=(8,), vocab_size=20, latent_dim=4, embedding_dim=8,
    ...                 hidden_dim=16, z_injection="brenier", brenier_hidden=[8])
    >>> tokens = torch.tensor([[5, 6, 2, 0, 0, 0, 0, 0]])
    >>> model.encode(tokens).loc.shape, model.decoder.log_prob(tokens, torch.zeros(1, 4)).shape
    (torch.Size([1, 4]), torch.Size([1]))
    """

    @property
    def schedulable(self) -> tuple[str, ...]:
        """``beta``, and ``L`` (the decoder's settable constant) with the ``"brenier"`` output."""
        return ("beta", "L") if hasattr(self.decoder, "L") else ("beta",)

    def hparam_owner(self, name: str) -> tuple[Any, str]:
        return (self.decoder, "L") if name == "L" else (self, name)

    def __init__(self, data_shape: tuple[int, ...], vocab_size: int, latent_dim: int = 32,
                 embedding_dim: int = 256, hidden_dim: int = 512,
                 z_injection: str = "standard", L: float = 1.0,
                 brenier_hidden: list[int] = [256],  # noqa: B006
                 brenier_activation: str = "leaky_relu", word_dropout: float = 0.0,
                 beta: float = 1.0, free_bits: float = 0.0, prior: PriorCallable | None = None,
                 num_iw_samples: int = 500, iw_chunk_size: int = 10,
                 optimizer: OptimizerCallable | None = None,
                 lr_scheduler: LRSchedulerCallable | None = None) -> None:
        # LatentVariableModel.__init__ builds ilvae Encoder/Decoder blocks from the sizes
        # (data_shape, latent_dim); the LSTM blocks need the vocabulary and widths instead, so
        # this sets the same attributes itself and inherits the rest: training_step and the
        # logging of log_terms, the default loss guard, the weights_only load_from_checkpoint,
        # and on_fit_start (and the CLI) calling check_data before training.
        super(LatentVariableModel, self).__init__()
        shape = tuple(data_shape)
        if len(shape) != 1 or isinstance(shape[0], bool) or not isinstance(shape[0], int) \
                or shape[0] < 2:
            raise ConfigurationError(f"data_shape={data_shape!r} is not allowed: expected "
                                     "(max_length,) with max_length >= 2 (it is supplied by the "
                                     "datamodule)")
        self.data_shape = shape
        self.max_length = self.data_dim = shape[0]
        self.vocab_size = check_int("vocab_size", vocab_size, len(SPECIALS) + 1)
        self.latent_dim = check_int("latent_dim", latent_dim)
        embedding_dim = check_int("embedding_dim", embedding_dim)
        hidden_dim = check_int("hidden_dim", hidden_dim)
        if z_injection not in Z_INJECTIONS:
            check("z_injection", z_injection, f"one of {', '.join(map(repr, Z_INJECTIONS))}")
        if z_injection == "brenier" and self.vocab_size - CLASS_OFFSET - 1 < self.latent_dim:
            check("vocab_size", vocab_size, f"an integer >= latent_dim + {CLASS_OFFSET + 1} = "
                  f"{self.latent_dim + CLASS_OFFSET + 1} with z_injection='brenier' (the Brenier "
                  f"map needs vocab_size - {CLASS_OFFSET + 1} >= latent_dim)")
        self.word_dropout = check_number("word_dropout", word_dropout)
        if self.word_dropout >= 1:
            check("word_dropout", word_dropout, "a probability in [0, 1)")
        self.beta = check_number("beta", beta)
        self.free_bits = check_number("free_bits", free_bits)
        self.num_iw_samples = check_int("num_iw_samples", num_iw_samples, 0)
        self.iw_chunk_size = check_int("iw_chunk_size", iw_chunk_size)
        self.encoder = LSTMEncoder(self.vocab_size, self.latent_dim, embedding_dim, hidden_dim)
        try:
            self.decoder = LSTMDecoder(self.vocab_size, self.latent_dim, embedding_dim,
                                       hidden_dim, z_injection, L, brenier_hidden,
                                       brenier_activation)
            self.prior = build_component(StandardNormal if prior is None else prior,
                                         self.latent_dim, base=Prior, field="prior")
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc
        self.z_injection = z_injection
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.save_hyperparameters(ignore=["prior", "optimizer", "lr_scheduler"])
        if hasattr(self.prior, "config"):
            self.hparams["prior"] = self.prior.config
        self._nll = nn.ModuleDict({"val": TextNLL(), "test": TextNLL()})

    # ----------------------------------------------------------------- maths
    def encode(self, tokens: Tensor) -> Normal:
        """q(z|x) as a ``Normal`` with loc/scale of shape (B, latent_dim)."""
        return self.encoder(tokens)

    def forward(self, tokens: Tensor, inputs: Tensor | None = None) -> dict[str, Tensor]:
        """Posterior, a reparameterised z, log p(x|z) (B,) and the KL per dimension (B, m);
        ``inputs`` are the decoder inputs (default: ``tokens``)."""
        posterior = self.encode(tokens)
        z = posterior.rsample()
        log_px = self.decoder.log_prob(tokens, z, inputs)
        return {"posterior": posterior, "z": z, "log_px": log_px,
                "kl": self.prior.kl(posterior, z)}

    def drop_words(self, tokens: Tensor) -> Tensor:
        """``tokens`` with each word (not <eos>, not pad) replaced by <unk> with probability
        ``word_dropout``."""
        if self.word_dropout == 0:
            return tokens
        words = (tokens != PAD) & (tokens != EOS)
        drop = torch.rand(tokens.shape, device=tokens.device) < self.word_dropout
        return torch.where(words & drop, UNK, tokens)

    @torch.no_grad()
    def iw_nll(self, tokens: Tensor, num_samples: int | None = None,
               chunk_size: int | None = None) -> Tensor:
        """NLL_K(x) = −log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x), per sentence:
        (B,) float64 nats. All sentences at once, the K samples in chunks of ``chunk_size``
        (defaults: ``num_iw_samples``, ``iw_chunk_size``). Nothing in the model depends on the
        training flag (word dropout belongs to the training step), so any mode gives the same."""
        k_total = self.num_iw_samples if num_samples is None else num_samples
        posterior = self.encode(tokens)
        batch = tokens.shape[0]

        def log_weights(k: int) -> Tensor:
            z = posterior.sample((k,))  # (k, B, m)
            log_pz = self.prior.log_prob(z.reshape(k * batch, -1)).reshape(k, batch)
            return self.decoder.log_prob(tokens, z) + log_pz - posterior.log_prob(z).sum(-1)

        return iw_bound(log_weights, k_total,
                        self.iw_chunk_size if chunk_size is None else chunk_size)

    # -------------------------------------------------------------- training
    def _tokens(self, batch: Any) -> Tensor:
        tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
        if tokens.dtype != torch.long or tokens.ndim != 2 or tokens.shape[1] != self.max_length:
            raise ConfigurationError(
                f"TextVAE expects int64 token rows (B, {self.max_length}), got {tokens.dtype} "
                f"{tuple(tokens.shape)}; use TextDataModule")
        return tokens

    def _step(self, batch: Any, stage: str) -> Any:
        tokens = self._tokens(batch)
        inputs = self.drop_words(tokens) if stage == "train" else None
        out = self(tokens, inputs)
        loss, terms = beta_vae_loss(out["log_px"], out["kl"], self.beta, self.free_bits)
        terms.pop("loss")
        output = self.log_terms(stage, loss, terms, tokens.shape[0])
        if stage != "train" and self.num_iw_samples > 0:
            self._nll[stage].update(self.iw_nll(tokens), tokens)
        return output

    def _log_nll(self, stage: str) -> None:
        metric = self._nll[stage]
        if metric.update_count:
            # compute() already synchronises the sums across processes.
            for name, value in metric.compute().items():
                self.log(f"{stage}/{name}", value.float(), sync_dist=False)
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_nll("val")

    def on_test_epoch_end(self) -> None:
        self._log_nll("test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Posterior parameters of each sentence (and the batch's second tensor as ``y``)."""
        posterior = self.encode(self._tokens(batch))
        out = {"loc": posterior.loc, "scale": posterior.scale}
        if isinstance(batch, (tuple, list)) and len(batch) > 1:
            out["y"] = batch[1]
        return out

    def unpack(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        """(tokens, y) from a batch; tokens must be int64 rows (B, max_length)."""
        y = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        return self._tokens(batch), y

    def check_data(self, datamodule: Any) -> None:
        """Raise ``ConfigurationError`` when the training tokens are not int64 rows
        (N, max_length) or hold ids outside [0, vocab_size). Called before the first step
        (``on_fit_start``) and by the CLI before anything is written."""
        if datamodule is None or not hasattr(datamodule, "tensors"):
            return
        tokens = self._tokens(datamodule.tensors("fit")[0])
        top = int(tokens.max())
        if top >= self.vocab_size or int(tokens.min()) < 0:
            raise ConfigurationError(
                f"the data hold token id {top} but vocab_size={self.vocab_size}; link "
                "vocab_size from the datamodule")

    def decode(self, z: Tensor) -> Tensor:
        """Greedy sentences decoded from z (B, latent_dim): token rows (B, max_length) (a
        language model has no single output parameter to return)."""
        return self.decoder.generate(z, self.max_length, greedy=True)

    def configure_optimizers(self) -> Any:
        optimizer = (self.optimizer or torch.optim.Adam)(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler(optimizer)}

    # ----------------------------------------------------------- generation
    @torch.no_grad()
    def sample(self, n: int, greedy: bool = False) -> Tensor:
        """n sentences decoded from z ~ p(z): token rows (n, max_length)."""
        return self.decoder.generate(self.prior.sample(n), self.max_length, greedy)

    @torch.no_grad()
    def reconstruct(self, tokens: Tensor, greedy: bool = True) -> Tensor:
        """Sentences decoded from the posterior mean E_q[z|x]."""
        return self.decoder.generate(self.encode(tokens).loc, self.max_length, greedy)


__all__ = ["Z_INJECTIONS", "LSTMDecoder", "LSTMEncoder", "TextNLL", "TextVAE"]
