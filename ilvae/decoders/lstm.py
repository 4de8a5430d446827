"""LSTM language-model decoder of the text VAE (Bowman et al., 2016), with z entering either the
standard way (He et al., 2019) or only at the output layer through an inverse-Lipschitz Brenier
map (LIDVAE, Wang, Blei & Cunningham, NeurIPS 2021; IL-LIDVAE, Kinoshita et al., ICML 2023).

Sentences are token-id rows in the layout of :mod:`ilvae.tokens`. ``<pad>`` and ``<bos>`` are
never predicted, so the output layer has C = vocab_size − 2 classes: class c is token id
c + ``CLASS_OFFSET`` (``<eos>`` is class 0). Not a registered :class:`~ilvae.decoders.Decoder`:
it reads the previous tokens as well as z.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ilvae.decoders.il_brenier import ILBrenierDecoder
from ilvae.tokens import BOS, EOS, PAD

#: Output class c is token id c + CLASS_OFFSET (<pad> and <bos> are never predicted).
CLASS_OFFSET = EOS


def _shift(tokens: Tensor) -> Tensor:
    """Decoder inputs: ``<bos>`` followed by every token but the last."""
    bos = tokens.new_full((*tokens.shape[:-1], 1), BOS)
    return torch.cat([bos, tokens[..., :-1]], dim=-1)


class LSTMDecoder(nn.Module):
    """LSTM language model p(x|z) = Π_t p(w_t | w_<t, z) with output logits

    * ``z_injection="standard"`` (He et al., 2019): c₀ = W z, h₀ = tanh(c₀) and z concatenated to
      every input embedding; logits_t = V h_t + b.
    * ``z_injection="brenier"``: the LSTM runs from a zero state on the words alone, and z enters
      only at the output layer, logits_t = V h_t + b + u(z) with

          u(z) = [0; g(z)] ∈ R^C,   g = ILBrenierDecoder(latent_dim, C − 1, L),

      the 0 on the ``<eos>`` class. Reading of LIDVAE's "Brenier maps at the output layer": the
      likelihood's natural parameter must be injective in z. Softmax logits are only identified
      up to adding a constant to every class, so an injective g: R^m → R^C would not make
      z ↦ p(·|z) injective (g(z) − g(z′) ∝ 1 leaves it unchanged). Pinning one class's term at 0
      (the usual reference-class parameterisation of a categorical) fixes that constant: if two
      codes give the same distributions then u(z) − u(z′) = c·1 with first entry 0, so c = 0 and
      g(z) = g(z′), hence z = z′. The map z ↦ u(z) is L-inverse-Lipschitz
      (‖u(z) − u(z′)‖ = ‖g(z) − g(z′)‖ ≥ L‖z − z′‖); measured modulo constants, ‖P(u(z) − u(z′))‖
      with P the centring projection, the constant is at least L/√C. β of the Brenier map is the
      fixed isometric zero padding [I; 0] (the LIDVAE text code used an untrained,
      uninitialised matrix instead).

    ``inputs`` (optional, same shape as ``tokens``) are the tokens fed to the LSTM, shifted right
    behind ``<bos>``; they default to ``tokens`` (teacher forcing) and differ only under word
    dropout. ``z`` may carry leading sample dimensions, ``(*S, B, m)``; results then have them
    too. With ``"brenier"`` the LSTM then runs once for all samples.
    """

    def __init__(self, vocab_size: int, latent_dim: int, embedding_dim: int, hidden_dim: int,
                 z_injection: str = "standard", L: float = 1.0,
                 brenier_hidden: list[int] = [256],  # noqa: B006
                 brenier_activation: str = "leaky_relu") -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.latent_dim = latent_dim
        self.num_classes = vocab_size - CLASS_OFFSET
        self.z_injection = z_injection
        standard = z_injection == "standard"
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=PAD)
        self.lstm = nn.LSTM(embedding_dim + (latent_dim if standard else 0), hidden_dim,
                            batch_first=True)
        self.output = nn.Linear(hidden_dim, self.num_classes)
        if standard:
            self.init_state = nn.Linear(latent_dim, hidden_dim)
        else:
            self.brenier = ILBrenierDecoder(latent_dim, self.num_classes - 1, L=L,
                                            hidden=brenier_hidden,
                                            activation=brenier_activation)

    @property
    def L(self) -> float:
        """Inverse-Lipschitz constant of z ↦ u(z) (``"brenier"`` only; settable)."""
        if self.z_injection != "brenier":
            raise AttributeError("L exists only with z_injection='brenier'")
        return self.brenier.L

    @L.setter
    def L(self, value: float) -> None:
        if self.z_injection != "brenier":
            raise AttributeError("L exists only with z_injection='brenier'")
        self.brenier.L = value

    def output_term(self, z: Tensor) -> Tensor:
        """u(z) = [0; g(z)], the output-layer term of ``"brenier"``: (..., m) → (..., C)."""
        if self.z_injection != "brenier":
            raise AttributeError("output_term exists only with z_injection='brenier'")
        g = self.brenier(z.reshape(-1, self.latent_dim))
        u = torch.cat([g.new_zeros(len(g), 1), g], dim=1)
        return u.reshape(*z.shape[:-1], self.num_classes)

    def _initial_state(self, z: Tensor) -> tuple[Tensor, Tensor]:
        c = self.init_state(z).unsqueeze(0)
        return torch.tanh(c), c

    def forward(self, tokens: Tensor, z: Tensor, inputs: Tensor | None = None) -> Tensor:
        """Logits of the C output classes at every position: (*S, B, T, C)."""
        x = self.embedding(_shift(tokens if inputs is None else inputs))  # (B, T, E)
        if self.z_injection == "brenier":
            h, _ = self.lstm(x)
            return self.output(h) + self.output_term(z).unsqueeze(-2)
        samples, batch, steps = z.shape[:-2], x.shape[0], x.shape[1]
        n = math.prod(samples)
        flat_z = z.reshape(n * batch, -1)
        x = x.unsqueeze(0).expand(n, *x.shape).reshape(n * batch, steps, -1)
        x = torch.cat([x, flat_z.unsqueeze(1).expand(-1, steps, -1)], dim=-1)
        h, _ = self.lstm(x, self._initial_state(flat_z))
        return self.output(h).reshape(*samples, batch, steps, self.num_classes)

    def token_log_probs(self, tokens: Tensor, z: Tensor, inputs: Tensor | None = None) -> Tensor:
        """log p(w_t | w_<t, z) at every position, 0 at pads: (*S, B, T)."""
        logits = self(tokens, z, inputs)
        mask = tokens != PAD
        target = torch.where(mask, tokens - CLASS_OFFSET, 0).expand(*logits.shape[:-1])
        picked = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return torch.where(mask, picked - torch.logsumexp(logits, dim=-1), 0.0)

    def log_prob(self, tokens: Tensor, z: Tensor, inputs: Tensor | None = None) -> Tensor:
        """log p(x|z) summed over the sentence's tokens (<eos> included): (*S, B)."""
        return self.token_log_probs(tokens, z, inputs).sum(-1)

    @torch.no_grad()
    def generate(self, z: Tensor, max_length: int, greedy: bool = False) -> Tensor:
        """Sentences decoded from z (B, m) one token at a time, by sampling (or argmax when
        ``greedy``): (B, max_length) rows in the data layout. A sentence that has no <eos>
        after ``max_length − 1`` words gets one there."""
        batch = z.shape[0]
        tokens = torch.full((batch, max_length), PAD, dtype=torch.long, device=z.device)
        previous = torch.full((batch,), BOS, dtype=torch.long, device=z.device)
        done = torch.zeros(batch, dtype=torch.bool, device=z.device)
        if self.z_injection == "brenier":
            state, bias = None, self.output_term(z)
        else:
            state, bias = self._initial_state(z), 0.0
        for t in range(max_length):
            x = self.embedding(previous).unsqueeze(1)
            if self.z_injection == "standard":
                x = torch.cat([x, z.unsqueeze(1)], dim=-1)
            h, state = self.lstm(x, state)
            logits = self.output(h[:, 0]) + bias
            if greedy:
                cls = logits.argmax(-1)
            else:
                cls = torch.multinomial(torch.softmax(logits.float(), -1), 1).squeeze(-1)
            token = cls + CLASS_OFFSET if t < max_length - 1 else torch.full_like(cls, EOS)
            tokens[:, t] = torch.where(done, PAD, token)
            done |= token == EOS
            if bool(done.all()):
                break
            previous = token
        return tokens


__all__ = ["CLASS_OFFSET", "LSTMDecoder"]
