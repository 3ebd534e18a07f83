"""gmmseg_d2.utils.visualization: fixed-range anomaly colours, colour bar, legend, metadata, writes."""
import cv2
import numpy as np
import pytest

from detectron2.data import MetadataCatalog

from gmmseg_d2.utils.visualization import (
    ANOMALY_COLORMAP, NON_FINITE_COLOR, anomaly_range_from_scores, colorize_anomaly, colorize_labels, draw_colorbar,
    draw_legend, format_ticks, imwrite_rgb, legend_entries, segmentation_metadata,
)


def _inferno(index: int):
    return cv2.applyColorMap(np.uint8([[index]]), ANOMALY_COLORMAP)[0, 0, ::-1].tolist()


def test_colorize_anomaly_uses_the_given_range_and_clips():
    score = np.array([[-5.0, 0.0, 5.0, 10.0, 20.0, np.nan]])
    rgb = colorize_anomaly(score, 0.0, 10.0)
    assert rgb.shape == (1, 6, 3) and rgb.dtype == np.uint8
    assert [rgb[0, i].tolist() for i in range(5)] == [_inferno(0), _inferno(0), _inferno(128), _inferno(255),
                                                      _inferno(255)]
    assert rgb[0, 5].tolist() == list(NON_FINITE_COLOR)
    # The same score gets the same colour whatever else is in the image.
    other = colorize_anomaly(np.array([[5.0, 1000.0]]), 0.0, 10.0)
    assert other[0, 0].tolist() == rgb[0, 2].tolist()
    with pytest.raises(ValueError, match="LO < HI"):
        colorize_anomaly(score, 1.0, 1.0)


def test_anomaly_range_from_scores_is_robust_and_pooled():
    a = np.linspace(0.0, 1.0, 101)
    b = np.concatenate([np.linspace(1.0, 2.0, 101), [1e9, np.inf]])
    lo, hi = anomaly_range_from_scores([a, b])
    finite = np.concatenate([a, b[:-1]])
    assert (lo, hi) == pytest.approx(tuple(np.percentile(finite, [1, 99])))
    assert hi < 1e9  # the one extreme pixel does not set the range
    assert anomaly_range_from_scores(np.full((4, 4), 3.0)) == (2.5, 3.5)
    with pytest.raises(ValueError, match="no finite value"):
        anomaly_range_from_scores(np.full(3, np.nan))


def test_colorbar_runs_from_hi_at_the_top_to_lo():
    bar = draw_colorbar(200, -3.0, 7.0)
    assert bar.shape[0] == 200 and bar.shape[1] > 14
    column = bar[:, 4 + 7]  # the middle of the gradient
    colors = [c.tolist() for c in column]
    top = next(i for i, c in enumerate(colors) if c == _inferno(255))
    bottom = max(i for i, c in enumerate(colors) if c == _inferno(0))
    assert top < bottom
    # Monotonic: the colour map index decreases down the bar.
    palette = {tuple(_inferno(i)): i for i in range(256)}
    indices = [palette[tuple(c)] for c in colors[top:bottom + 1]]
    assert indices == sorted(indices, reverse=True)


def test_format_ticks_tells_close_values_apart():
    assert format_ticks([59.5841, 59.5856, 59.5871]) == ["59.584", "59.586", "59.587"]
    assert format_ticks([0.0, 5.0, 10.0]) == ["0", "5", "10"]


def test_legend_shows_a_swatch_per_class_and_wraps():
    entries = [(f"class_with_a_long_name_{i}", (10 * i, 200, 255 - 10 * i)) for i in range(6)]
    narrow, wide = draw_legend(entries, 200), draw_legend(entries, 2000)
    assert narrow.shape[1] == 200 and wide.shape[1] == 2000
    assert narrow.shape[0] > wide.shape[0]  # more lines when narrow
    for block in (narrow, wide):
        pixels = {tuple(p) for p in block.reshape(-1, 3).tolist()}
        assert all(tuple(color) in pixels for _, color in entries)


def test_segmentation_metadata_falls_back_to_generic_names():
    metadata = segmentation_metadata(None, 3)
    assert metadata.stuff_classes == ["class 0", "class 1", "class 2"]
    assert len(metadata.stuff_colors) == 3 and len({tuple(c) for c in metadata.stuff_colors}) == 3
    name = "_test_visualization_partial_metadata"
    if name not in MetadataCatalog.list():
        MetadataCatalog.get(name).set(stuff_classes=["sky", "road"], stuff_colors=[[1, 2, 3], [4, 5, 6]])
    extended = segmentation_metadata(name, 3)
    assert extended.stuff_classes == ["sky", "road", "class 2"]
    assert extended.stuff_colors[:2] == [[1, 2, 3], [4, 5, 6]]
    assert [n for n, _ in legend_entries(np.array([[2, 0], [0, 255]]), extended)] == ["sky", "class 2"]
    np.testing.assert_array_equal(colorize_labels(np.array([[1, 200]]), extended.stuff_colors),
                                  [[[4, 5, 6], [0, 0, 0]]])


def test_imwrite_rgb_raises_naming_the_path(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    imwrite_rgb(str(tmp_path / "ok.png"), rgb)
    assert cv2.imread(str(tmp_path / "ok.png"))[0, 0].tolist() == [0, 0, 255]  # BGR on disk
    with pytest.raises(OSError, match="missing_dir/x.png.*folder does not exist"):
        imwrite_rgb(str(tmp_path / "missing_dir" / "x.png"), rgb)
    with pytest.raises(OSError, match="x.unknownext"):
        imwrite_rgb(str(tmp_path / "x.unknownext"), rgb)
