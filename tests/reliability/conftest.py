"""Shared set-up of the reliability tests: a small run configuration and child processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FAULTS = HERE / "_faults.py"
sys.path.insert(0, str(HERE))  # _faults and _ddp, for the tests and for configs' class paths

# Four epochs of three steps (48 training and 16 validation examples, batches of 16) with state
# in three places a resumed run must restore: the KL-annealing schedule, the AR-ELBO decoder's
# running variance, and the RNG (a posterior sample at every step).
CONFIG = """\
seed_everything: 7
trainer:
  max_epochs: 4
  deterministic: true
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: ilvae.callbacks.KLAnnealing
      init_args: {{length: 20}}
{extra}
model:
  class_path: ilvae.models.VAE
  init_args:
    latent_dim: 3
    encoder:
      class_path: ilvae.encoders.MLPEncoder
      init_args: {{hidden: [16]}}
    decoder:
      class_path: ar_elbo
      init_args: {{hidden: [16]}}
data:
  class_path: ilvae.datamodules.ArrayDataModule
  init_args: {{path: {data}, batch_size: 16, val_fraction: 0.25}}
"""
STEPS_PER_EPOCH = 3


def write_config(directory: Path, extra_callbacks: str = "", name: str = "run.yaml") -> Path:
    """The run configuration above, with ``extra_callbacks`` (YAML list items) appended."""
    data = directory / "data.npy"
    if not data.exists():
        np.save(data, np.random.default_rng(0).random((64, 10)).astype(np.float32))
    path = directory / name
    path.write_text(CONFIG.format(extra=extra_callbacks, data=data))
    return path


def kill_callback(step: int, moment: str, marker: Path, target: str = "last") -> str:
    return (f"    - class_path: _faults.KillAt\n"
            f"      init_args: {{step: {step}, moment: {moment}, marker: '{marker}', "
            f"target: {target}}}\n")


def run_child(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``ilvae`` in a child process (one torch thread), as a user would run it."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.run([sys.executable, str(FAULTS), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
