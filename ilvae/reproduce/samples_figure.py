"""A figure of a model's prior samples and reconstructions, for the README.

    python -m ilvae.reproduce.samples_figure --config configs/quickstart.yaml \\
        --out docs/quickstart_samples.png

Trains ``--config`` for ``--epochs`` epochs through the ``ilvae fit`` command (in a temporary
run directory, without logger, checkpoints or the config's callbacks), then draws the pictures
that :class:`~ilvae.callbacks.ImageLogger` sends to the loggers: seeded samples from the model's
prior and evenly spaced validation images above their reconstructions, each pixel enlarged into a
block. An existing ``--out`` is kept unless ``--force``, which renames it to
``NAME.previous.png`` (``NAME.previous.N.png`` when that is taken).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def train(config: str, epochs: int | None, root: str):
    """The model and datamodule of ``config`` after ``epochs`` epochs of ``ilvae fit`` (None:
    the config's own ``max_epochs``)."""
    from ilvae.cli import run

    epochs_arg = [] if epochs is None else [f"--trainer.max_epochs={epochs}"]
    cli = run(["fit", "--config", config, *epochs_arg,
               f"--trainer.default_root_dir={root}", "--trainer.logger=false",
               "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
               "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
               "--summary.enabled=false"])
    return cli.model, cli.datamodule


def figure(model, datamodule, num_samples: int = 16, num_reconstructed: int = 8,
           title: str = ""):
    """Samples (top) and reconstructions (bottom) of ``model`` as a matplotlib figure drawn at
    one figure pixel per image pixel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ilvae.callbacks import ImageLogger

    model.eval()
    val = datamodule.tensors("val")
    # evenly spaced validation examples, so that a set stored by class shows several classes
    index = torch.linspace(0, len(val[0]) - 1, num_reconstructed).long()
    batch = [t[index] for t in val]
    grids = ImageLogger(num_images=num_samples).grids(model, batch)
    panels = [("samples from the prior", grids["images/samples"]),
              ("validation images (top) and their reconstructions (bottom)",
               grids["images/reconstructions"])]
    heights = [grid.shape[1] for _, grid in panels]
    width = max(grid.shape[2] for _, grid in panels)
    dpi, caption = 100, 30  # pixels of title above each panel
    fig = plt.figure(figsize=(width / dpi, (sum(heights) + caption * (len(panels) + 1)) / dpi),
                     dpi=dpi)
    if title:
        fig.suptitle(title, fontsize=11)
    top = 1.0 - caption / (fig.get_figheight() * dpi)
    for name, grid in panels:
        h = grid.shape[1] / (fig.get_figheight() * dpi)
        w = grid.shape[2] / width
        top -= caption / (fig.get_figheight() * dpi)
        ax = fig.add_axes((0.0, top - h, w, h))
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(name, fontsize=10)
        top -= h
    return fig


def _free_name(out: Path) -> Path:
    """``NAME.previous.png``, or ``NAME.previous.N.png`` when that is taken."""
    candidate, n = out.with_name(f"{out.stem}.previous{out.suffix}"), 1
    while candidate.exists():
        candidate, n = out.with_name(f"{out.stem}.previous.{n}{out.suffix}"), n + 1
    return candidate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ilvae.reproduce.samples_figure",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="an `ilvae fit` config (images)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: the config's max_epochs)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--force", action="store_true",
                        help="rename an existing --out to NAME.previous.png instead of stopping")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"ilvae: error: out={str(out)!r} exists; give another --out, or --force to rename "
              "the old file to NAME.previous.png", file=sys.stderr)
        return 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        model, datamodule = train(args.config, args.epochs, root)
    with torch.random.fork_rng():
        fig = figure(model, datamodule,
                     title=f"{Path(args.config).name}, {model.trainer.current_epoch} epochs")
    if out.exists():
        out.rename(_free_name(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"ilvae: wrote {out} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
