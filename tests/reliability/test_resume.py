"""A run killed with SIGKILL resumes with ``--ckpt_path last`` and ends exactly where the
uninterrupted run ends: same metrics, same weights, same buffers, bit for bit (CPU,
``deterministic: true``).

The child process kills itself at a chosen point (``_faults.KillAt``), so each scenario is
exact and repeatable; the slow test adds kills at random wall-clock times from outside.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _faults import final_state
from conftest import FAULTS, REPO, STEPS_PER_EPOCH, kill_callback, run_child, write_config

import ilvae.cli as cli_module
from ilvae.checkpointing import load_checkpoint
from ilvae.cli import run

MAX_EPOCHS = 4


def _fit(config: Path, root: Path, *extra: str):
    return run(["fit", "--config", str(config), f"--trainer.default_root_dir={root}", *extra])


def _assert_same_final_state(resumed: dict, reference: dict) -> None:
    assert resumed["global_step"] == reference["global_step"] == MAX_EPOCHS * STEPS_PER_EPOCH
    assert resumed["epoch"] == reference["epoch"]
    assert resumed["metrics"] == reference["metrics"]  # exact float equality
    assert resumed["beta"] == reference["beta"]
    assert resumed["state"].keys() == reference["state"].keys()
    for name, tensor in reference["state"].items():
        assert torch.equal(resumed["state"][name], tensor), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run."""
    directory = tmp_path_factory.mktemp("reference")
    cli = _fit(write_config(directory), directory / "runs")
    return final_state(cli.trainer)


def test_kill_while_saving_last_keeps_the_previous_last_and_resume_matches_exactly(
        tmp_path, reference, monkeypatch):
    marker = tmp_path / "died.txt"
    # Killed half-way through writing last.ckpt at the end of epoch 2 (after its top-k file
    # epoch=1-step=6.ckpt was written): the epoch is replayed from epoch 1's last.ckpt.
    config = write_config(tmp_path, kill_callback(2 * STEPS_PER_EPOCH, "during_save", marker))
    child = run_child(["fit", "--config", str(config),
                       f"--trainer.default_root_dir={tmp_path / 'runs'}"])
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert marker.read_text().startswith("during_save step=6")

    checkpoints = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints"
    partial = list(checkpoints.glob(".last.ckpt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the write that was cut short
    last = load_checkpoint(checkpoints / "last.ckpt")  # intact: the end of epoch 1
    assert last["global_step"] == STEPS_PER_EPOCH

    resume_config = write_config(tmp_path, name="resume.yaml")
    resumed = _fit(resume_config, tmp_path / "runs", "--ckpt_path=last")
    _assert_same_final_state(final_state(resumed.trainer), reference)

    # Control: the same resume without the RNG states in the checkpoint draws other posterior
    # samples, so the comparison above would catch a resume that lost them.
    defaults = cli_module._trainer_defaults

    def without_rng_state():
        return {"callbacks": [c for c in defaults()["callbacks"]
                              if type(c).__name__ != "RandomStateCheckpoint"]}

    monkeypatch.setattr(cli_module, "_trainer_defaults", without_rng_state)
    control = _fit(resume_config, tmp_path / "control",
                   f"--ckpt_path={checkpoints / 'last.ckpt'}")
    assert final_state(control.trainer)["metrics"] != reference["metrics"]


@pytest.mark.slow
@pytest.mark.parametrize("step,moment", [
    (STEPS_PER_EPOCH + 1, "batch_end"),       # mid-epoch, after a checkpoint exists
    (2 * STEPS_PER_EPOCH, "validation"),      # during epoch 2's end-of-epoch validation
    (3 * STEPS_PER_EPOCH, "during_save"),     # while writing last.ckpt of epoch 3
    (2 * STEPS_PER_EPOCH, "batch_end"),       # after the last step of an epoch, before saving
])
def test_kill_at_each_kind_of_moment_then_resume_matches_exactly(tmp_path, reference, step,
                                                                  moment):
    marker = tmp_path / "died.txt"
    config = write_config(tmp_path, kill_callback(step, moment, marker))
    child = run_child(["fit", "--config", str(config),
                       f"--trainer.default_root_dir={tmp_path / 'runs'}"])
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert marker.read_text().startswith(moment)
    resumed = _fit(write_config(tmp_path, name="resume.yaml"), tmp_path / "runs",
                   "--ckpt_path=last")
    _assert_same_final_state(final_state(resumed.trainer), reference)


@pytest.mark.slow
def test_repeated_sigkill_at_random_times_then_resume_until_done_matches_exactly(
        tmp_path, reference):
    """Kill the run from outside at random times (any moment: start-up, training, validation,
    saving), resume with --ckpt_path last each time, until it finishes."""
    rng = random.Random(1234)
    final = tmp_path / "final.pt"
    config = write_config(tmp_path, "    - class_path: _faults.DumpFinalState\n"
                                    f"      init_args: {{path: '{final}'}}\n")
    root = tmp_path / "runs"

    def start(*extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(FAULTS), "fit", "--config", str(config),
             f"--trainer.default_root_dir={root}", *extra],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    # How long a whole run takes on this machine now (its work is redone below).
    began = time.monotonic()
    calibration = start("--trainer.default_root_dir=" + str(tmp_path / "calibration"))
    assert calibration.wait(timeout=600) == 0, calibration.stderr.read()[-3000:]
    duration = time.monotonic() - began
    final.unlink()

    kills, finished = 0, False
    for attempt in range(6):
        resume = ["--ckpt_path=last"] if list(root.rglob("last*.ckpt")) else []
        child = start(*resume)
        # The first three kills land before even a resumed run could finish.
        latest = 0.6 if attempt < 3 else 1.0
        try:
            child.wait(timeout=rng.uniform(0.2, latest) * duration)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait()
            kills += 1
            if final.exists():  # killed after the last step's work was done
                finished = True
                break
            continue
        assert child.returncode == 0, child.stderr.read()[-3000:]
        finished = True
        break
    if not finished:  # then let one resume run to the end
        resume = ["--ckpt_path=last"] if list(root.rglob("last*.ckpt")) else []
        child = start(*resume)
        assert child.wait(timeout=600) == 0, child.stderr.read()[-3000:]
    assert kills >= 3
    newest = max(root.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    last = load_checkpoint(newest)
    assert last["global_step"] == reference["global_step"]
    for name, tensor in reference["state"].items():
        assert torch.equal(last["state_dict"][name], tensor), name
    if final.exists():  # metrics too, when the last step ran in a process that then finished
        _assert_same_final_state(torch.load(final), reference)


@pytest.mark.slow
def test_ddp_run_killed_mid_epoch_resumes_to_the_uninterrupted_ddp_result(tmp_path):
    """Two CPU processes (gloo), both killed after step 4; the resumed DDP run ends where the
    uninterrupted DDP run ends."""
    ddp = ["--trainer.strategy=ddp", "--trainer.accelerator=cpu", "--trainer.devices=2",
           "--data.batch_size=8"]

    def dump(name: str) -> str:
        return ("    - class_path: _faults.DumpFinalState\n"
                f"      init_args: {{path: '{tmp_path / name}'}}\n")

    reference = run_child(["fit", "--config", str(write_config(tmp_path, dump("ref.pt"),
                                                              name="ref.yaml")),
                           f"--trainer.default_root_dir={tmp_path / 'ref'}", *ddp])
    assert reference.returncode == 0, reference.stderr[-3000:]
    marker = tmp_path / "died.txt"
    killed = write_config(tmp_path, kill_callback(STEPS_PER_EPOCH + 1, "batch_end", marker),
                          name="killed.yaml")
    child = run_child(["fit", "--config", str(killed),
                       f"--trainer.default_root_dir={tmp_path / 'runs'}", *ddp])
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    resumed = run_child(["fit", "--config", str(write_config(tmp_path, dump("resumed.pt"),
                                                            name="resume.yaml")),
                         f"--trainer.default_root_dir={tmp_path / 'runs'}", "--ckpt_path=last",
                         *ddp])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_final_state(torch.load(tmp_path / "resumed.pt"),
                             torch.load(tmp_path / "ref.pt"))
