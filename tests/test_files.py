"""Result files appear whole or not at all: written beside, renamed into place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unlearn.utils.files import save_figure, write_atomic
from unlearn.utils.grid import save_grid


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_atomic(path, '{"ca": 1}')

    def broken(self, data):
        Path.open(self, "wb").write(data[:3])  # half of it, then the machine dies
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", broken)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, '{"ca": 2}')
    assert path.read_text() == '{"ca": 1}'


def test_figures_and_grids_land_whole_with_no_leftovers(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / "tradeoff.png")
    plt.close(fig)
    save_grid(torch.rand(4, 3, 8, 8), tmp_path / "grid.png", nrow=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "tradeoff.png"]
    for name in ("grid.png", "tradeoff.png"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG" and img.size[0] > 0
