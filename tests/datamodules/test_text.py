"""TextDataModule: sentences of a text file become int64 rows ``w₁ … w_n <eos> <pad> …``, the
vocabulary is built deterministically, saved with the run and round-trips, and bad files are
rejected with one line naming the field."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ilvae.datamodules.text import (
    BOS,
    EOS,
    PAD,
    SPECIALS,
    UNK,
    TextDataModule,
    Vocabulary,
    read_sentences,
)

torch.set_num_threads(1)


def _hmm_sentences(n, seed=0, num_states=3, num_words=12):
    """Sentences of a random HMM over words w0 … w{num_words-1}, each state ends the sentence
    with probability 0.25 after every word."""
    rng = np.random.default_rng(seed)
    transition = rng.dirichlet(np.full(num_states, 0.5), size=num_states)
    emission = rng.dirichlet(np.full(num_words, 0.2), size=num_states)
    sentences = []
    for _ in range(n):
        state, words = rng.integers(num_states), []
        while not words or (rng.random() > 0.25 and len(words) < 12):
            words.append(f"w{rng.choice(num_words, p=emission[state])}")
            state = rng.choice(num_states, p=transition[state])
        sentences.append(words)
    return sentences


def _write(path, sentences):
    path.write_text("".join(" ".join(s) + "\n" for s in sentences), encoding="utf-8")
    return str(path)


def _trainer(log_dir):
    return SimpleNamespace(is_global_zero=True, log_dir=str(log_dir))


def test_rows_hold_the_words_then_eos_then_pads_as_int64(tmp_path):
    sentences = _hmm_sentences(40, seed=1)
    path = _write(tmp_path / "train.txt", sentences)
    dm = TextDataModule(path, max_length=14, val_fraction=0.0)
    dm.setup()
    tokens, lengths = dm.tensors("train")
    assert tokens.dtype == torch.long and tokens.shape == (40, 14) and dm.data_shape == (14,)
    for row, length, words in zip(tokens.tolist(), lengths.tolist(), sentences, strict=True):
        n = len(words)
        assert row[:n] == [dm.vocab.index[w] for w in words]
        assert row[n] == EOS and all(t == PAD for t in row[n + 1:])
        assert length == n + 1
    assert dm.decode(tokens) == [" ".join(s) for s in sentences]


def test_vocabulary_is_most_frequent_first_with_min_count_and_max_vocab(tmp_path):
    path = _write(tmp_path / "train.txt", [["b", "a", "c"], ["a", "b", "a"], ["d"]])
    assert TextDataModule(path).vocab.tokens == [*SPECIALS, "a", "b", "c", "d"]
    assert TextDataModule(path, min_count=2).vocab.tokens == [*SPECIALS, "a", "b"]
    dm = TextDataModule(path, max_vocab=5)
    assert dm.vocab.tokens == [*SPECIALS, "a"] and dm.vocab_size == 5
    assert (PAD, BOS, EOS, UNK) == (0, 1, 2, 3)


def test_vocabulary_round_trip_keeps_ids_and_maps_unknown_words_to_unk(tmp_path):
    vocab = Vocabulary.build(_hmm_sentences(50, seed=2))
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded == vocab and loaded.tokens == vocab.tokens
    words = ["w1", "w3", "never-seen", "<eos>", "<unk>", "<pad>"]
    ids = loaded.encode(words)
    assert ids == vocab.encode(words)
    assert ids[0] == vocab.tokens.index("w1") and ids[1] == vocab.tokens.index("w3")
    assert ids[2:] == [UNK, UNK, UNK, UNK]
    assert loaded.decode([*ids[:2], EOS, 7]) == ["w1", "w3"]


def test_vocab_is_written_to_the_log_dir_and_reused_through_vocab_path(tmp_path):
    first = _write(tmp_path / "first.txt", _hmm_sentences(60, seed=3))
    dm = TextDataModule(first, max_length=10)
    dm.trainer = _trainer(tmp_path / "run")
    dm.setup("fit")
    saved = tmp_path / "run" / "vocab.json"
    assert Vocabulary.load(saved) == dm.vocab
    # A later run on other text decodes with the saved ids.
    other = _write(tmp_path / "other.txt", [["w1", "zzz", "w2"]])
    later = TextDataModule(other, vocab_path=str(saved), max_length=10, val_fraction=0.0)
    later.setup()
    assert later.vocab == dm.vocab
    row = later.tensors("train")[0][0].tolist()
    assert row[:4] == [dm.vocab.index["w1"], UNK, dm.vocab.index["w2"], EOS]


def test_a_different_existing_vocab_is_never_overwritten(tmp_path):
    path = _write(tmp_path / "train.txt", _hmm_sentences(30, seed=4))
    run = tmp_path / "run"
    run.mkdir()
    other = Vocabulary([*SPECIALS, "x", "y"])
    other.save(run / "vocab.json")
    before = (run / "vocab.json").read_text()
    dm = TextDataModule(path)
    dm.trainer = _trainer(run)
    with pytest.raises(FileExistsError, match="different vocabulary"):
        dm.setup()
    assert (run / "vocab.json").read_text() == before
    # The same vocabulary already there is fine.
    same = TextDataModule(path)
    same.vocab.save(tmp_path / "same.json")
    same.trainer = _trainer(tmp_path)
    (tmp_path / "same.json").rename(tmp_path / "vocab.json")
    same.setup()


class _RankTrainer:
    """A trainer of process ``rank`` whose ``log_dir`` counts its reads: under DDP reading it
    is a collective (a broadcast from rank 0) that every process must join."""

    def __init__(self, log_dir, rank):
        self._log_dir, self.is_global_zero, self.reads = str(log_dir), rank == 0, 0

    @property
    def log_dir(self):
        self.reads += 1
        return self._log_dir


def test_every_process_reads_the_log_dir_and_only_rank_zero_writes(tmp_path):
    path = _write(tmp_path / "train.txt", _hmm_sentences(30, seed=6))
    run = tmp_path / "run"
    # Rank 1 first: it joins the collective but writes nothing.
    other = TextDataModule(path)
    other.trainer = _RankTrainer(run, rank=1)
    other.setup("fit")
    assert other.trainer.reads == 1 and not run.exists()
    zero = TextDataModule(path)
    zero.trainer = _RankTrainer(run, rank=0)
    zero.setup("fit")
    assert zero.trainer.reads == 1 and Vocabulary.load(run / "vocab.json") == zero.vocab
    other.setup("validate")  # rank 1 again: the same vocabulary is there, nothing to do
    assert other.trainer.reads == 2
    # A different vocabulary there: rank 1 raises as rank 0 does, so no process waits alone.
    (run / "vocab.json").unlink()
    Vocabulary([*SPECIALS, "x"]).save(run / "vocab.json")
    for rank in (0, 1):
        dm = TextDataModule(path)
        dm.trainer = _RankTrainer(run, rank)
        with pytest.raises(FileExistsError, match="different vocabulary"):
            dm.setup("fit")
    assert Vocabulary.load(run / "vocab.json") == Vocabulary([*SPECIALS, "x"])


def test_vocab_path_that_does_not_exist_is_written_on_setup(tmp_path):
    path = _write(tmp_path / "train.txt", _hmm_sentences(30, seed=5))
    target = tmp_path / "sub" / "vocab.json"
    dm = TextDataModule(path, vocab_path=str(target))
    assert not target.exists()
    dm.setup()
    data = json.loads(target.read_text())
    assert data["format"] == "ilvae.vocabulary" and data["tokens"] == dm.vocab.tokens


@pytest.mark.parametrize("field", ["train_path", "val_path", "test_path"])
def test_missing_file_is_a_one_line_error_naming_the_field(tmp_path, field):
    train = _write(tmp_path / "train.txt", [["a"]])
    kw = {"train_path": train, field: str(tmp_path / "missing.txt")}
    with pytest.raises(FileNotFoundError, match=f"{field}=.*does not exist") as info:
        TextDataModule(**kw)
    assert "\n" not in str(info.value)


def test_empty_or_blank_file_is_a_one_line_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n   \n\t\n")
    for name in ("empty.txt", "blank.txt"):
        with pytest.raises(ValueError, match="train_path=.*holds no sentence") as info:
            TextDataModule(str(tmp_path / name))
        assert "\n" not in str(info.value)
    good = _write(tmp_path / "good.txt", [["a"]])
    dm = TextDataModule(good, val_path=str(tmp_path / "blank.txt"))
    with pytest.raises(ValueError, match="val_path=.*holds no sentence"):
        dm.setup()


def test_non_utf8_file_and_bad_vocab_file_are_rejected(tmp_path):
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        TextDataModule(str(tmp_path / "latin.txt"))
    good = _write(tmp_path / "good.txt", [["a"]])
    (tmp_path / "vocab.json").write_text('{"tokens": ["a"]}')
    with pytest.raises(ValueError, match="vocab_path=.*not an ilvae vocabulary"):
        TextDataModule(good, vocab_path=str(tmp_path / "vocab.json"))


def test_val_and_test_files_give_their_own_splits(tmp_path):
    sentences = _hmm_sentences(42, seed=6)
    train_s, val_s, test_s = sentences[:30], sentences[30:37], sentences[37:]
    val_s[0] = [train_s[0][0], "never-seen"]
    dm = TextDataModule(_write(tmp_path / "train.txt", train_s),
                        val_path=_write(tmp_path / "val.txt", val_s),
                        test_path=_write(tmp_path / "test.txt", test_s), max_length=14)
    dm.setup()
    for split, part in (("train", train_s), ("val", val_s), ("test", test_s)):
        expected = [" ".join(w if w in dm.vocab.index else "<unk>" for w in s) for s in part]
        assert dm.decode(dm.tensors(split)[0]) == expected
    assert dm.decode(dm.tensors("val")[0][:1]) == [f"{train_s[0][0]} <unk>"]


def test_without_val_file_the_validation_split_partitions_the_training_file(tmp_path):
    sentences = _hmm_sentences(50, seed=9)
    dm = TextDataModule(_write(tmp_path / "train.txt", sentences), val_fraction=0.2,
                        max_length=14, seed=3)
    dm.setup()
    train, val = dm.decode(dm.tensors("train")[0]), dm.decode(dm.tensors("val")[0])
    assert len(val) == 10 and len(train) == 40
    assert sorted(train + val) == sorted(" ".join(s) for s in sentences)
    assert dm.decode(dm.tensors("test")[0]) == val


def test_loader_batches_are_tokens_and_lengths(tmp_path):
    dm = TextDataModule(_write(tmp_path / "train.txt", _hmm_sentences(20, seed=10)),
                        batch_size=8, val_fraction=0.0, max_length=14)
    dm.setup()
    tokens, lengths = next(iter(dm.train_dataloader()))
    assert tokens.shape == (8, 14) and tokens.dtype == torch.long
    assert torch.equal(lengths, (tokens != PAD).sum(1)) and dm.num_classes is None


def test_labelled_lines_give_label_batches(tmp_path):
    path = tmp_path / "labelled.txt"
    path.write_text("0\tthe cat\n2\ta dog ran\n\n1\tcat\n")
    dm = TextDataModule(str(path), labelled=True, val_fraction=0.0, max_length=5)
    dm.setup()
    tokens, labels = dm.tensors("train")
    assert labels.tolist() == [0, 2, 1] and dm.num_classes == 3
    assert dm.decode(tokens) == ["the cat", "a dog ran", "cat"]
    (tmp_path / "bad.txt").write_text("x\tthe cat\n")
    with pytest.raises(ValueError, match="line 1: expected 'LABEL<TAB>sentence'"):
        TextDataModule(str(tmp_path / "bad.txt"), labelled=True)


def test_long_sentences_are_truncated_or_dropped(tmp_path):
    path = _write(tmp_path / "train.txt", [["a", "b", "c", "d", "e"], ["a", "b"]])
    cut = TextDataModule(path, max_length=4, val_fraction=0.0)
    cut.setup()
    assert cut.decode(cut.tensors("train")[0]) == ["a b c", "a b"]
    assert cut.tensors("train")[0][0, 3].item() == EOS
    drop = TextDataModule(path, max_length=4, val_fraction=0.0, long_sentences="drop")
    drop.setup()
    assert drop.decode(drop.tensors("train")[0]) == ["a b"]
    with pytest.raises(ValueError, match="long_sentences"):
        TextDataModule(path, long_sentences="wrap")


def test_checkpoint_state_rejects_another_vocabulary(tmp_path):
    dm = TextDataModule(_write(tmp_path / "train.txt", _hmm_sentences(20, seed=11)))
    dm.load_state_dict(dm.state_dict())
    with pytest.raises(ValueError, match="another vocabulary"):
        dm.load_state_dict({"vocabulary": [*SPECIALS, "x"]})


def test_read_sentences_skips_blank_lines_and_splits_on_any_whitespace(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a  b\tc\n\n  d \n")
    assert read_sentences(str(path)) == ([["a", "b", "c"], ["d"]], None)


def test_from_checkpoint_names_a_checkpoint_without_vocabulary(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="holds no vocabulary"):
        Vocabulary.from_checkpoint(tmp_path / "other.ckpt")
