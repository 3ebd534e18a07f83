"""tools/visualize_predictions.py: refuses random weights, one anomaly range, checked writes."""
import importlib.util
import os

import cv2
import numpy as np
import pytest
import torch

from gmmseg_d2.engine import AtomicDetectionCheckpointer
from gmmseg_d2.utils.visualization import ANOMALY_COLORMAP, segmentation_metadata
from tests.conftest import REPO_ROOT

CONFIG = os.path.join(REPO_ROOT, "configs", "mosaic", "fcn_R18_gmm.yaml")


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "visualize_predictions", os.path.join(REPO_ROOT, "tools", "visualize_predictions.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return _load_tool()


@pytest.fixture(scope="module")
def mosaic_weights(small_mosaic_root, tmp_path_factory):
    """An (untrained) GMM FCN-R18 of the mosaic config saved as model_final.pth."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from gmmseg_d2.config import add_gmmseg_config

    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("visualize_model"))
    AtomicDetectionCheckpointer(build_model(cfg), save_dir=folder).save("model_final")
    return os.path.join(folder, "model_final.pth")


def _inferno(index: int):
    return cv2.applyColorMap(np.uint8([[index]]), ANOMALY_COLORMAP)[0, 0, ::-1].tolist()


def _rows(anomaly_values, size=(16, 16)):
    """Synthetic prediction rows with constant anomaly maps."""
    rows = []
    for index, value in enumerate(anomaly_values):
        label = np.full(size, index % 3, dtype=np.uint8)
        rows.append(dict(kind="sem_seg", dataset="toy", file_name=f"img{index}.png",
                         image=np.full(size + (3,), 90, np.uint8), label=label, prediction=label.copy(),
                         anomaly=np.full(size, float(value))))
    return rows


def test_refuses_random_and_missing_weights(tool, tmp_path, capsys):
    output = str(tmp_path / "pred.png")
    with pytest.raises(SystemExit) as error:
        tool.main(["--config-file", CONFIG, "--output", output, "MODEL.DEVICE", "cpu"])
    assert error.value.code != 0
    message = capsys.readouterr().err
    assert "MODEL.WEIGHTS is empty" in message and "MODEL.WEIGHTS path/to/model_final.pth" in message
    assert "--opts" not in message  # this tool takes the overrides positionally
    missing = str(tmp_path / "model_final.pth")
    with pytest.raises(SystemExit):
        tool.main(["--config-file", CONFIG, "--output", output, "MODEL.WEIGHTS", missing])
    assert missing in capsys.readouterr().err
    assert not os.path.exists(output)


def test_rows_share_one_fixed_anomaly_range(tool):
    """Constant maps 0, 5, 10 on the range [0, 10]: dark, middle, bright, not all alike.

    The old per-image min-max scaling painted every constant map the same.
    """
    rows = _rows([0.0, 5.0, 10.0])
    metadata = segmentation_metadata(None, 3)
    picture = tool.render_rows(rows, metadata, (0.0, 10.0))
    scale = -(-tool.MIN_ROW_HEIGHT // 16)
    tile = 16 * scale
    x = tool.LABEL_COLUMN_WIDTH + 3 * tile + tile // 2  # the middle of the anomaly column
    titles_h = picture.shape[0] - 3 * tile - tool.draw_legend(
        tool.legend_entries(np.arange(3), metadata), picture.shape[1]).shape[0]
    colors = [picture[titles_h + row * tile + tile // 2, x].tolist() for row in range(3)]
    assert colors == [_inferno(0), _inferno(128), _inferno(255)]
    # The class legend lists the three classes by their generic names.
    assert [name for name, _ in tool.legend_entries(np.arange(3), metadata)] == ["class 0", "class 1", "class 2"]


def test_end_to_end_with_saved_weights(tool, mosaic_weights, tmp_path, capsys):
    output = str(tmp_path / "pred.png")
    picture = tool.main(["--config-file", CONFIG, "--output", output, "--num-rows", "2",
                         "MODEL.WEIGHTS", mosaic_weights, "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0"])
    written = cv2.imread(output)[:, :, ::-1]
    np.testing.assert_array_equal(written, picture)
    out = capsys.readouterr().out
    assert f"Wrote {output} (4 rows" in out
    # Label column + 4 tiles of 128 px (mosaic images are 128x128) + colour bar.
    assert picture.shape[1] > tool.LABEL_COLUMN_WIDTH + 4 * 128
    assert picture.shape[0] > 4 * 128


def test_failed_write_raises_and_prints_nothing(tool, mosaic_weights, tmp_path, monkeypatch, capsys):
    output = str(tmp_path / "no_such_folder" / "pred.png")
    args = ["--config-file", CONFIG, "--output", output, "--num-rows", "1", "MODEL.WEIGHTS", mosaic_weights,
            "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0"]
    with pytest.raises(OSError, match="no_such_folder/pred.png"):
        tool.main(args)
    assert "Wrote" not in capsys.readouterr().out
    # cv2.imwrite returning False (a full disk, say) is an error too.
    monkeypatch.setattr(cv2, "imwrite", lambda *a, **k: False)
    args[3] = str(tmp_path / "pred.png")
    with pytest.raises(OSError, match="cv2.imwrite failed"):
        tool.main(args)
    assert "Wrote" not in capsys.readouterr().out
