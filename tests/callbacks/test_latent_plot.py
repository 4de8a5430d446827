"""LatentPlot's scatter: one colour per label, named in a legend."""

import matplotlib
import numpy as np
import torch

from ilvae.callbacks import LatentPlot

matplotlib.use("Agg")


def test_legend_names_every_label_in_the_colour_of_its_points():
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    y = torch.tensor([3, 0, 7, 3, 0, 12, 7, 7])
    loc = torch.randn(8, 2)
    fig = LatentPlot().figure(loc, y)
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["0", "3", "7", "12"]
    assert legend.get_title().get_text() == "label"
    for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=True):
        label = int(text.get_text())
        # the points drawn in the handle's colour are exactly those with this label
        colour = mcolors.to_rgb(handle.get_facecolor()[0])
        points = np.concatenate([c.get_offsets() for c in ax.collections
                                 if mcolors.to_rgb(c.get_facecolor()[0]) == colour])
        np.testing.assert_allclose(np.sort(points, 0), np.sort(loc[y == label].numpy(), 0))
    plt.close(fig)


def test_unlabelled_points_have_no_legend():
    fig = LatentPlot().figure(torch.randn(5, 2), torch.full((5,), -1))
    assert fig.axes[0].get_legend() is None
    assert len(fig.axes[0].collections[0].get_offsets()) == 5
