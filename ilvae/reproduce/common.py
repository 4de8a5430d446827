"""Shared machinery of the reproduction studies: context, training, evaluation, report."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ilvae.errors import ConfigurationError


def environment() -> dict[str, Any]:
    """Versions and machine, recorded in every report."""
    import lightning
    import numpy
    import torchmetrics

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torchmetrics": torchmetrics.__version__,
        "numpy": numpy.__version__,
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "processor": platform.processor() or "unknown",
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


@dataclass
class StudyContext:
    """Collects rows, tables, plots and findings of one study and writes the report."""

    study: str
    out: Path
    quick: bool
    seed: int
    force: bool = False
    title: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    findings: list[tuple[str, bool, str]] = field(default_factory=list)
    configs: list[str] = field(default_factory=list)
    #: (run name, seconds, optimisation steps) of every training run, recorded by :func:`fit`.
    timings: list[tuple[str, float, int]] = field(default_factory=list)
    #: Model, data, trainer and callback settings of every training run, recorded by :func:`fit`.
    run_configs: list[dict[str, Any]] = field(default_factory=list)
    #: (seconds, how it was computed): the expected wall time of the full size, from this run.
    full_size_time: tuple[float, str] | None = None
    #: Worker processes for the independent runs of :func:`run_parallel`.
    jobs: int = 1

    # ------------------------------------------------------------------ life
    def __enter__(self) -> StudyContext:
        self.out.mkdir(parents=True, exist_ok=True)
        if (self.out / "report.md").exists():
            if not self.force:
                raise ConfigurationError(f"out={self.out} already holds a report.md; choose "
                                         "another directory or pass --force (old files are "
                                         "renamed, never deleted)")
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for name in ("report.md", "results.json"):
                if (self.out / name).exists():
                    (self.out / name).rename(self.out / f"{name}.{stamp}.bak")
        self._start = time.time()
        torch.manual_seed(self.seed)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.write()

    # --------------------------------------------------------------- content
    @property
    def size(self) -> str:
        return "quick" if self.quick else "full"

    def add_row(self, **row: Any) -> dict[str, Any]:
        clean = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in row.items()}
        self.rows.append(clean)
        return clean

    def add_section(self, heading: str, text: str) -> None:
        self.sections.append(f"## {heading}\n\n{text.strip()}\n")

    def add_table(self, heading: str, rows: list[dict[str, Any]], columns: list[str],
                  note: str = "") -> None:
        body = markdown_table(rows, columns)
        self.add_section(heading, f"{note.strip()}\n\n{body}" if note else body)

    def add_plot(self, fig: Any, name: str, caption: str) -> Path:
        path = self.out / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        self.sections.append(f"![{caption}]({path.name})\n\n*{caption}*\n")
        return path

    def finding(self, claim: str, agrees: bool, evidence: str) -> None:
        """A statement of agreement or disagreement with a paper's claim or a closed form."""
        self.findings.append((claim, bool(agrees), evidence))

    def seconds_per_step(self) -> float:
        """Training seconds per optimisation step over every run so far (measured here)."""
        seconds = sum(t for _, t, _ in self.timings)
        steps = sum(n for _, _, n in self.timings)
        return seconds / steps if steps else math.nan

    def expect_full_size(self, seconds: float, how: str) -> None:
        """Record the expected wall time of the full size, computed from this run's timings."""
        self.full_size_time = (float(seconds), how)

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    # ---------------------------------------------------------------- report
    def write(self) -> None:
        wall = time.time() - self._start
        env = environment()
        command = "ilvae reproduce " + self.study + (" --quick" if self.quick else "") + \
            f" --seed {self.seed} --out {shlex.quote(str(self.out))}"
        agree = sum(a for _, a, _ in self.findings)
        lines = [f"# {self.title}", "",
                 f"Size: **{self.size}**; seed {self.seed}; wall time {wall / 60:.1f} min.", "",
                 f"Command: `{command}`", ""]
        if self.full_size_time is not None:
            seconds, how = self.full_size_time
            lines += [f"Expected wall time of the full size on this machine: "
                      f"**{_duration(seconds)}** ({how}).", ""]
        lines += ["## Summary: agreement with the papers and closed forms", ""]
        if self.findings:
            lines.append(f"{agree} of {len(self.findings)} checks agree.")
            lines.append("")
            lines.append("| claim | agrees | evidence (measured here) |")
            lines.append("|---|---|---|")
            for claim, ok, evidence in self.findings:
                lines.append(f"| {claim} | {'yes' if ok else '**no**'} | {evidence} |")
        else:
            lines.append("No reference claims were checked in this study.")
        lines.append("")
        lines.extend(self.sections)
        lines += ["## Environment", "",
                  markdown_table([env], list(env)), "",
                  f"Command line: `{' '.join(shlex.quote(a) for a in sys.argv)}`", ""]
        if self.configs or self.run_configs:
            lines += ["## Configurations", ""] + [f"```yaml\n{c.strip()}\n```\n"
                                                 for c in self.configs]
        if self.run_configs:
            import yaml

            text = yaml.safe_dump(self.run_configs, sort_keys=False, allow_unicode=True,
                                  default_flow_style=None, width=100)
            (self.out / "configs.yaml").write_text(text)
            lines += [f"Settings of all {len(self.run_configs)} training runs (also in "
                      "[configs.yaml](configs.yaml)):", "", "<details><summary>configs.yaml"
                      "</summary>", "", f"```yaml\n{text.strip()}\n```", "", "</details>", ""]
        (self.out / "report.md").write_text("\n".join(lines))
        payload = [dict(row, study=self.study, size=self.size, seed=row.get("seed", self.seed))
                   for row in self.rows]
        (self.out / "results.json").write_text(json.dumps(payload, indent=2, default=float))


# ------------------------------------------------------------------ training
def _plain(value: Any) -> Any:
    """A YAML-safe rendering of a setting (callables by qualified name, tensors as lists)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 16 else f"tensor of shape {tuple(value.shape)}"
    if isinstance(value, type) or (callable(value) and hasattr(value, "__qualname__")):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


def _settings(obj: Any) -> dict[str, Any]:
    """Public scalar and list attributes of a datamodule or callback."""
    return {k: _plain(v) for k, v in vars(obj).items() if not k.startswith("_")
            and k not in _LIGHTNING_FLAGS and isinstance(v, (str, int, float, bool, list, tuple))}


# Lightning's own DataModule attributes, the same for every run.
_LIGHTNING_FLAGS = {"prepare_data_per_node", "allow_zero_length_dataloader_with_multiple_devices"}


def run_config(name: str, seed: int, model: Any, datamodule: Any,
               trainer_kwargs: dict[str, Any]) -> dict[str, Any]:
    """What one training run used: model class and init arguments, data, trainer, callbacks."""
    kwargs = dict(trainer_kwargs)
    callbacks = kwargs.pop("callbacks", None) or []
    cls = type(model)
    return {"run": name, "seed": seed,
            "model": {"class_path": f"{cls.__module__}.{cls.__qualname__}",
                      "init_args": _plain(dict(getattr(model, "hparams", {})))},
            "data": {"class_path": f"{type(datamodule).__module__}."
                     f"{type(datamodule).__qualname__}", "settings": _settings(datamodule)},
            "trainer": _plain(kwargs),
            "callbacks": [{"class_path": f"{type(c).__module__}.{type(c).__qualname__}",
                           "settings": _settings(c)} for c in callbacks]}


def trainer(ctx: StudyContext, name: str, max_epochs: int | None = None,
            max_steps: int = -1, callbacks: list | None = None, **kwargs: Any) -> L.Trainer:
    """A quiet Trainer logging to TensorBoard under ``ctx.out/runs/name``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(ctx.out / "runs"), name=name, version="")
    return L.Trainer(max_epochs=max_epochs, max_steps=max_steps, accelerator="cpu",
                     devices=1, logger=logger, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False,
                     callbacks=callbacks or [], deterministic=True, **kwargs)


def fit(ctx: StudyContext, name: str, model: L.LightningModule, datamodule: Any,
        **trainer_kwargs: Any) -> float:
    """Train and return seconds per epoch."""
    L.seed_everything(ctx.seed, verbose=False)
    ctx.run_configs.append(run_config(name, ctx.seed, model, datamodule, trainer_kwargs))
    tr = trainer(ctx, name, **trainer_kwargs)
    start = time.time()
    tr.fit(model, datamodule)
    seconds = time.time() - start
    ctx.timings.append((name, seconds, int(tr.global_step)))
    return seconds / max(tr.current_epoch, 1)


def _run_one(run: Any, ctx: StudyContext, threads: int, setting: dict[str, Any]) -> tuple:
    """One run of :func:`run_parallel`, on an empty copy of ``ctx``; returns its result and the
    timings and settings that :func:`fit` recorded."""
    import dataclasses

    own = dataclasses.replace(ctx, rows=[], sections=[], findings=[], configs=[], timings=[],
                              run_configs=[])
    torch.set_num_threads(threads)  # the same arithmetic as in one process
    result = run(own, **setting)
    return result, own.timings, own.run_configs


def run_parallel(ctx: StudyContext, run: Any, settings: list[dict[str, Any]]) -> list[Any]:
    """``[run(ctx, **setting) for setting in settings]`` for a study's independent runs, in
    ``ctx.jobs`` worker processes (those of :mod:`ilvae.sweep`); results, timings and run
    settings come back in the order of ``settings``, so a report does not depend on ``jobs``.

    ``run`` is a module-level function that seeds everything it draws (as :func:`fit` does) and
    returns what the study needs (rows, not ``ctx.add_row``): the same numbers in one process or
    in several.
    """
    from ilvae.sweep import map_in_workers

    items = [(run, ctx, torch.get_num_threads(), setting) for setting in settings]
    out = []
    for result, timings, configs in map_in_workers(_run_one, items, ctx.jobs):
        ctx.timings.extend(timings)
        ctx.run_configs.extend(configs)
        out.append(result)
    return out


def step_seconds(model: L.LightningModule, datamodule: Any, steps: int = 20,
                 warmup: int = 5, clock: Any = time.perf_counter) -> float:
    """Median seconds per training batch of ``model`` over ``steps`` batches after ``warmup``,
    measured in a throwaway Trainer (no logger, no checkpoint): the cost of a size this run does
    not train, for the expected full-size time. Counted in batches, not optimiser steps, so a
    model that takes several steps per batch (the lagging encoder's inner loop) is timed per
    batch too."""
    import statistics

    batches = steps + warmup + 1

    class _Clock(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            self.times.append(clock())
            if len(self.times) >= batches:
                trainer.should_stop = True

    timer = _Clock()
    L.Trainer(max_epochs=-1, accelerator="cpu", devices=1, logger=False,
              enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
              limit_val_batches=0, callbacks=[timer]).fit(model, datamodule)
    gaps = [b - a for a, b in zip(timer.times, timer.times[1:], strict=False)][warmup:]
    return statistics.median(gaps)


@torch.no_grad()
def evaluate(model: Any, x: torch.Tensor, iw_samples: int = 100, fisher: bool = False,
             max_iw: int = 2000, per_dimension: bool = False) -> dict[str, Any]:
    """Collapse metrics of a trained model on data ``x`` (see :mod:`ilvae.metrics`).

    ``elbo`` (one draw z ~ q(z|x) per example, closed-form KL, mean over x) and ``iw_nll``
    (K = ``iw_samples``, on the first ``max_iw`` examples) are scored on x as given: for a
    Bernoulli likelihood these are the grey-level values. A Bernoulli model is also scored on
    the fixed binarisation :func:`~ilvae.likelihoods.binarize_fixed` of x, the numbers the
    literature reports: ``elbo_binarized`` and ``iw_nll_binarized``. The KL metrics (``kl``,
    ``epsilon_collapsed``) are measured against the model's own N(0, η² I) prior;
    ``per_dimension=True`` adds ``kl_per_dim``, the list (kl_1, …, kl_m) whose sum is ``kl``.
    """
    from ilvae.likelihoods import Bernoulli, binarize_fixed
    from ilvae.metrics import (
        ActiveUnits,
        EpsilonCollapse,
        ImportanceWeightedNLL,
        KLPerDimension,
        MutualInformation,
        RelativeFisherDivergence,
    )
    from ilvae.metrics.kl_per_dimension import model_prior_scale

    model.eval()
    posterior = model.encode(x)
    eta = model_prior_scale(model)
    kl = KLPerDimension(prior_scale=eta)
    au, mi, eps = ActiveUnits(), MutualInformation(), EpsilonCollapse(prior_scale=eta)
    for metric in (kl, au, mi, eps):
        metric.update(posterior)
    kl_value = kl.compute()
    out = {"elbo": _elbo(model, x, posterior), "kl": float(kl_value["kl"]),
           "mutual_info": float(mi.compute()), "active_units": int(au.compute()),
           "epsilon_collapsed": int(eps.compute()["epsilon_collapsed"])}
    if per_dimension:
        out["kl_per_dim"] = [float(v) for v in kl_value["kl_per_dim"]]
    if iw_samples:
        iw = ImportanceWeightedNLL(num_samples=iw_samples)
        iw.update(x[:max_iw], model)
        out["iw_nll"] = float(iw.compute())
    if fisher:
        rf = RelativeFisherDivergence()
        rf.update(x[:max_iw], model)
        value = rf.compute()
        out["relative_fisher"] = float(value["relative_fisher"])
        out["relative_fisher_bound"] = float(value["relative_fisher_bound"])
    likelihood = getattr(getattr(model, "decoder", None), "likelihood", None)
    if isinstance(likelihood, Bernoulli):
        x_bin = binarize_fixed(x)
        out["elbo_binarized"] = _elbo(model, x_bin, model.encode(x_bin))
        if iw_samples:
            iw = ImportanceWeightedNLL(num_samples=iw_samples)
            iw.update(x_bin[:max_iw], model)
            out["iw_nll_binarized"] = float(iw.compute())
    return out


def _elbo(model: Any, x: torch.Tensor, posterior: Any) -> float:
    """Mean over x of log p(x|z) − KL(q(z|x) ‖ p(z)), one draw z ~ q(z|x) per example."""
    z = posterior.rsample()
    return float((model.decoder.log_prob(x, z) - model.prior.kl(posterior, z).sum(-1)).mean())
