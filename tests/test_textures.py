"""Tests of the procedural "textures" benchmark: determinism, class balance,
the held-out parameter table, hand-checked labels and textures, Detectron2
registration and the errors a user sees when the data is missing."""

from __future__ import annotations

import colorsys
import hashlib
import importlib.util
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from gmmseg_d2.data.datasets import textures as tx
from gmmseg_d2.data.datasets.common import DatasetNotReadyError
from gmmseg_d2.data.datasets.textures import (
    CLASS_FAMILIES,
    FAR_OOD_TEXTURES,
    NEAR_OOD_TEXTURES,
    ORIENTATION_PERIOD,
    TEXTURE_CLASSES,
    TEXTURES_SPLITS,
    Range,
    TexturesParams,
    ensure_textures_dataset,
    generate_textures_dataset,
    intervals_overlap,
    render_texture_scene,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = len(TEXTURE_CLASSES)
TINY = TexturesParams(num_train=12, num_val=4, num_test=4, num_anomaly_val=4, num_anomaly_test=4, image_size=32)
ANOMALY_SPLITS = [s for s, (_, _, kind) in TEXTURES_SPLITS.items() if kind != "sem_seg"]


def png_hashes(dataset_dir: str | Path) -> dict[str, str]:
    dataset_dir = Path(dataset_dir)
    return {
        str(p.relative_to(dataset_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(dataset_dir.rglob("*.png"))
    }


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("textures_root")
    generate_textures_dataset(root, TINY, num_workers=1)
    return root


# ---------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------


def test_render_is_deterministic_and_index_dependent() -> None:
    for split in TEXTURES_SPLITS:
        first = render_texture_scene(TINY, split, 3)
        again = render_texture_scene(TINY, split, 3)
        for a, b in zip(first, again):
            assert a.dtype == np.uint8 and np.array_equal(a, b)
        other = render_texture_scene(TINY, split, 4)
        assert not np.array_equal(first[0], other[0])
    # val and test are separate streams
    assert not np.array_equal(render_texture_scene(TINY, "val", 0)[0], render_texture_scene(TINY, "test", 0)[0])
    assert not np.array_equal(
        render_texture_scene(TINY, "train", 0)[0], render_texture_scene(replace(TINY, seed=1), "train", 0)[0]
    )


def test_files_byte_identical_whatever_the_worker_count(tiny_root: Path, tmp_path: Path) -> None:
    again = generate_textures_dataset(tmp_path, TINY, num_workers=2)
    first, second = png_hashes(tiny_root / "textures"), png_hashes(again)
    assert first == second and len(first) == 3 * (12 + 4 + 4) + 4 * 4 * 4
    manifests = [json.loads((Path(d) / "manifest.json").read_text()) for d in (tiny_root / "textures", again)]
    assert manifests[0]["digest"] == manifests[1]["digest"]
    # files hold exactly what render_texture_scene returns
    image, label, regions, class_map = render_texture_scene(TINY, "anomaly_far_val", 2)
    name = "textures_anomaly_far_val_000002.png"
    stored = [np.asarray(Image.open(Path(again) / folder / "anomaly_far_val" / name))
              for folder in ("images", "annotations", "regions", "annotations_semantic")]
    for a, b in zip((image, label, regions, class_map), stored):
        assert np.array_equal(a, b)


def test_ensure_is_a_noop_when_up_to_date_and_regenerates_when_stale(tiny_root: Path, tmp_path: Path) -> None:
    dataset_dir = ensure_textures_dataset(tmp_path, TINY, num_workers=1)
    manifest = Path(dataset_dir) / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert ensure_textures_dataset(tmp_path, TINY) == dataset_dir
    assert manifest.stat().st_mtime_ns == stamp
    bigger = replace(TINY, num_train=13)
    ensure_textures_dataset(tmp_path, bigger, num_workers=1)
    assert len(json.loads(manifest.read_text())["files"]["train"]) == 13
    # a deleted file makes it incomplete -> regenerated
    os.remove(Path(dataset_dir) / "regions" / "train" / "textures_train_000000.png")
    assert not tx.is_textures_complete(dataset_dir, bigger)
    ensure_textures_dataset(tmp_path, bigger, num_workers=1)
    assert tx.is_textures_complete(dataset_dir, bigger)
    assert not list(tmp_path.glob(".textures-*"))


# ---------------------------------------------------------------------------
# Statistics of generated scenes
# ---------------------------------------------------------------------------


def test_class_balance_regions_and_anomaly_coverage() -> None:
    params = replace(TINY, image_size=32)
    pixels = np.zeros(NUM_CLASSES)
    for index in range(400):
        image, label, regions, class_map = render_texture_scene(params, "train", index)
        assert np.array_equal(label, class_map)
        num_regions = int(regions.max()) + 1
        assert params.min_regions <= num_regions <= params.max_regions
        counts = np.bincount(regions.ravel(), minlength=num_regions)
        assert counts.min() >= params.min_region_pixels
        pixels += np.bincount(label.ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]
    share = pixels / pixels.sum()
    # 1/C = 0.125; tolerance 0.03 (about 4 standard deviations here)
    assert np.all(np.abs(share - 1.0 / NUM_CLASSES) < 0.03), share

    for split in ANOMALY_SPLITS:
        for index in range(40):
            image, label, regions, class_map = render_texture_scene(params, split, index)
            assert set(np.unique(label)) == {0, 1}  # exactly 0/1, no void band
            anomalous = np.unique(regions[label == 1])
            assert 1 <= len(anomalous) <= 2
            assert tx.ANOMALY_COVERAGE[0] <= (label == 1).mean() <= tx.ANOMALY_COVERAGE[1]
            assert np.array_equal(class_map == 255, label == 1)
            assert class_map[label == 0].max() < NUM_CLASSES


def test_every_region_has_one_label() -> None:
    for split in ("train", "anomaly_near_val", "anomaly_far_test"):
        for index in range(30):
            _, label, regions, class_map = render_texture_scene(TINY, split, index)
            for region in np.unique(regions):
                assert len(np.unique(label[regions == region])) == 1
                assert len(np.unique(class_map[regions == region])) == 1
            if split == "train":  # distinct classes per region
                classes = [int(label[regions == r][0]) for r in np.unique(regions)]
                assert len(classes) == len(set(classes))


# ---------------------------------------------------------------------------
# Parameter table
# ---------------------------------------------------------------------------


def test_interval_overlap_handles_periodic_wrap() -> None:
    assert intervals_overlap(Range(350, 370), Range(5, 10), 360)  # hue wraps past 0
    assert intervals_overlap(Range(-8, 8), Range(355, 359), 360)
    assert not intervals_overlap(Range(-8, 8), Range(10, 350), 360)
    assert intervals_overlap(Range(170, 190), Range(-5, 5), 180)  # orientation mod 180
    assert not intervals_overlap(Range(125, 145), Range(-15, 15), 180)
    assert intervals_overlap(Range(80, 95), Range(0, 10), 90)  # checker orientation mod 90
    assert intervals_overlap(Range(37, 53), Range(127, 130), 90)
    assert not intervals_overlap(Range(37, 53), Range(-10, 10), 90)
    assert not intervals_overlap(Range(37, 53), Range(-10, 10), None)
    assert not intervals_overlap(Range(5, 8), Range(11, 15))
    assert intervals_overlap(Range(5, 8), Range(8, 15))


PERIODS = {"orientation": None, "hue": 360.0, "period": None, "duty": None, "radius": None, "beta": None}


def test_near_ood_held_out_bands_are_disjoint_from_every_class_of_the_family() -> None:
    tx.check_texture_table()  # the generator's own assertion
    by_name = {c.name: c for c in TEXTURE_CLASSES}
    kinds = set()
    for near in NEAR_OOD_TEXTURES:
        assert near.family in CLASS_FAMILIES
        reference = by_name[near.reference]
        assert reference.family == near.family
        changed = [f for f in PERIODS if getattr(near, f) != getattr(reference, f)]
        assert 1 <= len(changed) <= 2 and {tx.PARAMETERS[f] for f in changed} == set(near.held_out)
        assert near.contrast == reference.contrast
        for name in changed:
            period = ORIENTATION_PERIOD[near.family] if name == "orientation" else PERIODS[name]
            for cls in TEXTURE_CLASSES:
                if cls.family == near.family:
                    assert not intervals_overlap(getattr(near, name), getattr(cls, name), period), (near, cls)
        kinds.update(near.held_out)
    assert kinds == {"orientation", "frequency", "hue"}
    # the wrap cases are exercised by the table itself
    red = by_name["grating_horizontal_red"]
    assert red.hue.lo < 0 and red.orientation.lo < 0
    assert by_name["checker_cyan"].orientation.lo < 0 and ORIENTATION_PERIOD["checker"] == 90.0


def test_a_table_violation_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = replace(NEAR_OOD_TEXTURES[0], orientation=Range(170, 178))  # wraps onto 0 +- 15 mod 180
    monkeypatch.setattr(tx, "NEAR_OOD_TEXTURES", (bad,) + NEAR_OOD_TEXTURES[1:])
    with pytest.raises(AssertionError, match="overlaps"):
        tx.check_texture_table()


def test_far_ood_families_are_unused_by_classes() -> None:
    families = {f.family for f in FAR_OOD_TEXTURES}
    assert families.isdisjoint(CLASS_FAMILIES)
    assert {"gabor_noise", "brown_noise", "photo"} <= families
    # the photos are the mosaic's held-out anomaly photographs
    assert len(tx._texture_bank(0.25)["anomaly"]) == len(tx.MOSAIC_ANOMALY_SOURCES)


# ---------------------------------------------------------------------------
# Hand-checked scenes
# ---------------------------------------------------------------------------


def halves(size: int) -> np.ndarray:
    regions = np.zeros((size, size), np.uint8)
    regions[:, size // 2:] = 1
    return regions


def gradient_energy(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Mean squared (vertical, horizontal) finite differences of grey inside ``mask``."""
    grey = image.astype(np.float64).mean(axis=2)
    vertical = np.diff(grey, axis=0) ** 2
    horizontal = np.diff(grey, axis=1) ** 2
    return float(vertical[mask[1:] & mask[:-1]].mean()), float(horizontal[mask[:, 1:] & mask[:, :-1]].mean())


def mean_hue(image: np.ndarray, mask: np.ndarray) -> float:
    rgb = image[mask].astype(np.float64).mean(axis=0) / 255.0
    return colorsys.rgb_to_hsv(*rgb)[0] * 360.0


def hue_distance(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


def test_fixed_layout_labels_and_grating_gradients() -> None:
    params = replace(TINY, image_size=64)
    regions = halves(64)
    for index in range(3):
        image, label, out_regions, class_map = render_texture_scene(params, "train", index, layout=(regions, [0, 1]))
        assert np.array_equal(out_regions, regions)
        assert np.array_equal(label, np.array([0, 1], np.uint8)[regions])
        left, right = regions == 0, regions == 1
        vertical, horizontal = gradient_energy(image, left)  # horizontal bars: varies along y
        assert vertical > 8 * horizontal, (vertical, horizontal)
        vertical, horizontal = gradient_energy(image, right)  # vertical bars: varies along x
        assert horizontal > 8 * vertical, (vertical, horizontal)


@pytest.mark.parametrize("class_id", range(len(TEXTURE_CLASSES)))
def test_each_class_mean_colour_is_its_hue(class_id: int) -> None:
    spec = TEXTURE_CLASSES[class_id]
    centre = (spec.hue.lo + spec.hue.hi) / 2
    half_width = (spec.hue.hi - spec.hue.lo) / 2
    for index in range(3):
        image, label, _, _ = render_texture_scene(TINY, "val", index, layout=(halves(32), [class_id, (class_id + 1) % 8]))
        assert hue_distance(mean_hue(image, label == class_id), centre) <= half_width + 4


def test_fixed_anomaly_layout() -> None:
    regions = np.zeros((32, 32), np.uint8)
    regions[8:24, 8:24] = 1
    regions[:, 28:] = 2
    for split, spec in (("anomaly_near_val", NEAR_OOD_TEXTURES[2]), ("anomaly_far_test", FAR_OOD_TEXTURES[0])):
        _, label, _, class_map = render_texture_scene(TINY, split, 0, layout=(regions, [5, spec, 7]))
        assert np.array_equal(label, (regions == 1).astype(np.uint8))
        assert np.array_equal(class_map, np.array([5, 255, 7], np.uint8)[regions])
    image, _, _, _ = render_texture_scene(TINY, "anomaly_near_val", 0, layout=(regions, [5, NEAR_OOD_TEXTURES[2], 7]))
    teal = NEAR_OOD_TEXTURES[2].hue
    assert hue_distance(mean_hue(image, regions == 1), (teal.lo + teal.hi) / 2) < 15
    with pytest.raises(ValueError, match="in-distribution split"):
        render_texture_scene(TINY, "train", 0, layout=(regions, [5, spec, 7]))


def test_pixel_noise_and_hard_borders() -> None:
    # a flat-ish region still varies (pixel noise), and a border pixel is one region's colour:
    # the two halves' colour distributions don't blend at the seam.
    image, label, regions, _ = render_texture_scene(TINY, "train", 0, layout=(halves(32), [6, 2]))
    assert image[regions == 0].std(axis=0).min() > 2
    left_col, right_col = image[:, 15].astype(float), image[:, 16].astype(float)
    left_mean, right_mean = image[:, :14].reshape(-1, 3).mean(0), image[:, 18:].reshape(-1, 3).mean(0)
    assert np.linalg.norm(left_col.mean(0) - left_mean) < np.linalg.norm(left_col.mean(0) - right_mean)
    assert np.linalg.norm(right_col.mean(0) - right_mean) < np.linalg.norm(right_col.mean(0) - left_mean)


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------


def test_registration_records_and_metadata(tiny_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tiny_root))
    registered = DatasetCatalog.list()
    for split, (name, _, kind) in TEXTURES_SPLITS.items():
        assert name in registered
        records = DatasetCatalog.get(name)
        assert len(records) == TINY.count(split)
        for record in records:
            for key in ("file_name", "sem_seg_file_name", "region_file_name"):
                assert os.path.isfile(record[key]), record
            assert record["height"] == record["width"] == 32
            assert ("class_file_name" in record) == (kind != "sem_seg")
            if kind != "sem_seg":
                assert os.path.isfile(record["class_file_name"])
        metadata = MetadataCatalog.get(name)
        assert metadata.stuff_classes == list(tx.TEXTURES_CLASSES) and len(metadata.stuff_colors) == NUM_CLASSES
        assert metadata.image_root == str(tiny_root / "textures" / "images" / split)
        if kind == "sem_seg":
            assert metadata.evaluator_type == "sem_seg"
        else:
            assert metadata.evaluator_type == "anomaly" and metadata.anomaly_label == 1
            assert metadata.anomaly_classes == ["in-distribution", "anomaly"]
            assert len(metadata.anomaly_colors) == 2
    names = {r[0] for r in TEXTURES_SPLITS.values()}
    assert names == {
        "textures_sem_seg_train", "textures_sem_seg_val", "textures_sem_seg_test",
        "textures_anomaly_near_val", "textures_anomaly_far_val",
        "textures_anomaly_near_test", "textures_anomaly_far_test",
    }


def test_missing_dataset_error_names_path_layout_and_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        DatasetCatalog.get("textures_anomaly_near_val")
    message = str(info.value)
    assert isinstance(info.value, DatasetNotReadyError)
    assert str(tmp_path / "textures") in message
    assert "prepare_textures.py" in message and "regions/<split>" in message and "manifest.json" in message
    assert not (tmp_path / "textures").exists()  # loading never generates
    (tmp_path / "textures").mkdir()  # a folder without manifest: interrupted generation
    with pytest.raises(FileNotFoundError, match="incomplete"):
        DatasetCatalog.get("textures_sem_seg_train")


def test_prepare_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("prepare_textures", REPO_ROOT / "datasets" / "prepare_textures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    arguments = ["--root", str(tmp_path), "--num-train", "6", "--num-val", "2", "--num-test", "2",
                 "--num-anomaly-val", "2", "--num-anomaly-test", "2", "--size", "32", "--workers", "1"]
    module.main(arguments)
    output = capsys.readouterr().out
    assert "images/s" in output
    manifest = json.loads((tmp_path / "textures" / "manifest.json").read_text())
    assert manifest["params"]["num_train"] == 6 and manifest["params"]["image_size"] == 32
    module.main(arguments)
    assert "kept as is" in capsys.readouterr().out
