"""A short summary of a run's final collapse metrics, printed and saved as ``summary.json``.

At the end of fitting, validating or testing, :class:`RunSummary` reads the final values from
``trainer.callback_metrics`` and keeps those that matter for posterior collapse, whatever of
them the run logged, under their logged names (``val/elbo``, ``val/iw_nll``, ``val/kl``,
``val/kl_z1``, ``val/active_units``, ``val/mutual_info``, ``val/epsilon_collapsed``,
``train/beta``, ``train/L``, …). It prints them as a table, one aligned line per metric, and
writes them, with ``stage``, ``epoch``, ``global_step`` and ``ckpt_path``, to
``summary.json`` in the run directory (:func:`ilvae.loggers.run_directory`: the logger's run
folder, beside the run's checkpoints for MLflow and W&B; for a run without a logger the folder
``ilvae`` gives each such run). Values are plain floats; a NaN or infinite value is
written as ``null``. An existing file is never overwritten: a second summary in the same folder
(``trainer.test`` after ``trainer.fit`` from Python) goes to ``summary_<stage>.json`` or
``summary_<stage>_<n>.json``.

``ilvae fit``, ``ilvae validate`` and ``ilvae test`` add it always;
``--summary.enabled=false`` turns it off.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from ilvae.errors import check
from ilvae.loggers import run_directory

#: Metric stems (the part after ``stage/``) reported, in the order the table lists them.
STEMS = ("elbo", "elbo_binarized", "iw_nll", "kl", "active_units", "mutual_info",
         "epsilon_collapsed", "epsilon_delta_collapsed", "L", "beta")
_NAME = re.compile(r"^(?P<stage>train|val|test)/(?P<stem>[A-Za-z_]+?)(?P<level>_z\d+)?$")
_STAGE_ORDER = {"val": 0, "test": 1, "train": 2}


def _sort_key(name: str, stems: tuple[str, ...]) -> tuple[Any, ...] | None:
    """Where ``name`` goes in the summary, or None when it is not a metric reported."""
    if name.startswith("train/") and name[6:] in stems[len(STEMS):]:
        return stems.index(name[6:]), _STAGE_ORDER["train"], 0, name
    match = _NAME.match(name)
    if match is None or match["stem"] not in STEMS:
        return None
    level = int(match["level"][2:]) if match["level"] else 0
    return STEMS.index(match["stem"]), _STAGE_ORDER[match["stage"]], level, name


def collapse_metrics(metrics: dict[str, Any],
                     hyperparameters: tuple[str, ...] = ()) -> dict[str, float | None]:
    """The collapse metrics among ``metrics`` (logged name → value), then ``train/<name>`` of
    the model's schedulable ``hyperparameters`` (e.g. ``beta_2``, ``L1``), in table order, as
    plain floats (None for NaN or infinity)."""
    stems = STEMS + tuple(h for h in hyperparameters if h not in STEMS)
    keyed = sorted((key, name) for name in metrics
                   if (key := _sort_key(name, stems)) is not None)
    out: dict[str, float | None] = {}
    for _, name in keyed:
        value = metrics[name]
        value = float(value.item() if hasattr(value, "item") else value)
        out[name] = value if math.isfinite(value) else None
    return out


def format_table(summary: dict[str, Any]) -> str:
    """The printed summary: a heading, then one aligned ``name  value`` line per metric."""
    metrics = {k: v for k, v in summary.items() if "/" in k}
    head = (f"ilvae: {summary['stage']} summary (epoch {summary['epoch']}, "
            f"step {summary['global_step']})")
    if not metrics:
        return head + "\n  (no collapse metrics were logged)"
    width = max(len(name) for name in metrics)
    lines = [f"  {name:<{width}}  {'nan' if v is None else format(v, '.6g'):>12}"
             for name, v in metrics.items()]
    return "\n".join([head, *lines])


def _free_path(directory: str, filename: str, stage: str) -> str:
    """``directory/filename``, or a stage-named variant when that file exists already."""
    stem, ext = os.path.splitext(filename)
    candidates = [filename, f"{stem}_{stage}{ext}"]
    candidates += (f"{stem}_{stage}_{n}{ext}" for n in range(1, 1000))
    for name in candidates:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            return path
    raise FileExistsError(f"no free name for a summary in {directory}")


class RunSummary(Callback):
    """Print the final collapse metrics of a fit/validate/test run and save ``summary.json``.

    Args:
        enabled: whether to summarise at all.
        filename: the file written in the run directory.
    """

    def __init__(self, enabled: bool = True, filename: str = "summary.json") -> None:
        if os.path.basename(filename) != filename or not filename:
            check("summary.filename", filename, "a plain file name (no folder)")
        self.enabled = enabled
        self.filename = filename
        self.path: str | None = None  # the file the last summary went to

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._summarise(trainer, "fit")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation inside fitting (and the sanity check) is summarised at the end of fit.
        if trainer.state.fn == "validate" and not trainer.sanity_checking:
            self._summarise(trainer, "validate")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._summarise(trainer, "test")

    def summary(self, trainer: pl.Trainer, stage: str) -> dict[str, Any]:
        """The summary of ``trainer``'s run as a plain dictionary."""
        if stage == "fit":
            checkpoint = trainer.checkpoint_callback
            ckpt = (getattr(checkpoint, "last_model_path", "")
                    or getattr(checkpoint, "best_model_path", "")) if checkpoint else ""
        else:
            ckpt = trainer.ckpt_path or ""
        return {"stage": stage, "epoch": int(trainer.current_epoch),
                "global_step": int(trainer.global_step),
                "ckpt_path": str(ckpt) if ckpt else None,
                **collapse_metrics(dict(trainer.callback_metrics),
                                   tuple(getattr(trainer.lightning_module, "schedulable", ())))}

    def _summarise(self, trainer: pl.Trainer, stage: str) -> None:
        if not self.enabled:
            return
        if not trainer.is_global_zero:
            return
        directory = run_directory(trainer)
        summary = self.summary(trainer, stage)
        print(format_table(summary), flush=True)
        if directory is None:
            return
        try:
            os.makedirs(directory, exist_ok=True)
            path = _free_path(directory, self.filename, stage)
            with open(path, "x", encoding="utf-8") as stream:  # "x": never overwrite
                json.dump(summary, stream, indent=2, allow_nan=False)
                stream.write("\n")
        except OSError as exc:
            rank_zero_warn(f"RunSummary: could not write the summary to {directory}: {exc}")
            return
        self.path = path
        print(f"ilvae: summary: {path}", flush=True)
