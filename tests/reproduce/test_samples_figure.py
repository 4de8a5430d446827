"""The README's samples figure: the ImageLogger's grids, one figure pixel per image pixel; an
existing file is kept."""

from pathlib import Path

import numpy as np
from PIL import Image

from ilvae.reproduce.samples_figure import main

REPO = Path(__file__).resolve().parents[2]
DIGITS = str(REPO / "configs" / "digits" / "mlp.yaml")


def test_figure_is_written_at_the_grids_size_and_never_overwritten(tmp_path, capsys):
    out = tmp_path / "docs" / "samples.png"
    assert main(["--config", DIGITS, "--epochs", "1", "--out", str(out)]) == 0
    # 8×8 digits upscaled by 14, 8 per row with 2-pixel lines: 8 × 114 + 2 wide; two panels of
    # two rows (16 samples; 8 images above their reconstructions), each 2 × 114 + 2 high, under
    # three 30-pixel captions (the title and one per panel)
    width, height = 8 * (8 * 14 + 2) + 2, 2 * (2 * (8 * 14 + 2) + 2) + 3 * 30
    first = np.asarray(Image.open(out))
    assert first.shape[:2] == (height, width)
    assert main(["--config", DIGITS, "--epochs", "1", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(out)), first)
    assert main(["--config", DIGITS, "--epochs", "1", "--out", str(out), "--force"]) == 0
    assert np.array_equal(np.asarray(Image.open(out.with_name("samples.previous.png"))), first)
