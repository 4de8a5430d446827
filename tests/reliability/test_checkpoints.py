"""Checkpoint files: atomic writes, clear errors for damaged files, untrusted files refused."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import write_config

from ilvae.checkpointing import AtomicCheckpointIO, atomic_save, load_checkpoint
from ilvae.cli import main, run
from ilvae.errors import CheckpointError
from ilvae.models import VAE


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A finished one-epoch run: (its config, its last.ckpt)."""
    directory = tmp_path_factory.mktemp("trained")
    config = write_config(directory)
    cli = run(["fit", "--config", str(config), f"--trainer.default_root_dir={directory / 'r'}",
               "--trainer.max_epochs=1"])
    return config, Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt"


def _errors(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ilvae: error")]


def _fit_from(config: Path, root: Path, ckpt: str | Path, subcommand: str = "fit") -> int:
    return main([subcommand, "--config", str(config), f"--trainer.default_root_dir={root}",
                 f"--ckpt_path={ckpt}"])


def _tensor_data_offset(path: Path) -> int:
    """Offset of the middle of the largest tensor record inside a checkpoint archive."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
    with open(path, "rb") as file:
        file.seek(info.header_offset + 26)
        name_len = int.from_bytes(file.read(2), "little")
        extra_len = int.from_bytes(file.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


@pytest.mark.parametrize("damage", ["truncated", "empty", "bit_flip_in_tensor_data"])
def test_damaged_checkpoint_is_one_line_naming_the_file_before_anything_is_written(
        trained, tmp_path, capsys, damage):
    config, good = trained
    data = bytearray(good.read_bytes())
    bad = tmp_path / "bad.ckpt"
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = bytearray()
    else:
        offset = _tensor_data_offset(good)
        data[offset] ^= 0x40
        bad.write_bytes(data)
        # torch.load alone would hand back the damaged weights without a word.
        assert torch.load(bad, weights_only=True)["global_step"] == 3
    bad.write_bytes(data)
    root = tmp_path / "root"
    assert _fit_from(config, root, bad) == 2
    (line,) = _errors(capsys)
    assert str(bad) in line
    expected = {"truncated": "truncated or corrupted", "empty": "is empty",
                "bit_flip_in_tensor_data": "do not match the SHA-256 digest"}[damage]
    assert expected in line
    assert not root.exists()  # nothing written


def test_ckpt_path_last_that_is_corrupted_is_reported_by_name(trained, tmp_path, capsys):
    config, good = trained
    last = tmp_path / "root" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(good.read_bytes()[:1000])
    assert _fit_from(config, tmp_path / "root", "last") == 2
    (line,) = _errors(capsys)
    assert str(last) in line and "truncated or corrupted" in line


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def malicious(trained, tmp_path) -> tuple[Path, Path]:
    """A real checkpoint with a payload added to its callback states: (file, marker)."""
    _, good = trained
    checkpoint = torch.load(good, weights_only=True)
    marker = tmp_path / "payload-ran"
    checkpoint["callbacks"]["innocent"] = {"state": _Payload(marker)}
    path = tmp_path / "shared.ckpt"
    torch.save(checkpoint, path)
    return path, marker


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_malicious_checkpoint_is_refused_by_the_cli_not_executed(trained, malicious, tmp_path,
                                                                 capsys, subcommand):
    config, _ = trained
    path, marker = malicious
    assert _fit_from(config, tmp_path / "root", path, subcommand) == 2
    (line,) = _errors(capsys)
    assert str(path) in line and "refused" in line and "refers to io.open" in line
    assert not marker.exists()


def test_malicious_checkpoint_is_refused_by_the_python_loaders(malicious):
    path, marker = malicious
    with pytest.raises(CheckpointError, match="refused"):
        VAE.load_from_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused"):
        AtomicCheckpointIO().load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
    # Control: the payload is live; an unrestricted load runs it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_checkpoints_written_by_the_cli_load_with_weights_only(trained):
    _, good = trained
    checkpoint = load_checkpoint(good, weights_only=True)
    assert {"state_dict", "callbacks", "optimizer_states", "loops"} <= set(checkpoint)
    assert any("RandomStateCheckpoint" in key for key in checkpoint["callbacks"])
    model = VAE.load_from_checkpoint(good)  # weights_only=True by default
    assert model.data_shape == (10,)


def test_atomic_save_keeps_the_old_file_when_writing_fails_and_clears_stale_temporaries(
        tmp_path, monkeypatch):
    import ilvae.checkpointing as checkpointing

    path = tmp_path / "last.ckpt"
    atomic_save({"global_step": 1, "w": torch.ones(3)}, path)
    stale = tmp_path / ".last.ckpt.999999999.tmp"  # left by a process that no longer exists
    stale.write_bytes(b"partial")

    def fails_half_way(checkpoint, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing, "_write_bytes", fails_half_way)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"global_step": 2, "w": torch.zeros(3)}, path)
    assert load_checkpoint(path)["global_step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]  # no temporary left behind
