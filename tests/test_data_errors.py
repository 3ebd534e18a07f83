"""Bad input fails loudly: wrong labels, truncated files, unknown config keys, missing datasets."""
import os

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from gmmseg_d2.data import PerPixelSemanticDatasetMapper, validate_label_values
from gmmseg_d2.data.dataset_mappers import MaskFormerSemanticDatasetMapper
from gmmseg_d2.engine import setup_cfg
from gmmseg_d2.utils.io import UnreadableImageError, read_image, read_label_map


def _write_pair(directory, name, label):
    image_path = os.path.join(directory, f"{name}.png")
    label_path = os.path.join(directory, f"{name}_label.png")
    Image.fromarray(np.zeros(label.shape + (3,), np.uint8)).save(image_path)
    Image.fromarray(label.astype(np.uint8)).save(label_path)
    return {"file_name": image_path, "sem_seg_file_name": label_path,
            "height": label.shape[0], "width": label.shape[1]}


def test_validate_label_values_names_file_and_values():
    validate_label_values(np.array([[0, 7], [255, 3]], np.uint8), list(range(8)) + [255], "ok.png")
    with pytest.raises(ValueError, match=r"bad\.png contains value\(s\) \[8, 200\].*\{0\.\.7, 255\}"):
        validate_label_values(np.array([[0, 8], [200, 3]], np.uint8), list(range(8)) + [255], "bad.png")


def test_mapper_rejects_out_of_range_label_in_training(tmp_path, demo_cfg):
    label = np.zeros((16, 16), np.uint8)
    label[3, 4] = 9  # the demo has 8 classes
    record = _write_pair(str(tmp_path), "scene", label)
    mapper = PerPixelSemanticDatasetMapper(demo_cfg, True)
    with pytest.raises(ValueError, match=r"scene_label\.png contains value\(s\) \[9\]"):
        mapper(record)


def test_mapper_uses_anomaly_label_set_for_anomaly_datasets(tmp_path, demo_cfg):
    name = "test_anomaly_label_set"
    MetadataCatalog.get(name).set(evaluator_type="anomaly", ignore_label=255)
    try:
        mapper = PerPixelSemanticDatasetMapper(demo_cfg, False, dataset_name=name)
        label = np.zeros((128, 128), np.uint8)  # MIN_SIZE_TEST: no resize
        label[10:20, 30:40], label[0] = 1, 255
        ok = mapper(_write_pair(str(tmp_path), "ok", label))
        np.testing.assert_array_equal(ok["sem_seg"].numpy(), label)
        assert ok["image"].shape == (3, 128, 128)
        with pytest.raises(ValueError, match=r"bad_label\.png contains value\(s\) \[2\]"):
            mapper(_write_pair(str(tmp_path), "bad", np.array([[0, 2], [1, 0]])))
    finally:
        MetadataCatalog.remove(name)


class _Args:
    def __init__(self, config_file, opts):
        self.config_file, self.opts = config_file, opts


def test_unknown_config_key_is_a_clear_error():
    from tests.conftest import DEMO_CONFIG

    # yacs reports it as an AssertionError naming the key (Detectron2's usual error).
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.SEM_SEG_HEAD.CLASIFIER"):
        setup_cfg(_Args(DEMO_CONFIG, ["MODEL.SEM_SEG_HEAD.CLASIFIER", "gmm"]),
                  default_setup_logging=False)


def test_unknown_classifier_is_a_clear_error(demo_cfg):
    from detectron2.modeling import build_model

    demo_cfg.MODEL.CLASSIFIER.NAME = "svm"
    with pytest.raises(KeyError, match=r"Unknown MODEL.CLASSIFIER.NAME 'svm'; registered classifiers: \[.*'gmm'.*'softmax'"):
        build_model(demo_cfg)


def test_former_classifier_key_names_the_new_one():
    from tests.conftest import DEMO_CONFIG

    with pytest.raises(KeyError, match="MODEL.SEM_SEG_HEAD.CLASSIFIER was renamed to MODEL.CLASSIFIER.NAME"):
        setup_cfg(_Args(DEMO_CONFIG, ["MODEL.SEM_SEG_HEAD.CLASSIFIER", "gmm"]), default_setup_logging=False)


def test_missing_dataset_names_path_variable_and_layout(tmp_path, monkeypatch):
    empty_root = tmp_path / "no_data_here"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(empty_root))
    with pytest.raises(FileNotFoundError) as error:
        DatasetCatalog.get("mosaic_sem_seg_train")
    message = str(error.value)
    assert str(empty_root / "mosaic") in message
    assert "DETECTRON2_DATASETS" in message
    assert "images/" in message and "annotations/" in message
    assert "prepare_mosaic.py" in message


# ----------------------------------------------------------- truncated / corrupt files


def _truncate(path, keep=0.5):
    """Cut a file to a fraction of its bytes, as an interrupted copy or extraction leaves it."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def _noisy_pair(directory, name, image_ext=".png"):
    """A 64x64 noisy RGB image (so the PNG/JPEG is large enough to truncate mid-data) and its label."""
    rng = np.random.default_rng(0)
    image_path = os.path.join(directory, f"{name}{image_ext}")
    label_path = os.path.join(directory, f"{name}_label.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image_path)
    Image.fromarray(rng.integers(0, 8, (64, 64), dtype=np.uint8)).save(label_path)
    return {"file_name": image_path, "sem_seg_file_name": label_path, "height": 64, "width": 64}


def _assert_names_file_and_fix(error, path):
    message = str(error.value)
    assert path in message, message
    assert "truncated or corrupt" in message and "regenerate the dataset" in message, message
    assert error.value.path == path


def test_truncated_label_png_names_the_file(tmp_path):
    record = _noisy_pair(str(tmp_path), "scene")
    np.testing.assert_array_equal(read_label_map(record["sem_seg_file_name"]),
                                  np.asarray(Image.open(record["sem_seg_file_name"]), np.int64))
    _truncate(record["sem_seg_file_name"])
    with pytest.raises(UnreadableImageError) as error:
        read_label_map(record["sem_seg_file_name"])
    _assert_names_file_and_fix(error, record["sem_seg_file_name"])
    assert isinstance(error.value, OSError)  # callers catching OSError keep working


def test_mappers_name_a_truncated_label(tmp_path, demo_cfg):
    record = _noisy_pair(str(tmp_path), "scene")
    _truncate(record["sem_seg_file_name"])
    for mapper in (PerPixelSemanticDatasetMapper(demo_cfg, True),
                   MaskFormerSemanticDatasetMapper(True, augmentations=[], image_format="RGB", ignore_label=255,
                                                   size_divisibility=0, allowed_label_values=list(range(8)) + [255])):
        with pytest.raises(UnreadableImageError) as error:
            mapper(record)
        _assert_names_file_and_fix(error, record["sem_seg_file_name"])


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_mapper_names_a_truncated_image(tmp_path, demo_cfg, ext):
    record = _noisy_pair(str(tmp_path), "scene", ext)
    assert read_image(record["file_name"], format="RGB").shape == (64, 64, 3)
    _truncate(record["file_name"], keep=0.3)
    with pytest.raises(UnreadableImageError) as error:
        PerPixelSemanticDatasetMapper(demo_cfg, True)(record)
    _assert_names_file_and_fix(error, record["file_name"])


def test_not_an_image_and_missing_file_name_the_file(tmp_path):
    garbage = tmp_path / "labels.png"
    garbage.write_bytes(b"this is not a PNG file at all")
    with pytest.raises(UnreadableImageError) as error:
        read_label_map(str(garbage))
    _assert_names_file_and_fix(error, str(garbage))
    missing = str(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_label_map(missing)


def test_rgb_label_map_is_rejected_with_the_file_named(tmp_path):
    path = str(tmp_path / "rgb_label.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match=r"rgb_label\.png has mode 'RGB'.*single-channel"):
        read_label_map(path)


def test_config_dumped_with_the_removed_visualize_key_still_loads(tmp_path):
    from tests.conftest import DEMO_CONFIG

    dumped = tmp_path / "config.yaml"
    dumped.write_text(f"_BASE_: {DEMO_CONFIG}\nTEST:\n  VISUALIZE: true\n")
    cfg = setup_cfg(_Args(str(dumped), []), default_setup_logging=False)
    assert "VISUALIZE" not in cfg.TEST

