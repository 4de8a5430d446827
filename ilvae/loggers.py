"""Pictures and histograms for every Lightning logger, where a run's files go, and how to look at
a run afterwards.

Lightning sends scalars (``self.log``) to every logger of the Trainer; pictures have no common
API, so the callbacks that draw them (:class:`~ilvae.callbacks.ImageLogger`,
:class:`~ilvae.callbacks.LatentPlot`, :class:`~ilvae.callbacks.CollapseMonitor`) publish through
this module, which uses each logger's own public API:

- ``TensorBoardLogger``: ``SummaryWriter.add_image`` and ``add_histogram``;
- ``MLFlowLogger``: ``MlflowClient.log_image(run_id, image, key=TAG, step=STEP)`` (the UI's image
  view, with a step slider); a histogram's values as the JSON artifact ``TAG/step_STEP.json``
  (``MlflowClient.log_dict``), MLflow having no histograms;
- ``WandbLogger``: ``WandbLogger.log_image`` and ``wandb.Histogram``;
- any other logger (``CSVLogger``, …): nothing, with one warning per run naming it.

Every picture is rendered once (a figure to an RGB array) whatever the number of loggers.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import (
    CSVLogger,
    Logger,
    MLFlowLogger,
    TensorBoardLogger,
    WandbLogger,
)
from lightning.pytorch.utilities import rank_zero_warn

#: Loggers already told that they receive no pictures (one notice per logger, so per run).
_NOTIFIED: weakref.WeakSet = weakref.WeakSet()

_PICTURE_LOGGERS = (TensorBoardLogger, MLFlowLogger, WandbLogger)


def picture_loggers(trainer: L.Trainer) -> list[Logger]:
    """The Trainer's loggers that can show pictures. Each other logger is named once, in a
    warning saying that it receives the scalars only."""
    found = []
    for logger in trainer.loggers:
        if isinstance(logger, _PICTURE_LOGGERS):
            found.append(logger)
        elif logger not in _NOTIFIED:
            _NOTIFIED.add(logger)
            rank_zero_warn(f"{type(logger).__name__} has no API for pictures: it receives the "
                           "scalars only (images, figures and histograms go to "
                           "TensorBoardLogger, MLFlowLogger or WandbLogger)")
    return found


def figure_to_array(figure: Any) -> np.ndarray:
    """A matplotlib figure rendered to an (H, W, 3) uint8 array, then closed."""
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return rgb


def _to_array(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(C, H, W) floats in [0, 1] (or an (H, W, 3) uint8 array) as (H, W, 3) / (H, W) uint8.
    The rounding is TensorBoard's (``x * 255`` truncated), so every logger shows the same
    pixels."""
    if isinstance(image, np.ndarray):
        return image
    array = (image.detach().float().cpu().clamp(0, 1) * 255).to(torch.uint8)
    array = array.permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def log_image(trainer: L.Trainer, tag: str, image: torch.Tensor | np.ndarray, step: int) -> None:
    """Send one image to every logger that shows pictures: a (C, H, W) tensor of values in
    [0, 1] (C = 1 or 3) or an (H, W, 3) uint8 array (a rendered figure)."""
    loggers = picture_loggers(trainer)
    if not loggers:
        return
    array = _to_array(image)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            formats = "HW" if array.ndim == 2 else "HWC"
            logger.experiment.add_image(tag, array, step, dataformats=formats)
        elif isinstance(logger, MLFlowLogger):
            # key + step: the MLflow UI's image view, with a step slider; synchronous so that
            # a run that ends right after still has its last picture.
            logger.experiment.log_image(logger.run_id, array, key=tag, step=step,
                                        synchronous=True)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[array], step=step)


def log_figure(trainer: L.Trainer, tag: str, figure: Any, step: int) -> None:
    """Render a matplotlib figure once, send it to every logger that shows pictures, and
    close it."""
    if not picture_loggers(trainer):
        import matplotlib.pyplot as plt

        plt.close(figure)
        return
    log_image(trainer, tag, figure_to_array(figure), step)


def log_histogram(trainer: L.Trainer, tag: str, values: torch.Tensor, step: int) -> None:
    """Send the values behind a histogram to every logger that shows pictures (MLflow, which
    has no histograms, gets the values themselves as ``TAG/step_N.json``)."""
    values = values.detach().float().cpu()
    for logger in picture_loggers(trainer):
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_histogram(tag, values, step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_dict(logger.run_id, {"step": step, "values": values.tolist()},
                                       f"{tag}/step_{step}.json")
        elif isinstance(logger, WandbLogger):
            import wandb

            logger.log_metrics({tag: wandb.Histogram(values.numpy())}, step=step)


def run_directory(trainer: L.Trainer) -> str:
    """The folder of this run's own files (``config.yaml``, ``summary.json``, ``checkpoints/``).

    For a first logger that writes a folder per run (TensorBoard, CSV) it is that folder,
    ``trainer.log_dir``; for the others (MLflow, W&B) ``trainer.log_dir`` is their store, shared by
    every run (or None for a database store), so the folder is the one Lightning's
    ``ModelCheckpoint`` puts the run's checkpoints under: ``SAVE_DIR/NAME/VERSION`` from the
    logger's public ``save_dir`` (the root directory when the store is remote), ``name`` and
    ``version`` (for MLflow the experiment and run ids, for W&B the project and run id). Without
    a logger it is the root directory (``ilvae fit`` gives each such run its own). Call it on
    rank zero only: asking MLflow or W&B for their ids starts their run there.
    """
    if not trainer.loggers:
        return str(trainer.default_root_dir)
    first = trainer.loggers[0]
    if isinstance(first, (TensorBoardLogger, CSVLogger)):
        return str(first.log_dir)
    version = first.version
    version = version if isinstance(version, str) else f"version_{version}"
    return os.path.join(str(first.save_dir or trainer.default_root_dir), str(first.name), version)


def how_to_view(logger: Logger) -> str | None:
    """One line telling how to look at the run this logger wrote, or None for a logger this
    module does not know."""
    if isinstance(logger, TensorBoardLogger):
        return f"view with: tensorboard --logdir {logger.log_dir}"
    if isinstance(logger, CSVLogger):
        return f"metrics (CSV): {os.path.join(logger.log_dir, 'metrics.csv')}"
    if isinstance(logger, MLFlowLogger):
        uri = logger.experiment.tracking_uri
        return f"view with: mlflow ui --backend-store-uri {uri}   (run {logger.run_id})"
    if isinstance(logger, WandbLogger):
        run = logger.experiment
        if run.offline:
            # `run.dir` is the run's files folder; its parent is what `wandb sync` uploads
            return (f"offline W&B run; upload with: wandb sync {os.path.dirname(run.dir)}   "
                    "(then open the URL it prints)")
        return f"view at: {run.url}"
    return None
