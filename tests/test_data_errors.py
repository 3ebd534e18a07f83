"""Bad input fails loudly: wrong labels, unknown config keys, missing datasets."""
import os

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from gmmseg_d2.data import PerPixelSemanticDatasetMapper, validate_label_values
from gmmseg_d2.engine import setup_cfg


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

    demo_cfg.MODEL.SEM_SEG_HEAD.CLASSIFIER = "svm"
    with pytest.raises(ValueError, match="Unknown MODEL.SEM_SEG_HEAD.CLASSIFIER 'svm'"):
        build_model(demo_cfg)


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
