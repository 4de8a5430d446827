"""Token ids of the text layout that the text datamodule writes and the text model reads.

The four special tokens come first, ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3,
then the words of the vocabulary. A sentence of n words is the int64 row

    w₁ … w_n <eos> <pad> … <pad>            (length ``max_length``)

so its length (the tokens a language model predicts, <eos> included) is n + 1; ``<bos>`` is
left to the model, which feeds it as the first decoder input.
"""

from __future__ import annotations

from torch import Tensor

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def lengths(tokens: Tensor) -> Tensor:
    """Number of non-pad tokens of each row (<eos> included): (..., T) → (...)."""
    return (tokens != PAD).sum(-1)


__all__ = ["BOS", "EOS", "PAD", "SPECIALS", "UNK", "lengths"]
