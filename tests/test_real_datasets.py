"""Real datasets: registration, prepare scripts, loading, errors, one evaluation pass each.

Every tree is a tiny fake in the published form (tests/real_dataset_trees.py),
put under a temporary ``$DETECTRON2_DATASETS``; the prepare scripts run on it
through their ``main(argv)`` and the datasets load through ``DatasetCatalog``.
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import CityscapesSemSegEvaluator, SemSegEvaluator, inference_on_dataset

from gmmseg_d2.data.datasets import REAL_DATASET_NAMES, DatasetNotReadyError
from gmmseg_d2.data.datasets.cityscapes import CITYSCAPES_LABEL_ID_TO_TRAIN_ID
from gmmseg_d2.data.datasets.anomaly import prepare_road_anomaly
from gmmseg_d2.data.datasets.coco_stuff import COCO_STUFF_CLASSES, COCO_STUFF_DATASET_IDS
from gmmseg_d2.engine import Trainer
from gmmseg_d2.evaluation import AnomalyEvaluator, cityscapes_evaluation
from tests import real_dataset_trees as trees
from tests.conftest import REPO_ROOT

EXPECTED_NUM_CLASSES = {
    "ade20k_sem_seg": 150, "cityscapes_fine": 19, "coco_2017": 171,
    "fishyscapes": 19, "road_anomaly": 19, "smiyc": 19,
}


@pytest.fixture
def root(tmp_path, monkeypatch):
    """An empty ``$DETECTRON2_DATASETS`` for one test."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    return str(tmp_path)


def run_script(name, *args):
    """``datasets/<name>.py`` run in-process through its ``main(argv)`` (a subprocess would re-import torch)."""
    path = os.path.join(REPO_ROOT, "datasets", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_prepare_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--num-workers", "1", *args])


def read(path):
    return np.array(Image.open(path))


def stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def expected_classes(name):
    return next(n for prefix, n in EXPECTED_NUM_CLASSES.items() if name.startswith(prefix))


def expected_evaluator_type(name):
    if name.startswith("cityscapes_fine"):
        return "cityscapes_sem_seg"
    return "sem_seg" if name.startswith(("ade20k", "coco_2017")) else "anomaly"


# ----------------------------------------------------------- registration


def test_import_with_no_data_registers_every_name_and_touches_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = (
        "import json, gmmseg_d2\n"
        "from detectron2.data import DatasetCatalog, MetadataCatalog\n"
        "from gmmseg_d2.data.datasets import REAL_DATASET_NAMES\n"
        "print(json.dumps({n: [n in DatasetCatalog.list(), len(MetadataCatalog.get(n).stuff_classes),\n"
        "    MetadataCatalog.get(n).ignore_label, MetadataCatalog.get(n).evaluator_type] for n in REAL_DATASET_NAMES}))\n"
    )
    env = dict(os.environ, DETECTRON2_DATASETS=str(empty), PYTHONPATH=REPO_ROOT)
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=str(tmp_path)).stdout
    found = json.loads(out.strip().splitlines()[-1])
    assert set(found) == set(REAL_DATASET_NAMES) and len(REAL_DATASET_NAMES) == 13
    for name, (registered, num_classes, ignore, evaluator_type) in found.items():
        assert registered, name
        assert (num_classes, ignore) == (expected_classes(name), 255), name
        assert evaluator_type == expected_evaluator_type(name), name
    assert os.listdir(empty) == [] and sorted(os.listdir(tmp_path)) == ["empty"]


def test_missing_dataset_error_names_dataset_path_and_fix(root):
    with pytest.raises(DatasetNotReadyError) as error:
        DatasetCatalog.get("coco_2017_val_stuff_sem_seg")
    message = str(error.value)
    assert "'coco_2017_val_stuff_sem_seg'" in message and os.path.join(root, "coco") in message
    assert "DETECTRON2_DATASETS=" in message and "prepare_coco_stuff_164k_sem_seg.py" in message
    assert isinstance(error.value, FileNotFoundError)


# ------------------------------------------------------------------ ADE20K


def test_ade20k_prepare_load_and_half_prepared_errors(root):
    raw = trees.make_ade20k(root)
    with pytest.raises(DatasetNotReadyError, match=r"annotations_detectron2 not found.*\n.*prepare_ade20k_sem_seg\.py"):
        DatasetCatalog.get("ade20k_sem_seg_train")
    run_script("prepare_ade20k_sem_seg")
    for name, split in [("ade20k_sem_seg_train", "training"), ("ade20k_sem_seg_val", "validation")]:
        records = DatasetCatalog.get(name)
        assert [stem(r["file_name"]) for r in records] == sorted(raw[split])
        for record in records:
            assert stem(record["sem_seg_file_name"]) == stem(record["file_name"])
            label, source = read(record["sem_seg_file_name"]), raw[split][stem(record["file_name"])]
            np.testing.assert_array_equal(label, np.where(source == 0, 255, source.astype(int) - 1))
            assert label[label != 255].max() <= 149
        meta = MetadataCatalog.get(name)
        assert len(meta.stuff_classes) == 150 and meta.stuff_classes[0] == "wall" and meta.ignore_label == 255
        assert meta.image_root == os.path.join(root, "ADEChallengeData2016", "images", split)
    # Half-prepared: one converted label lost.
    os.remove(records[0]["sem_seg_file_name"])
    with pytest.raises(DatasetNotReadyError, match=r"half-prepared: 1 of 2 converted label files are missing"):
        DatasetCatalog.get("ade20k_sem_seg_val")
    run_script("prepare_ade20k_sem_seg")  # completes it
    assert len(DatasetCatalog.get("ade20k_sem_seg_val")) == 2


# -------------------------------------------------------------- Cityscapes


def test_cityscapes_prepare_and_load(root):
    raw = trees.make_cityscapes(root)
    with pytest.raises(DatasetNotReadyError, match=r"labelTrainIds\.png not found.*\n.*prepare_cityscapes_sem_seg"):
        DatasetCatalog.get("cityscapes_fine_sem_seg_train")
    run_script("prepare_cityscapes_sem_seg")
    table = np.full(256, 255)
    for label_id, train_id in CITYSCAPES_LABEL_ID_TO_TRAIN_ID.items():
        table[label_id] = train_id
    for name, split in [("cityscapes_fine_sem_seg_train", "train"), ("cityscapes_fine_sem_seg_val", "val")]:
        records = DatasetCatalog.get(name)
        assert sorted(os.path.basename(r["file_name"])[: -len("_leftImg8bit.png")] for r in records) == sorted(raw[split])
        for record in records:
            frame_id = os.path.basename(record["file_name"])[: -len("_leftImg8bit.png")]
            assert record["sem_seg_file_name"].endswith(frame_id + "_gtFine_labelTrainIds.png")
            assert (record["height"], record["width"]) == trees.SIZE
            np.testing.assert_array_equal(read(record["sem_seg_file_name"]), table[raw[split][frame_id]])
        meta = MetadataCatalog.get(name)
        assert len(meta.stuff_classes) == 19 and len(meta.stuff_colors) == 19 and meta.ignore_label == 255
        assert meta.gt_dir == os.path.join(root, "cityscapes", "gtFine", split)


def test_cityscapes_train_id_table_matches_cityscapesscripts():
    labels = pytest.importorskip("cityscapesscripts.helpers.labels").labels
    official = {l.id: l.trainId for l in labels if 0 <= l.id and l.trainId not in (255, -1)}
    assert official == CITYSCAPES_LABEL_ID_TO_TRAIN_ID


# -------------------------------------------------------------- COCO-Stuff


def test_coco_stuff_164k_prepare_and_load(root):
    raw = trees.make_coco_stuff_164k(root)
    with pytest.raises(DatasetNotReadyError, match="stuffthingmaps_detectron2/train2017 not found"):
        DatasetCatalog.get("coco_2017_train_stuff_sem_seg")
    run_script("prepare_coco_stuff_164k_sem_seg")
    # Raw value = COCO-Stuff id - 1; classes count the used ids in order.
    expected = {0: 0, 11: 255, 12: 11, 89: 79, 91: 80, 181: 170, 255: 255, 40: 36, 41: 37}
    for name, split in [("coco_2017_train_stuff_sem_seg", "train2017"), ("coco_2017_val_stuff_sem_seg", "val2017")]:
        records = DatasetCatalog.get(name)
        assert [stem(r["file_name"]) for r in records] == sorted(raw[split])  # the stray image is left out
        for record in records:
            source = raw[split][stem(record["file_name"])]
            np.testing.assert_array_equal(read(record["sem_seg_file_name"]), np.vectorize(expected.get)(source))
        meta = MetadataCatalog.get(name)
        assert len(meta.stuff_classes) == 171 and meta.ignore_label == 255
    assert COCO_STUFF_CLASSES[11] == "stop sign" and COCO_STUFF_CLASSES[80] == "banner"
    assert COCO_STUFF_CLASSES[170] == "wood" and COCO_STUFF_DATASET_IDS[79] == 90


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_coco_stuff_10k_prepare_and_load(root, version):
    raw = trees.make_coco_stuff_10k(root, version)
    with pytest.raises(DatasetNotReadyError, match="annotations_detectron2/test not found"):
        DatasetCatalog.get("coco_2017_test_stuff_10k_sem_seg")
    run_script("prepare_coco_stuff_10k_sem_seg", "--version", version)
    if version == "1.1":  # COCO-Stuff ids, 0 unlabeled, 12 unused
        expected = {0: 255, 1: 0, 12: 255, 13: 11, 92: 80, 182: 170}
    else:  # 1 unlabeled, then 2 + class
        expected = {0: 255, 1: 255, 2: 0, 13: 11, 82: 80, 172: 170}
    for name, split in [("coco_2017_train_stuff_10k_sem_seg", "train"), ("coco_2017_test_stuff_10k_sem_seg", "test")]:
        records = DatasetCatalog.get(name)
        assert [stem(r["file_name"]) for r in records] == sorted(raw[split])
        for record in records:
            assert record["file_name"].startswith(os.path.join(root, "coco", "coco_stuff_10k", "images_detectron2", split))
            source = raw[split][stem(record["file_name"])]
            np.testing.assert_array_equal(read(record["sem_seg_file_name"]), np.vectorize(expected.get)(source))
        assert len(MetadataCatalog.get(name).stuff_classes) == 171
    # A wrong --version is caught by the value range, not silently mis-mapped.
    if version == "1.1":
        with pytest.raises(ValueError, match=r"outside COCO-Stuff-10k v1\.0's 0\.\.172"):
            run_script("prepare_coco_stuff_10k_sem_seg", "--version", "1.0", "--force")


# ------------------------------------------------------------ anomaly sets


def check_anomaly_dataset(name, root, expected_labels):
    """Records pair images and labels by stem; labels equal ``expected_labels``; Cityscapes metadata."""
    records = DatasetCatalog.get(name)
    assert [stem(r["sem_seg_file_name"]) for r in records] == sorted(expected_labels)
    for record in records:
        assert stem(record["file_name"]) == stem(record["sem_seg_file_name"])
        label = read(record["sem_seg_file_name"])
        assert set(np.unique(label)) <= {0, 1, 255}
        np.testing.assert_array_equal(label, expected_labels[stem(record["file_name"])])
        assert Image.open(record["file_name"]).size == trees.SIZE[::-1]
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "anomaly" and meta.ignore_label == 255
    assert meta.stuff_classes == MetadataCatalog.get("cityscapes_fine_sem_seg_val").stuff_classes
    assert meta.sem_seg_root.startswith(root)
    return records


def test_fishyscapes_lost_and_found(root):
    raw = trees.make_fishyscapes_lost_and_found(root)
    with pytest.raises(DatasetNotReadyError, match=r"prepared folder not found.*\n.*prepare_fishyscapes_lost_and_found"):
        DatasetCatalog.get("fishyscapes_lost_and_found_val")
    run_script("prepare_fishyscapes_lost_and_found")
    records = check_anomaly_dataset("fishyscapes_lost_and_found_val", root, raw)
    source = os.path.join(root, "lost_and_found", "leftImg8bit", "test", "04_Maurener_Weg_8",
                          "04_Maurener_Weg_8_000000_000030_leftImg8bit.png")
    np.testing.assert_array_equal(read(records[0]["file_name"]), read(source))


def test_fishyscapes_static_adds_overlay_to_cityscapes_image(root):
    raw = trees.make_fishyscapes_static(root)
    run_script("prepare_fishyscapes_static")
    records = check_anomaly_dataset("fishyscapes_static_val", root, {k: v[0] for k, v in raw.items()})
    for record in records:
        _, pixels, offset = raw[stem(record["file_name"])]
        np.testing.assert_array_equal(read(record["file_name"]), np.clip(pixels.astype(int) + offset, 0, 255))


def test_road_anomaly_maps_class_2_to_anomaly_and_rejects_bad_labels_atomically(root):
    raw = trees.make_road_anomaly(root)
    run_script("prepare_road_anomaly")
    expected = {k: (v == 2).astype(np.uint8) for k, v in raw.items()}
    check_anomaly_dataset("road_anomaly", root, expected)
    with pytest.raises(ValueError, match="lies inside the output folder"):
        prepare_road_anomaly(os.path.join(root, "road_anomaly", "test", "images"), root)
    # A label value outside {0, 1, 2} fails the preparation and leaves the previous result intact.
    bad = os.path.join(root, "road_anomaly", "RoadAnomaly_jpg", "frames", "cones03_road_works.labels",
                       "labels_semantic.png")
    Image.fromarray(np.full(trees.SIZE, 3, np.uint8)).save(bad)
    with pytest.raises(ValueError, match=r"labels_semantic\.png contains value\(s\) \[3\]"):
        run_script("prepare_road_anomaly")
    assert sorted(os.listdir(os.path.join(root, "road_anomaly"))) == ["RoadAnomaly_jpg", "test"]
    assert sorted(os.listdir(os.path.join(root, "road_anomaly", "test"))) == ["images", "labels", "manifest.json"]
    check_anomaly_dataset("road_anomaly", root, expected)


def test_smiyc_validation_splits_and_half_prepared_error(root):
    kept = trees.make_smiyc(root)
    run_script("prepare_smiyc")
    check_anomaly_dataset("smiyc_road_anomaly21_val", root, kept["dataset_AnomalyTrack"])
    records = check_anomaly_dataset("smiyc_road_obstacle21_val", root, kept["dataset_ObstacleTrack"])
    assert records[0]["file_name"].endswith(".webp")
    # An interrupted preparation leaves no manifest: refused with the fix.
    os.remove(os.path.join(root, "segment_me_if_you_can", "road_anomaly21_val", "manifest.json"))
    with pytest.raises(DatasetNotReadyError, match=r"half-prepared: manifest\.json .*\n.*prepare_smiyc\.py --track anomaly"):
        DatasetCatalog.get("smiyc_road_anomaly21_val")


# -------------------------------------------------------------- evaluation


class ConstantClassModel(torch.nn.Module):
    """Predicts class ``k`` everywhere, at each input image's size; anomaly score = mean intensity."""

    def __init__(self, num_classes, k=0):
        super().__init__()
        self.num_classes, self.k = num_classes, k

    def forward(self, batch):
        outputs = []
        for record in batch:
            pixels = torch.as_tensor(np.array(Image.open(record["file_name"]).convert("RGB")), dtype=torch.float32)
            logits = torch.zeros(self.num_classes, *pixels.shape[:2])
            logits[self.k] = 1.0
            outputs.append({"sem_seg": logits, "anomaly_score": pixels.mean(dim=2)})
        return outputs


def evaluate(name, cfg_output_dir, num_classes):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.OUTPUT_DIR = cfg_output_dir
    evaluator = Trainer.build_evaluator(cfg, name)
    records = DatasetCatalog.get(name)
    results = inference_on_dataset(ConstantClassModel(num_classes), [[r] for r in records], evaluator)
    return evaluator, records, results


def constant_class_0_miou(labels, ignore=255):
    """mIoU (%) of predicting class 0 everywhere: IoU_0 = n_0 / n_valid, 0 for the other GT classes."""
    values = np.concatenate([label.ravel() for label in labels])
    values = values[values != ignore]
    return 100.0 * np.mean(values == 0) / len(np.unique(values))


def test_sem_seg_evaluation_pass(root, tmp_path):
    trees.make_ade20k(root)
    run_script("prepare_ade20k_sem_seg")
    evaluator, records, results = evaluate("ade20k_sem_seg_val", str(tmp_path / "out"), 150)
    assert isinstance(evaluator, SemSegEvaluator)
    labels = [read(r["sem_seg_file_name"]) for r in records]
    assert results["sem_seg"]["mIoU"] == pytest.approx(constant_class_0_miou(labels))


@pytest.mark.parametrize("official", [True, False], ids=["cityscapesscripts", "fallback"])
def test_cityscapes_evaluation_pass(root, tmp_path, monkeypatch, official):
    if official:
        pytest.importorskip("cityscapesscripts")
    else:
        monkeypatch.setattr(cityscapes_evaluation, "cityscapesscripts_available", lambda: False)
    trees.make_cityscapes(root)
    run_script("prepare_cityscapes_sem_seg")
    numpy_had_in1d = hasattr(np, "in1d")
    evaluator, records, results = evaluate("cityscapes_fine_sem_seg_val", str(tmp_path / "out"), 19)
    assert hasattr(np, "in1d") == numpy_had_in1d  # the numpy>=2.4 alias does not outlive the evaluation
    labels = [read(r["sem_seg_file_name"]) for r in records]
    # Both protocols give the same class IoU on the 19 train IDs.
    if official:
        assert isinstance(evaluator, CityscapesSemSegEvaluator)
        assert results["sem_seg"]["IoU"] == pytest.approx(constant_class_0_miou(labels), abs=1e-4)
    else:
        assert type(evaluator) is SemSegEvaluator
        assert results["sem_seg"]["mIoU"] == pytest.approx(constant_class_0_miou(labels))


def test_anomaly_evaluation_pass(root, tmp_path):
    from sklearn.metrics import average_precision_score, roc_auc_score

    trees.make_fishyscapes_lost_and_found(root)
    run_script("prepare_fishyscapes_lost_and_found")
    evaluator, records, results = evaluate("fishyscapes_lost_and_found_val", str(tmp_path / "out"), 19)
    assert isinstance(evaluator, AnomalyEvaluator)
    labels = np.concatenate([read(r["sem_seg_file_name"]).ravel() for r in records])
    scores = np.concatenate([np.array(Image.open(r["file_name"]).convert("RGB"), np.float32).mean(axis=2).ravel()
                             for r in records])
    valid = labels != 255
    assert results["anomaly"]["AP"] == pytest.approx(100 * average_precision_score(labels[valid], scores[valid]))
    assert results["anomaly"]["AUROC"] == pytest.approx(100 * roc_auc_score(labels[valid], scores[valid]))
