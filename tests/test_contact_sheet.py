"""Pictures of what the clusters hold: a PNG contact sheet with one captioned row of sample
images per chosen cluster (the largest, the smallest, random ones), drawn at the monitor's
epochs and by `dcluster show clusters RUN`."""
from __future__ import annotations

import numpy as np
from PIL import Image

from dcluster.cli import main
from dcluster.data.source import FolderSource
from dcluster.reporting.contact_sheet import CAPTION, choose_rows, contact_sheet
from dcluster.train import train


def test_rows_are_the_largest_smallest_and_random_clusters_once_each():
    labels = np.repeat(np.arange(10), np.arange(1, 11))  # cluster c holds c + 1 images
    labels = np.append(labels, -1)  # an unreadable image belongs to no cluster
    targets = np.zeros(len(labels), dtype=np.int64)
    targets[labels == 9] = np.arange(10) % 2  # the largest: 5 of each class
    rows = choose_rows(labels, clusters_each=2, per_cluster=3, seed=0, targets=targets,
                       class_names=["even", "odd"])
    assert [(r.kind, r.cluster) for r in rows[:4]] == [("largest", 9), ("largest", 8),
                                                       ("smallest", 0), ("smallest", 1)]
    assert [r.kind for r in rows[4:]] == ["random", "random"]
    assert len({r.cluster for r in rows}) == 6
    assert rows[0].caption == "largest #9: 10 images, majority even (50% pure)"
    assert [len(r.images) for r in rows[2:4]] == [1, 2]  # a small cluster shows what it has
    assert all((labels[r.images] == r.cluster).all() for r in rows)


def test_the_sheet_is_a_png_of_one_row_per_cluster_and_a_tile_per_image(demo_digits, tmp_path):
    source = FolderSource(demo_digits)
    labels = np.random.default_rng(0).integers(0, 5, len(source))  # 5 clusters: 5 rows
    path = contact_sheet(source, labels, tmp_path / "sheet.png", seed=0, clusters_each=4,
                         per_cluster=6)
    with Image.open(path) as sheet:
        assert sheet.format == "PNG"
        assert sheet.size == (6 * 64, 5 * (64 + CAPTION))
        pixels = np.asarray(sheet.convert("L"))
    tiles = [pixels[r * (64 + CAPTION) + CAPTION:(r + 1) * (64 + CAPTION), c * 64:(c + 1) * 64]
             for r in range(5) for c in range(6)]
    assert all(tile.std() > 0 for tile in tiles)  # 30 drawn digits, no blank tile


def test_monitored_epochs_draw_the_sheet_and_show_clusters_draws_it_again(
        small_demo_config, capsys, tmp_path):
    run = train(small_demo_config("epochs=1", "monitor.every=1", "tracking.enabled=false"))
    drawn = run.run_dir / "plots" / "clusters_e000001.png"
    with Image.open(drawn) as sheet:  # k = 10 clusters: 4 largest, 4 smallest, 2 random
        assert sheet.size == (8 * 64, 10 * (64 + CAPTION))
    out = tmp_path / "again.png"
    assert main(["show", "clusters", str(run.run_dir), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert out.read_bytes() == drawn.read_bytes()
    assert main(["show", "clusters", str(run.run_dir), "--epoch", "7"]) == 2
    assert "no cluster assignments of epoch 7" in capsys.readouterr().err
