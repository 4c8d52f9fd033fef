"""The --plot figure: per-block stacked bars with stage marks, top layers, op kinds; readable at any model size."""

from __future__ import annotations

import matplotlib
import pytest
from PIL import Image

from micronet import models
from micronet.scoring import score
from micronet.scoring.report import LayerRow, _blocks, _plain_number

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)


def test_rows_group_into_stages_and_indexed_blocks():
    names = ["conv_stem", "block1.0.conv1", "block1.0.conv2", "block1.1.conv1", "trans1.conv", "block2.0.conv1",
             "fc"]
    groups = _blocks([LayerRow(n, "conv") for n in names])
    assert [(stage, block, len(rows)) for stage, block, rows in groups] == [
        ("conv_stem", "conv_stem", 1), ("block1", "block1.0", 2), ("block1", "block1.1", 1),
        ("trans1", "trans1", 1), ("block2", "block2.0", 1), ("fc", "fc", 1)]
    # a wrapper every name shares is skipped, so torchvision-style names still split into stages
    names = ("features.conv0", "features.block1.0.conv", "features.block1.1.c")
    wrapped = _blocks([LayerRow(n, "conv") for n in names])
    assert [block for _, block, _ in wrapped] == ["features.conv0", "features.block1.0", "features.block1.1"]


def test_axis_numbers_are_plain_decimals():
    assert [_plain_number(v) for v in (0, 0.00002, 0.000125, 0.5, 1.25, 3)] == ["0", "0.00002", "0.000125", "0.5",
                                                                              "1.25", "3"]


def test_figure_panels_add_up_to_the_score_and_fit(tmp_path):
    report = score(models.create("densenet_bc:depth=10,growth=4"), model_name="tiny densenet with a long name")
    fig = report.figure(plt)
    try:
        blocks, top, kinds = fig.axes
        # stacked param + op bars: every panel that covers all rows adds up to the score (hand sum of the rows)
        hand = sum(float(r.params / report.track.baseline_params + r.ops / report.track.baseline_ops)
                   for r in report.layers)
        for ax in (blocks, kinds):
            heights = [p.get_height() if ax is blocks else p.get_width() for p in ax.patches]
            assert sum(heights) == pytest.approx(hand, rel=1e-9)
        labels = [t.get_text() for t in blocks.get_xticklabels()]
        assert labels[:3] == ["conv_stem", "block1.0", "trans1"] and labels[-1] == "fc"
        assert top.get_yticklabels()[0].get_text() == "block1.0.conv2 [conv]"  # the most expensive row first
        fig.canvas.draw()
        assert all(ax.yaxis.get_offset_text().get_text() == "" and ax.xaxis.get_offset_text().get_text() == ""
                   for ax in fig.axes)  # no "1e-5" offsets
        title = fig._suptitle.get_window_extent()
        assert title.x0 >= 0 and title.x1 <= fig.bbox.width and title.y1 <= fig.bbox.height  # not clipped
    finally:
        plt.close(fig)
    path = tmp_path / "tiny.png"
    report.plot(path)
    width, height = Image.open(path).size
    assert (width, height) == (1680, 1212)


def test_figure_size_does_not_grow_with_the_number_of_layers():
    rows = [LayerRow(f"layer{s}.{b}.conv{c}", "conv", weight_numel=9, weight_nnz=9, param_bits=32)
            for s in range(1, 4) for b in range(40) for c in range(3)]
    report = score(models.create("densenet_bc:depth=10,growth=4"))
    report.layers = rows
    fig = report.figure(plt)
    try:
        assert tuple(fig.get_size_inches()) == pytest.approx((14, 5.0 + 0.26 * 15 + 1.2))
        assert len(fig.axes[0].get_xticklabels()) == 120  # one labelled bar per block
    finally:
        plt.close(fig)
