"""Tests of the embedded mosaic dataset: determinism, layout, Detectron2
registration, label conventions, class balance, difficulty, and the errors a
user sees when the data is missing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image

from gmmseg_d2.data.datasets import mosaic, mosaic_generator
from gmmseg_d2.data.datasets.mosaic import (
    MOSAIC_ANOMALY_SOURCES,
    MOSAIC_CLASSES,
    MOSAIC_TEXTURES,
    ensure_mosaic_dataset,
    generate_mosaic_dataset,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = len(MOSAIC_CLASSES)
# Small but not tiny: enough regions per class for the statistical checks.
SMALL = dict(num_train=48, num_val=24, num_anomaly=16, image_size=128, seed=0)
DATASET_NAMES = {"train": "mosaic_sem_seg_train", "val": "mosaic_sem_seg_val", "anomaly_val": "mosaic_anomaly_val"}


def file_hashes(dataset_dir: str | Path) -> dict[str, str]:
    """sha256 of every file under `dataset_dir`, keyed by relative path."""
    dataset_dir = Path(dataset_dir)
    return {
        str(path.relative_to(dataset_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(dataset_dir.rglob("*"))
        if path.is_file()
    }


def png_hashes(dataset_dir: str | Path) -> dict[str, str]:
    """Like `file_hashes`, images and labels only (the manifest records a timing)."""
    return {k: v for k, v in file_hashes(dataset_dir).items() if k.endswith(".png")}


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small mosaic dataset, with DETECTRON2_DATASETS pointing at it."""
    root = tmp_path_factory.mktemp("d2_datasets")
    generate_mosaic_dataset(root, **SMALL)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DETECTRON2_DATASETS", str(root))
        yield root


def load_label(path: str) -> np.ndarray:
    return np.asarray(Image.open(path))


def region_samples(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per region (class within an image): mean RGB, a texture descriptor, and the class."""
    from skimage.feature import local_binary_pattern

    mean_colours, textures, classes = [], [], []
    for record in DatasetCatalog.get(DATASET_NAMES[split]):
        image = np.asarray(Image.open(record["file_name"]), dtype=np.float32) / 255.0
        label = load_label(record["sem_seg_file_name"])
        gray = image.mean(axis=2)
        patterns = local_binary_pattern(np.rint(gray * 255).astype(np.uint8), 8, 1, "uniform").astype(int)
        grad_rows, grad_cols = np.gradient(gray)
        gradient = np.hypot(grad_rows, grad_cols)
        for class_id in np.unique(label):
            region = label == class_id
            if region.sum() < 200:  # slivers say little about either cue
                continue
            mean_colours.append(image[region].mean(axis=0))
            std = gray[region].std() + 1e-6
            histogram = np.bincount(patterns[region], minlength=10) / region.sum()
            textures.append(np.concatenate([histogram, [gradient[region].mean() / std, np.log(std)]]))
            classes.append(class_id)
    return np.array(mean_colours), np.array(textures), np.array(classes)


def nearest_class_mean_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
) -> float:
    """Accuracy of a nearest-centroid classifier on standardised features."""
    centre, scale = train_x.mean(axis=0), train_x.std(axis=0) + 1e-9
    train_x, test_x = (train_x - centre) / scale, (test_x - centre) / scale
    centroids = np.stack([train_x[train_y == c].mean(axis=0) for c in range(NUM_CLASSES)])
    predictions = np.argmin(((test_x[:, None, :] - centroids[None]) ** 2).sum(axis=-1), axis=1)
    return float((predictions == test_y).mean())


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_files_other_seed_differs(datasets_root: Path, tmp_path: Path) -> None:
    reference = png_hashes(datasets_root / "mosaic")
    assert len(reference) == 2 * (SMALL["num_train"] + SMALL["num_val"] + SMALL["num_anomaly"])

    # Another process count must not change a byte either.
    again = generate_mosaic_dataset(tmp_path / "again", **SMALL, num_workers=2)
    assert png_hashes(again) == reference
    manifest = json.loads((datasets_root / "mosaic" / "manifest.json").read_text())
    assert json.loads((Path(again) / "manifest.json").read_text())["digest"] == manifest["digest"]

    other = png_hashes(generate_mosaic_dataset(tmp_path / "other", **{**SMALL, "seed": 1}))
    assert other.keys() == reference.keys()
    images = [k for k in reference if k.startswith("images")]
    assert all(other[k] != reference[k] for k in images), "seed 1 reproduced some seed-0 images"


def test_ensure_is_a_noop_when_complete_and_regenerates_when_interrupted(tmp_path: Path) -> None:
    small = {**SMALL, "num_train": 4, "num_val": 2, "num_anomaly": 2}
    dataset_dir = Path(ensure_mosaic_dataset(tmp_path, **small))
    manifest = dataset_dir / "manifest.json"
    before = file_hashes(dataset_dir)
    stamp = manifest.stat().st_mtime_ns

    assert Path(ensure_mosaic_dataset(tmp_path, **small)) == dataset_dir
    assert manifest.stat().st_mtime_ns == stamp, "a complete dataset was rewritten"

    # A folder without its manifest is an interrupted generation: redone.
    manifest.unlink()
    ensure_mosaic_dataset(tmp_path, **small)
    assert png_hashes(dataset_dir) == {k: v for k, v in before.items() if k.endswith(".png")}
    assert manifest.exists()

    # A missing image also counts as incomplete.
    next((dataset_dir / "images" / "val").glob("*.png")).unlink()
    ensure_mosaic_dataset(tmp_path, **small)
    assert png_hashes(dataset_dir) == {k: v for k, v in before.items() if k.endswith(".png")}

    # Different parameters are not "complete" either.
    ensure_mosaic_dataset(tmp_path, **{**small, "num_val": 3})
    assert len(list((dataset_dir / "images" / "val").glob("*.png"))) == 3


def test_failed_generation_keeps_old_data_and_leaves_no_partial_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = {**SMALL, "num_train": 3, "num_val": 2, "num_anomaly": 2}
    dataset_dir = Path(generate_mosaic_dataset(tmp_path, **small))
    before = file_hashes(dataset_dir)

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("simulated interruption before the manifest")

    monkeypatch.setattr(mosaic, "_write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        generate_mosaic_dataset(tmp_path, **{**small, "seed": 5})
    assert file_hashes(dataset_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mosaic"]


# --------------------------------------------------------------------------- Detectron2 view


def test_catalog_counts_and_image_label_pairing(datasets_root: Path) -> None:
    expected_counts = {"train": SMALL["num_train"], "val": SMALL["num_val"], "anomaly_val": SMALL["num_anomaly"]}
    for split, name in DATASET_NAMES.items():
        records = DatasetCatalog.get(name)
        assert len(records) == expected_counts[split]
        for record in records:
            image_path, label_path = Path(record["file_name"]), Path(record["sem_seg_file_name"])
            assert image_path.name == label_path.name
            assert image_path.parent == datasets_root / "mosaic" / "images" / split
            assert label_path.parent == datasets_root / "mosaic" / "annotations" / split
        # Read the way Detectron2's mappers read them.
        image = read_image(records[0]["file_name"], format="RGB")
        label = read_image(records[0]["sem_seg_file_name"])
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        assert label.shape == (128, 128)


def test_label_values(datasets_root: Path) -> None:
    for split in ("train", "val"):
        for record in DatasetCatalog.get(DATASET_NAMES[split]):
            label = load_label(record["sem_seg_file_name"])
            assert label.dtype == np.uint8 and label.ndim == 2
            assert label.max() < NUM_CLASSES, record["sem_seg_file_name"]
            assert len(np.unique(label)) >= 2, "a scene should mix at least two textures"

    void_fractions = []
    for record in DatasetCatalog.get(DATASET_NAMES["anomaly_val"]):
        label = load_label(record["sem_seg_file_name"])
        values = set(np.unique(label).tolist())
        assert values <= {0, 1, 255}, (record["sem_seg_file_name"], values)
        assert {0, 1} <= values, f"{record['sem_seg_file_name']} lacks in-distribution or anomaly pixels"
        void_fractions.append(float((label == 255).mean()))
        # Void separates the two classes: no 0 pixel touches a 1 pixel.
        for first, second in ((label[:, :-1], label[:, 1:]), (label[:-1], label[1:])):
            assert not np.any((first.astype(int) + second) == 1), record["sem_seg_file_name"]
    assert 0 < np.mean(void_fractions) < 0.1


def test_metadata(datasets_root: Path) -> None:
    for split, name in DATASET_NAMES.items():
        DatasetCatalog.get(name)
        metadata = MetadataCatalog.get(name)
        assert metadata.stuff_classes == MOSAIC_CLASSES
        assert len(metadata.stuff_colors) == NUM_CLASSES
        assert all(len(colour) == 3 and all(0 <= v <= 255 for v in colour) for colour in metadata.stuff_colors)
        assert len({tuple(c) for c in metadata.stuff_colors}) == NUM_CLASSES
        assert metadata.ignore_label == 255
        # Roots follow DETECTRON2_DATASETS as it is when the data is loaded.
        assert Path(metadata.image_root) == datasets_root / "mosaic" / "images" / split
        assert Path(metadata.sem_seg_root) == datasets_root / "mosaic" / "annotations" / split
        expected_type = "anomaly" if split == "anomaly_val" else "sem_seg"
        assert metadata.evaluator_type == expected_type
    assert MetadataCatalog.get("mosaic_anomaly_val").anomaly_classes == ["in-distribution", "anomaly"]


def test_importing_registers_without_touching_files(tmp_path: Path) -> None:
    missing_root = tmp_path / "not_there"
    code = (
        "from detectron2.data import DatasetCatalog\n"
        "import gmmseg_d2.data.datasets.mosaic\n"
        "names = set(DatasetCatalog.list())\n"
        "assert {'mosaic_sem_seg_train', 'mosaic_sem_seg_val', 'mosaic_anomaly_val'} <= names, names\n"
    )
    env = {**os.environ, "DETECTRON2_DATASETS": str(missing_root), "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)
    assert not missing_root.exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_dataset_error_says_where_and_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty_root = tmp_path / "empty"
    empty_root.mkdir()
    monkeypatch.setenv("DETECTRON2_DATASETS", str(empty_root))
    for name in DATASET_NAMES.values():
        with pytest.raises(FileNotFoundError) as error:
            DatasetCatalog.get(name)
        message = str(error.value)
        assert str(empty_root / "mosaic") in message
        assert "DETECTRON2_DATASETS" in message
        assert "images/{train,val,anomaly_val}" in message
        assert "annotations/{train,val,anomaly_val}" in message
        assert "python datasets/prepare_mosaic.py" in message

    # An interrupted generation (no manifest) is reported, not half-loaded.
    generate_mosaic_dataset(empty_root, **{**SMALL, "num_train": 2, "num_val": 1, "num_anomaly": 1})
    (empty_root / "mosaic" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        DatasetCatalog.get("mosaic_sem_seg_train")


# --------------------------------------------------------------------------- content


def test_every_class_is_well_represented(datasets_root: Path) -> None:
    pixel_counts = np.zeros(NUM_CLASSES, np.int64)
    for record in DatasetCatalog.get(DATASET_NAMES["train"]):
        pixel_counts += np.bincount(load_label(record["sem_seg_file_name"]).ravel(), minlength=NUM_CLASSES)
    shares = pixel_counts / pixel_counts.sum()
    # Uniform would be 1/8 = 0.125 each.
    assert shares.min() > 0.04 and shares.max() < 0.3, dict(zip(MOSAIC_CLASSES, shares.round(3)))


def test_anomaly_photographs_are_not_training_sources() -> None:
    training_functions = {t.skimage_function for t in MOSAIC_TEXTURES}
    anomaly_functions = {t.skimage_function for t in MOSAIC_ANOMALY_SOURCES}
    assert not training_functions & anomaly_functions
    # Different names could still hide the same picture (e.g. chelsea/cat).
    training_photos = [mosaic_generator._load_skimage_photo(f) for f in sorted(training_functions)]
    for function in sorted(anomaly_functions):
        photo = mosaic_generator._load_skimage_photo(function)
        assert not any(p.shape == photo.shape and np.array_equal(p, photo) for p in training_photos), function


def test_train_and_val_textures_come_from_disjoint_parts_of_each_photo() -> None:
    bank = mosaic_generator._texture_bank(0.25)
    for texture, train_part, val_part in zip(MOSAIC_TEXTURES, bank["train"], bank["val"]):
        whole = mosaic_generator._standardise(mosaic_generator._load_skimage_photo(texture.skimage_function))
        axis = 0 if whole.shape[0] >= whole.shape[1] else 1
        assert np.array_equal(np.concatenate([train_part, val_part], axis=axis), whole), texture.name
        assert val_part.shape[axis] < train_part.shape[axis]


def test_mean_colour_cannot_solve_it_but_texture_can(datasets_root: Path) -> None:
    train_colour, train_texture, train_class = region_samples("train")
    val_colour, val_texture, val_class = region_samples("val")
    assert set(train_class.tolist()) == set(range(NUM_CLASSES))

    chance = 1.0 / NUM_CLASSES
    colour_accuracy = nearest_class_mean_accuracy(train_colour, train_class, val_colour, val_class)
    texture_accuracy = nearest_class_mean_accuracy(train_texture, train_class, val_texture, val_class)
    # Region colour is drawn independently of the class: near chance.
    assert colour_accuracy < chance + 0.15, colour_accuracy
    # Yet the classes are learnable from texture: even 12 hand-made texture
    # statistics with a nearest-centroid rule do far better.
    assert texture_accuracy > colour_accuracy + 0.2, (texture_accuracy, colour_accuracy)
