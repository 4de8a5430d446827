"""Sentences from plain-text files, one sentence per line, for text VAEs.

Tokenisation is whitespace splitting (``str.split()``: runs of spaces, tabs and other Unicode
whitespace separate tokens); nothing is lower-cased or split off, so preprocess a corpus the way
you want before training. A line that holds no token is not a sentence and is skipped.

Token ids (:mod:`ilvae.tokens`, shared with the text model): the four special tokens come
first, ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3, then the words of the
vocabulary. A sentence of n words is stored as the row

    w₁ … w_n <eos> <pad> … <pad>            (length ``max_length``, int64)

so its length (tokens a language model predicts, <eos> included) is n + 1 and ``<bos>`` is left
to the model, which feeds it as the first decoder input.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ilvae.errors import check, check_int
from ilvae.tokens import BOS, EOS, PAD, SPECIALS, UNK

from .base import VAEDataModule

_FORMAT = "ilvae.vocabulary"
_LONG = ("truncate", "drop")


class Vocabulary:
    """Bijection between tokens and ids, ``SPECIALS`` first (``<pad>`` = 0 … ``<unk>`` = 3).

    ``encode`` maps a word outside the vocabulary to ``<unk>``; a literal special token in the
    text (say ``<eos>`` inside a line) is a word like any other, so it is encoded as ``<unk>``
    too, except ``<unk>`` itself (corpora such as the Penn Treebank already contain it).

    Saved as JSON, ``{"format": "ilvae.vocabulary", "version": 1, "tokens": [...]}`` with the
    tokens in id order.

    >>> vocab = Vocabulary.build([["a", "b", "a"]])
    >>> vocab.encode(["a", "c"]), len(vocab)
    ([4, 3], 6)
    """

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = list(tokens)
        if tuple(tokens[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with the special tokens {list(SPECIALS)}, "
                             f"got {tokens[: len(SPECIALS)]}")
        if not all(isinstance(t, str) and t and not t.isspace() for t in tokens):
            raise ValueError("vocabulary tokens must be non-empty strings without whitespace")
        if len(set(tokens)) != len(tokens):
            repeated = sorted(t for t, c in Counter(tokens).items() if c > 1)
            raise ValueError(f"vocabulary tokens must be unique, repeated: {repeated[:5]}")
        self.tokens = tokens
        self.index = {t: i for i, t in enumerate(tokens)}
        for special in SPECIALS[:UNK]:
            # Literal special strings in the text are words, and map to <unk>.
            del self.index[special]

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]], max_vocab: int | None = None,
              min_count: int = 1) -> Vocabulary:
        """The words of ``sentences`` seen at least ``min_count`` times, most frequent first
        (ties in alphabetical order), cut so that the vocabulary (specials included) has at
        most ``max_vocab`` entries."""
        counts = Counter(w for sentence in sentences for w in sentence)
        for special in SPECIALS:
            counts.pop(special, None)
        words = sorted((w for w, c in counts.items() if c >= min_count),
                       key=lambda w: (-counts[w], w))
        if max_vocab is not None:
            words = words[: max_vocab - len(SPECIALS)]
        return cls([*SPECIALS, *words])

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens)"

    def encode(self, words: Sequence[str]) -> list[int]:
        """Ids of ``words``; unknown words give ``UNK``."""
        return [self.index.get(w, UNK) for w in words]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of an id sequence up to its first ``<eos>``, without ``<pad>`` and ``<bos>``."""
        words = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i not in (PAD, BOS):
                words.append(self.tokens[i])
        return words

    def to_json(self) -> str:
        return json.dumps({"format": _FORMAT, "version": 1, "tokens": self.tokens},
                          ensure_ascii=False, indent=0)

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary to ``path``. A file already there holding the same vocabulary
        is left as it is; one holding anything else raises ``FileExistsError``."""
        path = os.fspath(path)
        if self.saved_at(path):
            return
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        partial = f"{path}.partial-{os.getpid()}"
        with open(partial, "w", encoding="utf-8") as file:
            file.write(self.to_json())
        os.replace(partial, path)

    def saved_at(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` already holds this vocabulary (``False`` if there is no file);
        ``FileExistsError`` if it holds anything else. Files are written whole
        (:meth:`save` renames a finished temporary), so a reader never sees half a file."""
        path = os.fspath(path)
        if not os.path.exists(path):
            return False
        try:
            same = Vocabulary.load(path) == self
        except ValueError:
            same = False
        if not same:
            raise FileExistsError(f"{path!r} already exists and holds a different vocabulary; "
                                  "remove it or choose another vocab_path")
        return True

    @staticmethod
    def from_checkpoint(path: str | os.PathLike) -> Vocabulary:
        """The vocabulary stored in a Lightning checkpoint of a run on :class:`TextDataModule`
        (read with ``torch.load(weights_only=True)``)."""
        return _vocabulary_from_checkpoint(path)

    @classmethod
    def load(cls, path: str | os.PathLike, field: str = "vocab_path") -> Vocabulary:
        """Read a vocabulary written by :meth:`save`."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as file:
                data = json.load(file)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"{field}={path!r} could not be read as a vocabulary ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT or "tokens" not in data:
            raise ValueError(f"{field}={path!r} is not an ilvae vocabulary file (expected "
                             f"a JSON object with format {_FORMAT!r} and tokens)")
        try:
            return cls(data["tokens"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{field}={path!r}: {exc}") from None


def _vocabulary_from_checkpoint(path: str | os.PathLike) -> Vocabulary:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for value in checkpoint.values():
        if isinstance(value, dict) and "vocabulary" in value:
            return Vocabulary(value["vocabulary"])
    raise ValueError(f"{os.fspath(path)!r} holds no vocabulary: it was not trained with "
                     "TextDataModule")


def read_sentences(path: str, field: str = "train_path", labelled: bool = False
                   ) -> tuple[list[list[str]], list[int] | None]:
    """Tokenised sentences of a text file (blank lines skipped), and their labels when
    ``labelled`` (each line ``LABEL<TAB>sentence`` with LABEL an integer ≥ 0)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{field}={path!r} does not exist or is not a file")
    sentences: list[list[str]] = []
    labels: list[int] = []
    try:
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                label = None
                if labelled:
                    head, tab, line = line.partition("\t")
                    if not tab and not head.strip():
                        continue
                    label = _label(head, tab, path, field, number)
                words = line.split()
                if words:
                    sentences.append(words)
                    if label is not None:
                        labels.append(label)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{field}={path!r} is not UTF-8 text (byte {exc.start}: "
                         f"{exc.reason})") from None
    if not sentences:
        raise ValueError(f"{field}={path!r} holds no sentence (the file is empty or blank)")
    return sentences, (labels if labelled else None)


def _label(head: str, tab: str, path: str, field: str, number: int) -> int:
    try:
        label = int(head)
    except ValueError:
        label = -1
    if not tab or label < 0:
        raise ValueError(f"{field}={path!r} line {number}: expected 'LABEL<TAB>sentence' with an "
                         f"integer LABEL >= 0 (labelled=True), got {head[:30]!r}")
    return label


class TextDataModule(VAEDataModule):
    """Sentences of plain-text files (one per line) as padded token-id tensors.

    Args:
        train_path: training corpus, UTF-8, one sentence per line, tokens separated by
            whitespace (see the module docstring for tokenisation and the id layout).
        val_path: validation corpus. Without it the validation split is ``val_fraction`` of the
            training sentences (deterministic in ``seed``); with it ``val_fraction`` is ignored.
        test_path: test corpus. Without it the test split is the validation split.
        vocab_path: a ``vocab.json``. If the file exists its vocabulary is used (``max_vocab``
            and ``min_count`` are then ignored): this is how a later run, or decoding a
            checkpoint, uses the ids a model was trained with. If it does not exist the
            vocabulary is built and written there on :meth:`setup`. Without it the vocabulary
            is written to ``vocab.json`` in the trainer's log directory (beside the CLI's
            ``config.yaml``). An existing file holding a different vocabulary is never
            overwritten: :meth:`setup` raises ``FileExistsError``.
        max_length: tokens per row, <eos> included (≥ 2), so at most ``max_length - 1`` words.
        max_vocab: largest vocabulary size, the four special tokens included (≥ 5); ``None``
            keeps every word seen ``min_count`` times.
        min_count: words seen fewer times in ``train_path`` become ``<unk>`` (≥ 1).
        labelled: lines are ``LABEL<TAB>sentence`` with an integer LABEL ≥ 0; batches then carry
            the labels and ``num_classes`` is the largest training label + 1.
        long_sentences: sentences of more than ``max_length - 1`` words are cut to that many
            words (``"truncate"``, their <eos> is kept) or left out (``"drop"``).
        batch_size, val_fraction, seed, num_workers, drop_last: see :class:`VAEDataModule`.

    The vocabulary is built from the whole training file (before the validation split is
    taken from it), when the module is created, so ``vocab_size`` and ``data_shape`` =
    ``(max_length,)`` are known before any batch is made and the CLI can link them into the
    model. It is also part of the datamodule's ``state_dict``, so it is stored in Lightning
    checkpoints (``Vocabulary.from_checkpoint(path)`` reads it back to decode a model's output);
    resuming from a checkpoint built with another vocabulary is an error.

    Batches are ``(tokens, y)``: ``tokens`` int64 ``(B, max_length)`` laid out as in the module
    docstring, and ``y`` int64 ``(B,)``: the labels when ``labelled``, otherwise the lengths
    (number of non-pad tokens, <eos> included).

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "corpus.txt"
        >>> _ = path.write_text("the cat sat\\nthe dog ran away\\n")
        >>> dm = TextDataModule(str(path), max_length=6, val_fraction=0.5)
        >>> dm.data_shape, dm.vocab_size
        ((6,), 10)
    """

    def __init__(
        self,
        train_path: str,
        val_path: str | None = None,
        test_path: str | None = None,
        vocab_path: str | None = None,
        max_length: int = 32,
        max_vocab: int | None = None,
        min_count: int = 1,
        labelled: bool = False,
        long_sentences: str = "truncate",
        batch_size: int = 32,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            num_workers=num_workers,
            drop_last=drop_last,
        )
        self.max_length = check_int("max_length", max_length, 2)
        self.max_vocab = None if max_vocab is None else check_int("max_vocab", max_vocab,
                                                                    len(SPECIALS) + 1)
        self.min_count = check_int("min_count", min_count, 1)
        if not isinstance(labelled, bool):
            check("labelled", labelled, "true or false")
        self.labelled = labelled
        if long_sentences not in _LONG:
            check("long_sentences", long_sentences, f"one of {', '.join(_LONG)}")
        self.long_sentences = long_sentences
        self.train_path = _check_path(train_path, "train_path")
        self.val_path = _check_path(val_path, "val_path")
        self.test_path = _check_path(test_path, "test_path")
        self.vocab_path = None if vocab_path is None else os.fspath(vocab_path)
        self._sentences, self._labels = read_sentences(self.train_path, "train_path", labelled)
        if self.vocab_path is not None and os.path.exists(self.vocab_path):
            self.vocab = Vocabulary.load(self.vocab_path)
        else:
            self.vocab = Vocabulary.build(self._sentences, self.max_vocab, self.min_count)
        self._data_shape = (self.max_length,)
        if labelled:
            self._num_classes = max(self._labels) + 1

    @property
    def vocab_size(self) -> int:
        """Number of token ids, the four special tokens included."""
        return len(self.vocab)

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, sentences: Sequence[Sequence[str]]) -> Tensor:
        """Rows of token ids ``(N, max_length)`` int64 for tokenised sentences; a long sentence
        is cut to ``max_length - 1`` words whatever ``long_sentences`` says."""
        rows = []
        for words in sentences:
            ids = self.vocab.encode(words[: self.max_length - 1]) + [EOS]
            rows.append(ids + [PAD] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)

    def decode(self, tokens: Tensor) -> list[str]:
        """Sentences (words joined by spaces) of token-id rows ``(N, T)``, each up to its
        first ``<eos>``."""
        return [" ".join(self.vocab.decode(row)) for row in tokens.tolist()]

    def _encode_split(self, sentences: list[list[str]], labels: list[int] | None,
                      field: str) -> tuple[Tensor, Tensor]:
        if self.long_sentences == "drop":
            keep = [i for i, s in enumerate(sentences) if len(s) < self.max_length]
            if not keep:
                raise ValueError(f"{field}: no sentence has fewer than max_length="
                                 f"{self.max_length} words (long_sentences='drop')")
            sentences = [sentences[i] for i in keep]
            labels = None if labels is None else [labels[i] for i in keep]
        tokens = self.encode(sentences)
        y = (torch.tensor(labels, dtype=torch.long) if labels is not None
             else (tokens != PAD).sum(1))
        return tokens, y

    def _load_train(self) -> tuple[Tensor, Tensor | None]:
        return self._encode_split(self._sentences, self._labels, "train_path")

    def _load_file(self, path: str, field: str) -> tuple[Tensor, Tensor]:
        return self._encode_split(*read_sentences(path, field, self.labelled), field)

    def _load_test(self) -> tuple[Tensor, Tensor | None] | None:
        return None if self.test_path is None else self._load_file(self.test_path, "test_path")

    def _validate(self, x: Tensor, y: Tensor | None, split: str) -> tuple[Tensor, Tensor]:
        """Token rows keep their int64 dtype (the base class would cast data to float)."""
        if x.dtype != torch.long or x.ndim != 2 or x.shape[1] != self.max_length or not len(x):
            raise ValueError(f"{type(self).__name__} {split} tokens must be a non-empty int64 "
                             f"tensor (N, {self.max_length}), got {x.dtype} {tuple(x.shape)}")
        if y is None:
            y = (x != PAD).sum(1)
        return x, y.to(torch.long)

    # -- Lightning hooks ------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Encode the splits once (later calls reuse them) and save the vocabulary (see
        ``vocab_path``); the save is skipped when the same file is already there."""
        if self._splits is None:
            if self.val_path is None:
                super().setup(stage)
            else:
                train = self._validate(*self._load_train(), split="training")
                val = self._validate(*self._load_file(self.val_path, "val_path"),
                                     split="validation")
                test = self._load_test()
                if self.drop_last and len(train[0]) < self.batch_size:
                    check("batch_size", self.batch_size, f"at most the {len(train[0])} training "
                          "examples with drop_last=True (else no training batch is left)")
                self._splits = {"train": train, "val": val,
                                "test": val if test is None else self._validate(*test, "test")}
        self._save_vocab()

    def _save_vocab(self) -> None:
        """Write the vocabulary to ``vocab_path`` (every process: the write is atomic and a
        file holding the same vocabulary is left alone), else to ``vocab.json`` in the
        trainer's log directory (its ``default_root_dir`` when there is no logger), written by
        the global-zero process only; the others check that a file already there holds the
        same vocabulary, so that every process raises the same ``FileExistsError`` if not."""
        if self.vocab_path is not None:
            self.vocab.save(self.vocab_path)
            return
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return
        # Every process reads log_dir: under DDP it is a broadcast from rank 0, and a process
        # that skipped it would leave the others waiting for ever.
        log_dir = trainer.log_dir
        if log_dir is None:
            return
        path = os.path.join(log_dir, "vocab.json")
        if trainer.is_global_zero:
            self.vocab.save(path)
        else:
            self.vocab.saved_at(path)

    def state_dict(self) -> dict[str, Any]:
        return {"vocabulary": list(self.vocab.tokens)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("vocabulary")
        if saved is not None and list(saved) != self.vocab.tokens:
            raise ValueError(
                f"the checkpoint was trained with another vocabulary ({len(saved)} tokens) than "
                f"the one of this datamodule ({self.vocab_size} tokens); pass "
                "vocab_path=<the run's vocab.json>")


def _check_path(path: object, field: str) -> str | None:
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        check(field, path, "a file path or None")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{field}={path!r} does not exist or is not a file")
    return path
