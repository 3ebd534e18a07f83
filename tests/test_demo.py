"""demo/demo.py end to end on a small GMM model (random weights saved with the checkpointer)."""
import importlib.util
import json
import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from gmmseg_d2.engine import AtomicDetectionCheckpointer, SemSegPredictor, setup_cfg
from gmmseg_d2.utils import UnreadableImageError, read_image_8bit
from gmmseg_d2.utils.visualization import (
    ANOMALY_COLORMAP, anomaly_range_from_scores, colorize_anomaly, draw_titles,
)
from tests.conftest import REPO_ROOT

CONFIG = os.path.join(REPO_ROOT, "configs", "textures", "fcn_R18_gmm.yaml")
#: Test images: name -> (height, width); sizes differ so that a swapped or
#: resized output would show.
IMAGES = {"photo.jpg": (48, 80), "rgb.png": (64, 64), "gray.png": (50, 40), "rgba.png": (32, 48),
          "deep16.png": (40, 56)}


def _load_demo():
    spec = importlib.util.spec_from_file_location("gmmseg_demo", os.path.join(REPO_ROOT, "demo", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo():
    return _load_demo()


class _Args:
    def __init__(self, opts):
        self.config_file, self.opts = CONFIG, opts


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A GMM FCN-R18 (textures config, CPU) saved as model_final.pth; its path."""
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    cfg = setup_cfg(_Args(["MODEL.DEVICE", "cpu"]), default_setup_logging=False)
    model = build_model(cfg)
    folder = str(tmp_path_factory.mktemp("demo_model"))
    AtomicDetectionCheckpointer(model, save_dir=folder).save("model_final")
    return os.path.join(folder, "model_final.pth")


def _textured(height, width, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    base = 127 + 100 * np.sin(x / 3.0 + seed) * np.cos(y / 5.0)
    return np.clip(base[..., None] + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A folder with an RGB JPEG and PNG, a grayscale, an RGBA and a 16-bit PNG."""
    folder = tmp_path_factory.mktemp("demo_images")
    for index, (name, (h, w)) in enumerate(IMAGES.items()):
        rgb = _textured(h, w, index)
        path = str(folder / name)
        if name == "gray.png":
            Image.fromarray(rgb[:, :, 0]).save(path)
        elif name == "rgba.png":
            Image.fromarray(np.dstack([rgb, np.full((h, w), 100, np.uint8)]), "RGBA").save(path)
        elif name == "deep16.png":
            assert cv2.imwrite(path, rgb[:, :, 0].astype(np.uint16) * 257)
        else:
            Image.fromarray(rgb).save(path)
    return str(folder)


@pytest.fixture(scope="module")
def folder_run(demo, weights, image_folder, tmp_path_factory):
    """The demo on the whole folder at input size; (summary, output folder)."""
    output = str(tmp_path_factory.mktemp("demo_out") / "pictures")
    summary = demo.main(["--config-file", CONFIG, "--input", image_folder, "--output", output,
                         "--min-panel-size", "1", "--opts", "MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu"])
    return summary, output


def _inferno_colors():
    return cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], ANOMALY_COLORMAP)[:, 0, ::-1]


def test_one_picture_per_image_with_names_and_sizes(folder_run):
    summary, output = folder_run
    with open(os.path.join(output, "demo_summary.json")) as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    assert sorted(os.listdir(output)) == sorted([os.path.splitext(n)[0] + ".png" for n in IMAGES]
                                                + ["demo_summary.json"])
    assert [os.path.basename(r["input"]) for r in summary["images"]] == sorted(IMAGES)
    for record in summary["images"]:
        name = os.path.basename(record["input"])
        h, w = IMAGES[name]
        assert record["output"] == os.path.join(output, os.path.splitext(name)[0] + ".png")
        picture = cv2.imread(record["output"])
        assert list(picture.shape[:2]) == record["output_size"]
        assert record["input_size"] == [h, w]
        # --min-panel-size 1: the overlay and the anomaly map are at the input's size,
        # side by side, with a colour bar right of them and titles / legend around.
        assert record["panel_size"] == [h, w]
        assert picture.shape[0] > h and picture.shape[1] > 2 * w
        assert record["seconds"] > 0 and record["classes"]


def test_anomaly_panel_uses_one_fixed_range(folder_run, demo, weights, image_folder, tmp_path):
    summary, _ = folder_run
    first = read_image_8bit(summary["images"][0]["input"], "RGB")
    cfg = setup_cfg(_Args(["MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu"]), default_setup_logging=False)
    predictor = SemSegPredictor(cfg)
    # Default: percentiles 1-99 of the FIRST image, recorded, the same for every image.
    expected = anomaly_range_from_scores(predictor(first)["anomaly_score"].numpy())
    assert summary["anomaly_range"] == pytest.approx(list(expected))
    assert summary["anomaly_range_source"].endswith(summary["images"][0]["input"])
    for record in summary["images"]:
        assert record["anomaly_panel"] is True
        assert record["anomaly_range"] == summary["anomaly_range"]

    # The range follows the first image: another first image gives another range,
    # still one for the whole run.
    reordered = demo.main(["--config-file", CONFIG, "--input", os.path.join(image_folder, "rgb.png"),
                           os.path.join(image_folder, "photo.jpg"), "--output", str(tmp_path / "reordered"),
                           "--min-panel-size", "1", "--opts", "MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu"])
    ranges = {tuple(r["anomaly_range"]) for r in reordered["images"]}
    assert ranges == {tuple(reordered["anomaly_range"])}
    assert reordered["anomaly_range"] != pytest.approx(summary["anomaly_range"])

    # --anomaly-range: the panel is exactly the score coloured on that range.
    lo, hi = -80.0, -40.0
    target = str(tmp_path / "fixed" / "out.png")
    fixed = demo.main(["--config-file", CONFIG, "--input", os.path.join(image_folder, "rgb.png"),
                       "--output", target, "--min-panel-size", "1", "--anomaly-range", str(lo), str(hi),
                       "--opts", "MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu"])
    assert fixed["anomaly_range"] == [lo, hi] and fixed["anomaly_range_source"] == "--anomaly-range"
    assert os.path.isfile(str(tmp_path / "fixed" / "out.json"))
    picture = cv2.imread(target)[:, :, ::-1]
    h, w = IMAGES["rgb.png"]
    score = predictor(read_image_8bit(os.path.join(image_folder, "rgb.png"), "RGB"))["anomaly_score"].numpy()
    expected_panel = colorize_anomaly(score, lo, hi)
    # The panel sits right of the overlay, below the (one-line) title strip.
    top = draw_titles(["title"], [w]).shape[0]
    np.testing.assert_array_equal(picture[top:top + h, w:2 * w], expected_panel)
    # Every pixel of the panel is a colour of the anomaly colour map.
    palette = {tuple(c) for c in _inferno_colors()}
    assert {tuple(c) for c in expected_panel.reshape(-1, 3)} <= palette


def test_default_enlarges_small_images_by_an_integer_factor(demo, weights, image_folder, tmp_path):
    summary = demo.main(["--config-file", CONFIG, "--input", os.path.join(image_folder, "rgba.png"),
                         "--output", str(tmp_path / "big.png"), "--opts", "MODEL.WEIGHTS", weights,
                         "MODEL.DEVICE", "cpu"])
    (record,) = summary["images"]
    assert record["input_size"] == [32, 48]
    assert record["panel_size"] == [256, 384]  # 32 px -> x8 reaches the default 256 px
    assert list(cv2.imread(str(tmp_path / "big.png")).shape[:2]) == record["output_size"]


def test_refuses_without_weights_or_with_a_missing_file(demo, image_folder, tmp_path, capsys):
    common = ["--config-file", CONFIG, "--input", image_folder, "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as error:
        demo.main(common + ["--opts", "MODEL.DEVICE", "cpu"])
    assert error.value.code != 0
    message = capsys.readouterr().err
    assert "MODEL.WEIGHTS is empty" in message and "--opts MODEL.WEIGHTS path/to/model_final.pth" in message
    assert "--allow-random-weights" in message
    missing = str(tmp_path / "nowhere" / "model_final.pth")
    with pytest.raises(SystemExit) as error:
        demo.main(common + ["--opts", "MODEL.WEIGHTS", missing])
    assert error.value.code != 0
    assert missing in capsys.readouterr().err
    assert not os.path.exists(str(tmp_path / "out"))


def test_random_weights_only_when_asked(demo, image_folder, tmp_path):
    summary = demo.main(["--config-file", CONFIG, "--input", os.path.join(image_folder, "gray.png"),
                         "--output", str(tmp_path / "out"), "--allow-random-weights", "--min-panel-size", "1",
                         "--opts", "MODEL.DEVICE", "cpu"])
    assert summary["weights"] == "" and len(summary["images"]) == 1
    assert os.path.isfile(str(tmp_path / "out" / "gray.png"))


def test_truncated_image_error_names_the_file(demo, weights, image_folder, tmp_path):
    with open(os.path.join(image_folder, "rgb.png"), "rb") as f:
        data = f.read()
    broken = tmp_path / "broken.png"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImageError, match=str(broken)):
        demo.main(["--config-file", CONFIG, "--input", str(broken), "--output", str(tmp_path / "out.png"),
                   "--opts", "MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu"])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(UnreadableImageError, match="notes.png"):
        read_image_8bit(str(not_an_image))
    with pytest.raises((UnreadableImageError, FileNotFoundError), match="missing.jpg"):
        read_image_8bit(str(tmp_path / "missing.jpg"))


def test_read_image_8bit_converts_modes(tmp_path):
    # 16-bit: 0..65535 maps onto 0..255 (k * 257 -> k), not clipped at 255.
    deep = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    deep[0, 1] = 1000  # 1000 / 257 = 3.9: 3 or 4 depending on rounding
    assert cv2.imwrite(str(tmp_path / "deep.png"), deep)
    image = read_image_8bit(str(tmp_path / "deep.png"), "RGB")
    assert image.dtype == np.uint8 and image.shape == (16, 16, 3)
    expected = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert image[0, 1, 0] in (3, 4)
    expected[0, 1] = image[0, 1, 0]
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], expected)
    # Grayscale: three equal channels; RGBA: alpha dropped, colours kept; BGR flips.
    gray = np.random.default_rng(0).integers(0, 256, (5, 7), dtype=np.uint8)
    Image.fromarray(gray).save(str(tmp_path / "gray.png"))
    np.testing.assert_array_equal(read_image_8bit(str(tmp_path / "gray.png")), np.dstack([gray] * 3))
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 200, 100, 10, 30
    Image.fromarray(rgba, "RGBA").save(str(tmp_path / "rgba.png"))
    assert read_image_8bit(str(tmp_path / "rgba.png"), "RGB")[0, 0].tolist() == [200, 100, 10]
    assert read_image_8bit(str(tmp_path / "rgba.png"), "BGR")[0, 0].tolist() == [10, 100, 200]


def test_output_names_must_not_clash(demo, image_folder, tmp_path):
    other = tmp_path / "photo.png"
    Image.fromarray(_textured(8, 8, 0)).save(str(other))
    with pytest.raises(ValueError, match="photo.png"):
        demo.output_paths([os.path.join(image_folder, "photo.jpg"), str(other)], str(tmp_path / "out"))
    assert demo.expand_inputs([os.path.join(image_folder, "*.png"), os.path.join(image_folder, "rgb.png")]) == [
        os.path.join(image_folder, n) for n in sorted(n for n in IMAGES if n.endswith(".png"))]


def test_video_input_writes_a_video(demo, weights, tmp_path):
    video = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (64, 48))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write mp4v videos")
    for index in range(4):
        writer.write(_textured(48, 64, index))
    writer.release()
    summary = demo.main(["--config-file", CONFIG, "--video-input", video, "--output", str(tmp_path / "out"),
                         "--min-panel-size", "1", "--opts", "MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu"])
    assert len(summary["images"]) == 4
    assert len({tuple(r["anomaly_range"]) for r in summary["images"]}) == 1
    capture = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    assert len(frames) == 4
    assert list(frames[0].shape[:2]) == summary["images"][0]["output_size"]
    assert os.path.isfile(str(tmp_path / "out" / "clip.json"))
