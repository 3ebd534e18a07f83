"""Train on your own data: folder datasets (gmmseg_d2.data.datasets.folder).

Registration, every error case (each must name the offending file), when the
per-file checks run, the ``DATASETS.FOLDER`` config key, and the README's one
command end to end: train a few steps on a tiny folder of coloured shapes,
evaluate, and beat a constant prediction by a wide margin.
"""
import importlib.util
import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser

from gmmseg_d2.config import add_gmmseg_config
from gmmseg_d2.data.datasets import FolderDatasetError, register_sem_seg_folder, register_sem_seg_folder_splits
from gmmseg_d2.data.datasets import folder as folder_module
from gmmseg_d2.data.datasets.folder import (
    configure_folder_dataset,
    folder_dataset_name,
    folder_splits,
    load_sem_seg_folder,
    read_folder_classes,
)
from tests.conftest import REPO_ROOT

OWN_DATA_CONFIG = os.path.join(REPO_ROOT, "configs", "own_data", "fcn_R18_gmm.yaml")
CLASSES = ["background", "square", "disc"]
#: Background, square and disc colours of the synthetic images.
PALETTE = np.array([[90, 110, 90], [220, 40, 40], [40, 60, 220]], np.float64)


def _scene(rng: np.random.Generator, size: int) -> tuple:
    """One synthetic (image (H, W, 3) uint8, label (H, W) uint8) pair: squares and discs on grass."""
    yy, xx = np.mgrid[:size, :size]
    label = np.zeros((size, size), np.uint8)
    for _ in range(2):
        h, w = rng.integers(size // 3, size // 2, 2)
        y, x = rng.integers(0, size - size // 3, 2)
        label[y:y + h, x:x + w] = 1
        r = rng.integers(size // 6, size // 4)
        cy, cx = rng.integers(0, size, 2)
        label[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 2
    image = np.clip(PALETTE[label] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    return image, label


def make_folder(root, counts=None, size=16, seed=0, flat=False, ignore_rows=True) -> str:
    """Write a folder dataset: ``images/<split>/img_XXX.jpg`` + ``labels/<split>/img_XXX.png``
    (``flat``: ``images/*.jpg`` + ``labels/*.png``, no split lists) and classes.txt."""
    counts = {"train": 4, "val": 2} if counts is None else counts
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        sub = "" if flat else split
        os.makedirs(os.path.join(root, "images", sub), exist_ok=True)
        os.makedirs(os.path.join(root, "labels", sub), exist_ok=True)
        for i in range(n):
            image, label = _scene(rng, size)
            if ignore_rows and i % 2:
                label[:2] = 255  # an unlabelled band: the ignore value
            stem = f"{split}_{i:03d}" if flat else f"img_{i:03d}"
            Image.fromarray(image).save(os.path.join(root, "images", sub, stem + ".jpg"), quality=95)
            Image.fromarray(label).save(os.path.join(root, "labels", sub, stem + ".png"))
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(CLASSES) + "\n")
    return str(root)


def _error(call, *args, **kwargs) -> FolderDatasetError:
    with pytest.raises(FolderDatasetError) as info:
        call(*args, **kwargs)
    return info.value


def _load_train_net():
    """tools/train_net.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("train_net", os.path.join(REPO_ROOT, "tools", "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bare_cfg():
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    return cfg


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------


def test_register_split_folders_records_and_metadata(tmp_path):
    root = make_folder(tmp_path / "shapes", counts={"train": 3, "val": 2}, size=12)
    assert folder_splits(root) == ["train", "val"]
    name = register_sem_seg_folder("own_shapes_train", root, "train")
    records = DatasetCatalog.get(name)
    assert [os.path.basename(r["file_name"]) for r in records] == ["img_000.jpg", "img_001.jpg", "img_002.jpg"]
    for record in records:
        assert set(record) == {"file_name", "sem_seg_file_name", "height", "width"}
        assert (record["height"], record["width"]) == (12, 12)
        assert record["sem_seg_file_name"] == os.path.join(root, "labels", "train",
                                                           os.path.basename(record["file_name"])[:-4] + ".png")
    meta = MetadataCatalog.get(name)
    assert meta.stuff_classes == CLASSES
    assert len(meta.stuff_colors) == 3 and len({tuple(c) for c in meta.stuff_colors}) == 3
    assert meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
    assert meta.image_root == os.path.join(root, "images", "train")
    assert meta.sem_seg_root == os.path.join(root, "labels", "train")
    # Registering again (a re-run notebook cell) replaces the entry, metadata included.
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("bg\nsq\ndi\n")
    register_sem_seg_folder(name, root, "train")
    assert MetadataCatalog.get(name).stuff_classes == ["bg", "sq", "di"]
    # A name that belongs to another dataset is refused.
    with pytest.raises(ValueError, match="already registered by another module"):
        register_sem_seg_folder("textures_sem_seg_train", root, "train")


def test_flat_layout_single_split_and_split_lists(tmp_path):
    root = make_folder(tmp_path / "flat", counts={"a": 3, "b": 2}, size=8, flat=True)
    assert folder_splits(root) == ["all"]
    assert len(load_sem_seg_folder(root, "all")) == 5
    os.makedirs(os.path.join(root, "splits"))
    with open(os.path.join(root, "splits", "train.txt"), "w") as f:
        f.write("a_002\na_000.jpg\n\na_001\n")  # stems or file names, blank lines skipped
    with open(os.path.join(root, "splits", "val.txt"), "w") as f:
        f.write("b_000\nb_001\n")
    names = register_sem_seg_folder_splits(root, prefix="own_flat")
    assert names == {"train": "own_flat_train", "val": "own_flat_val"}
    train = DatasetCatalog.get("own_flat_train")
    assert [os.path.basename(r["file_name"]) for r in train] == ["a_002.jpg", "a_000.jpg", "a_001.jpg"]
    assert len(DatasetCatalog.get("own_flat_val")) == 2
    error = _error(load_sem_seg_folder, root, "test")
    assert "no split 'test'" in str(error) and "['train', 'val']" in str(error)


def test_classes_json_with_ignore_label_and_colors(tmp_path):
    root = make_folder(tmp_path / "json", counts={"train": 2}, size=8, ignore_rows=False)
    os.remove(os.path.join(root, "classes.txt"))
    label_path = os.path.join(root, "labels", "train", "img_000.png")
    label = np.array(Image.open(label_path))
    label[0, 0] = 7
    Image.fromarray(label).save(label_path)
    with open(os.path.join(root, "classes.json"), "w") as f:
        json.dump({"classes": CLASSES, "ignore_label": 7, "colors": [[0, 0, 0], [255, 0, 0], [0, 0, 255]]}, f)
    classes = read_folder_classes(root)
    assert classes.names == tuple(CLASSES) and classes.ignore_label == 7
    assert classes.colors == ((0, 0, 0), (255, 0, 0), (0, 0, 255))
    assert len(load_sem_seg_folder(root, "train")) == 2
    # 255 is a wrong value once the ignore value is 7.
    label[0, 1] = 255
    Image.fromarray(label).save(label_path)
    error = _error(load_sem_seg_folder, root, "train")
    assert label_path in str(error) and "[255]" in str(error) and "ignore value 7" in str(error)
    # A plain list of names is the short form.
    with open(os.path.join(root, "classes.json"), "w") as f:
        json.dump(CLASSES[:2], f)
    assert read_folder_classes(root).names == tuple(CLASSES[:2])
    assert read_folder_classes(root).ignore_label == 255


# ---------------------------------------------------------------------------
# Errors: each names the file
# ---------------------------------------------------------------------------


def test_missing_label_and_label_without_image(tmp_path):
    root = make_folder(tmp_path / "d", counts={"train": 3}, size=8)
    os.remove(os.path.join(root, "labels", "train", "img_001.png"))
    os.rename(os.path.join(root, "images", "train", "img_002.jpg"), os.path.join(root, "unpaired.jpg"))
    error = _error(register_sem_seg_folder, "own_pairs", root, "train")
    text = str(error)
    assert "2 problems" in text
    assert f"{os.path.join(root, 'images', 'train', 'img_001.jpg')}: no label for this image" in text
    assert os.path.join(root, "labels", "train", "img_001.png") in text  # the label it expected
    assert f"{os.path.join(root, 'labels', 'train', 'img_002.png')}: no image for this label" in text
    assert "own_pairs" not in DatasetCatalog.list()  # nothing half-registered


def test_label_values_out_of_range(tmp_path):
    root = make_folder(tmp_path / "d", counts={"train": 2}, size=8)
    path = os.path.join(root, "labels", "train", "img_001.png")
    label = np.array(Image.open(path))
    label[3, 3], label[4, 4] = 3, 17
    Image.fromarray(label).save(path)
    error = _error(register_sem_seg_folder, "own_values", root, "train")
    assert str(error).count(path) == 1
    assert "label values [3, 17]" in str(error)
    assert "class ids 0..2" in str(error) and "ignore value 255" in str(error)
    assert os.path.join(root, "classes.txt") in str(error)
    assert error.problems == [(path, error.problems[0][1])]


def test_image_label_size_mismatch(tmp_path):
    root = make_folder(tmp_path / "d", counts={"train": 2}, size=8)
    path = os.path.join(root, "labels", "train", "img_000.png")
    Image.fromarray(np.zeros((8, 10), np.uint8)).save(path)
    error = _error(register_sem_seg_folder, "own_sizes", root, "train")
    image_path = os.path.join(root, "images", "train", "img_000.jpg")
    assert f"{path}: label is 10x8 (WxH) but its image {image_path} is 8x8" in str(error)


def test_multichannel_palette_and_16bit_labels(tmp_path):
    root = make_folder(tmp_path / "d", counts={"train": 3}, size=8)
    rgb_path = os.path.join(root, "labels", "train", "img_000.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(rgb_path)
    error = _error(register_sem_seg_folder, "own_rgb", root, "train")
    assert f"{rgb_path}: 3 channels (mode 'RGB'); expected a single-channel PNG of class ids" in str(error)
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(rgb_path)
    assert f"{rgb_path}: 4 channels (mode 'RGBA')" in str(_error(load_sem_seg_folder, root, "train"))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(rgb_path)
    # A palette PNG (VOC style): its indices are the ids, whatever the colours,
    # since labels are read as stored; the indices are what is checked.
    p_path = os.path.join(root, "labels", "train", "img_001.png")
    ids = np.array(Image.open(p_path))
    coloured = Image.frombytes("P", (8, 8), ids.tobytes())
    coloured.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (3 * 253))
    coloured.save(p_path)
    assert Image.open(p_path).mode == "P"
    assert len(load_sem_seg_folder(root, "train")) == 3
    ids[0, 0] = 5
    coloured = Image.frombytes("P", (8, 8), ids.tobytes())
    coloured.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (3 * 253))
    coloured.save(p_path)
    assert f"{p_path}: label values [5] outside" in str(_error(load_sem_seg_folder, root, "train"))
    # 16-bit labels: values are checked in their full range.
    ids[0, 0] = 2
    Image.fromarray(ids.astype(np.uint16)).save(p_path)
    assert Image.open(p_path).mode.startswith("I;16")
    assert len(load_sem_seg_folder(root, "train")) == 3
    wide = ids.astype(np.uint16)
    wide[0, 0] = 300
    Image.fromarray(wide).save(p_path)
    assert f"{p_path}: label values [300] outside" in str(_error(load_sem_seg_folder, root, "train"))


def test_empty_folder_missing_classes_and_layout_errors(tmp_path):
    root = make_folder(tmp_path / "d", counts={"train": 1, "val": 1}, size=8)
    for name in os.listdir(os.path.join(root, "images", "val")):
        os.remove(os.path.join(root, "images", "val", name))
    for name in os.listdir(os.path.join(root, "labels", "val")):
        os.remove(os.path.join(root, "labels", "val", name))
    error = _error(register_sem_seg_folder, "own_empty", root, "val")
    assert f"{os.path.join(root, 'images', 'val')}: empty" in str(error)

    os.remove(os.path.join(root, "classes.txt"))
    error = _error(register_sem_seg_folder, "own_noclasses", root, "train")
    assert f"{os.path.join(root, 'classes.txt')}: no classes file" in str(error)
    assert "expected layout" in str(error) and "labels/<split>/<stem>.png" in str(error)

    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("a\n\nb\n")
    assert "blank line(s) [2]" in str(_error(read_folder_classes, root))
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("a\nb\na\n")
    assert "duplicate class names ['a']" in str(_error(read_folder_classes, root))
    with open(os.path.join(root, "classes.json"), "w") as f:
        f.write("[]")
    assert "keep one" in str(_error(read_folder_classes, root))
    os.remove(os.path.join(root, "classes.txt"))
    with open(os.path.join(root, "classes.json"), "w") as f:
        json.dump({"classes": ["a", "b"], "ignore_label": 1}, f)
    assert "ignore_label 1 is a class id" in str(_error(read_folder_classes, root))

    missing = str(tmp_path / "nowhere")
    assert f"{missing}: folder not found" in str(_error(register_sem_seg_folder, "own_x", missing, "train"))
    bare = make_folder(tmp_path / "bare", counts={"train": 1}, size=8)
    os.rename(os.path.join(bare, "labels"), os.path.join(bare, "masks"))
    assert f"{os.path.join(bare, 'labels')}: folder not found" in str(_error(folder_splits, bare))


def test_jpeg_label_and_bad_split_list(tmp_path):
    root = make_folder(tmp_path / "d", counts={"train": 2}, size=8)
    jpeg = os.path.join(root, "labels", "train", "img_000.jpg")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(jpeg)
    assert f"{jpeg}: labels must be PNG" in str(_error(load_sem_seg_folder, root, "train"))

    flat = make_folder(tmp_path / "flat", counts={"x": 2}, size=8, flat=True)
    os.makedirs(os.path.join(flat, "splits"))
    list_file = os.path.join(flat, "splits", "train.txt")
    with open(list_file, "w") as f:
        f.write("x_000\nx_404\nx_000\n")
    error = _error(folder_splits, flat)
    assert f"{list_file}: line 3: 'x_000' already listed on line 1" in str(error)
    with open(list_file, "w") as f:
        f.write("x_000\n\nx_404\n")  # the line number counts the blank line
    error = _error(load_sem_seg_folder, flat, "train")
    assert f"{list_file}: line 3: no image and no label named 'x_404'" in str(error)
    # Split folders on one side only.
    os.makedirs(os.path.join(flat, "labels", "train"))
    error = _error(folder_splits, flat)
    assert f"{os.path.join(flat, 'labels')}: has split folders ['train']" in str(error)


def test_unreadable_files_and_duplicate_stems(tmp_path):
    root = make_folder(tmp_path / "d", counts={"train": 3}, size=8)
    image_path = os.path.join(root, "images", "train", "img_000.jpg")
    label_path = os.path.join(root, "labels", "train", "img_001.png")
    for path in (image_path, label_path):
        with open(path, "wb") as f:
            f.write(b"not an image")
    error = _error(load_sem_seg_folder, root, "train")
    assert f"{image_path}: cannot read the image" in str(error)
    assert f"{label_path}: cannot read the label PNG" in str(error)
    twin = os.path.join(root, "images", "train", "img_002.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(twin)
    error = _error(register_sem_seg_folder, "own_twins", root, "train")
    assert "several images with the stem 'img_002': ['img_002.jpg', 'img_002.png']" in str(error)


# ---------------------------------------------------------------------------
# When the per-file checks run, and their cache
# ---------------------------------------------------------------------------


def _break_label(root: str) -> str:
    path = os.path.join(root, "labels", "train", "img_000.png")
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(path)
    return path


def test_validation_modes(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", counts={"train": 3}, size=8)
    bad = _break_label(root)
    # eager (and auto on a small split): the registration fails.
    assert bad in str(_error(register_sem_seg_folder, "own_eager", root, "train", validate="eager"))
    assert bad in str(_error(register_sem_seg_folder, "own_auto", root, "train"))
    # lazy (and auto above the limit): registration passes (pairing is fine), loading fails.
    register_sem_seg_folder("own_lazy", root, "train", validate="lazy")
    assert bad in str(_error(DatasetCatalog.get, "own_lazy"))
    monkeypatch.setattr(folder_module, "EAGER_VALIDATION_MAX_IMAGES", 2)
    register_sem_seg_folder("own_auto_big", root, "train")
    assert bad in str(_error(DatasetCatalog.get, "own_auto_big"))
    # off: only image headers are read; pairing is still checked at registration.
    register_sem_seg_folder("own_off", root, "train", validate="off")
    assert len(DatasetCatalog.get("own_off")) == 3
    os.remove(os.path.join(root, "labels", "train", "img_002.png"))
    assert "no label for this image" in str(_error(register_sem_seg_folder, "own_off2", root, "train",
                                                   validate="off"))
    with pytest.raises(ValueError, match="validate must be one of"):
        register_sem_seg_folder("own_bad_mode", root, "train", validate="sometimes")


def test_records_are_cached_until_a_file_changes(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", counts={"train": 3}, size=8)
    calls = []
    check = folder_module._check_pair
    monkeypatch.setattr(folder_module, "_check_pair", lambda *a: calls.append(a[0]) or check(*a))
    register_sem_seg_folder("own_cached", root, "train")  # eager: reads the 3 pairs once
    assert len(calls) == 3
    first = DatasetCatalog.get("own_cached")
    assert DatasetCatalog.get("own_cached") == first and len(calls) == 3  # cached, no file read
    first[0]["height"] = -1  # callers get copies
    assert DatasetCatalog.get("own_cached")[0]["height"] == 8
    time.sleep(0.01)
    bad = _break_label(root)  # a changed file (size / mtime) is read again, and caught
    assert bad in str(_error(DatasetCatalog.get, "own_cached"))
    assert len(calls) == 6


# ---------------------------------------------------------------------------
# The config key
# ---------------------------------------------------------------------------


def test_config_key_registers_splits_and_sets_the_head(tmp_path):
    root = make_folder(tmp_path / "my data", counts={"train": 2, "val": 1}, size=8)
    cfg = _bare_cfg()
    cfg.merge_from_file(OWN_DATA_CONFIG)
    cfg.merge_from_list(["DATASETS.FOLDER", root])
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 8  # the base config's, before
    configure_folder_dataset(cfg)
    assert folder_dataset_name(root, "train") == "folder_my_data_train"
    assert cfg.DATASETS.TRAIN == ("folder_my_data_train",)
    assert cfg.DATASETS.TEST == ("folder_my_data_val",)
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 3 and cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE == 255
    assert len(DatasetCatalog.get("folder_my_data_val")) == 1

    # Explicit splits; a missing one names what the folder has.
    cfg.merge_from_list(["DATASETS.FOLDER_TRAIN_SPLIT", "val", "DATASETS.FOLDER_TEST_SPLITS", "('train', 'val')"])
    configure_folder_dataset(cfg)
    assert cfg.DATASETS.TRAIN == ("folder_my_data_val",)
    assert cfg.DATASETS.TEST == ("folder_my_data_train", "folder_my_data_val")
    cfg.merge_from_list(["DATASETS.FOLDER_TEST_SPLITS", "('test',)"])
    assert "split(s) ['test'] not in this folder's ['train', 'val']" in str(_error(configure_folder_dataset, cfg))

    # No val split: evaluate on the training split.
    single = make_folder(tmp_path / "single", counts={"train": 2}, size=8)
    cfg = _bare_cfg()
    cfg.DATASETS.FOLDER = single
    configure_folder_dataset(cfg)
    assert cfg.DATASETS.TRAIN == cfg.DATASETS.TEST == ("folder_single_train",)

    # The folder key with a missing folder names it and the layout.
    cfg.DATASETS.FOLDER = str(tmp_path / "typo")
    error = _error(configure_folder_dataset, cfg)
    assert str(tmp_path / "typo") in str(error) and "expected layout" in str(error)


def test_config_mismatch_with_api_registration_is_an_error(tmp_path):
    root = make_folder(tmp_path / "api", counts={"train": 2}, size=8)
    register_sem_seg_folder("own_api_train", root, "train")
    cfg = _bare_cfg()
    cfg.DATASETS.TRAIN = ("own_api_train",)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5
    with pytest.raises(ValueError) as info:
        configure_folder_dataset(cfg)
    assert "NUM_CLASSES is 5 but dataset 'own_api_train' has 3 classes" in str(info.value)
    assert os.path.join(root, "classes.txt") in str(info.value)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    configure_folder_dataset(cfg)  # consistent: passes
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 0
    with pytest.raises(ValueError, match="IGNORE_VALUE is 0 but dataset 'own_api_train' ignores 255"):
        configure_folder_dataset(cfg)


# ---------------------------------------------------------------------------
# End to end: the README's command
# ---------------------------------------------------------------------------

#: The one command of datasets/README.md, then overrides that make it a test:
#: 48 px images at their own size (no resize, no crop), 80 steps of batch 4.
FAST_OVERRIDES = [
    "SOLVER.MAX_ITER", "80", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "5",
    "INPUT.MIN_SIZE_TRAIN", "(48,)", "INPUT.MAX_SIZE_TRAIN", "48", "INPUT.CROP.ENABLED", "False",
    "INPUT.MIN_SIZE_TEST", "48", "INPUT.MAX_SIZE_TEST", "48", "DATALOADER.NUM_WORKERS", "0",
]


def _readme_command(root: str, output_dir: str) -> list:
    return ["--config-file", OWN_DATA_CONFIG, "--num-gpus", "1", "DATASETS.FOLDER", root, "OUTPUT_DIR", output_dir]


def test_readme_documents_the_command():
    with open(os.path.join(REPO_ROOT, "datasets", "README.md")) as f:
        readme = f.read()
    assert ("tools/train_net.py --config-file configs/own_data/fcn_R18_gmm.yaml --num-gpus 1 "
            "DATASETS.FOLDER /path/to/my_data OUTPUT_DIR output/my_data") in readme


def test_train_and_evaluate_on_a_folder(tmp_path, one_torch_thread):
    root = make_folder(tmp_path / "shapes", counts={"train": 10, "val": 4}, size=48, seed=0)
    output_dir = str(tmp_path / "out")
    train_net = _load_train_net()
    torch.manual_seed(0)
    results = train_net.main(default_argument_parser().parse_args(_readme_command(root, output_dir) + FAST_OVERRIDES))

    with open(os.path.join(output_dir, "eval_results.json")) as f:
        written = json.load(f)
    assert list(written) == ["folder_shapes_val"]
    metrics = written["folder_shapes_val"]["sem_seg"]
    assert metrics["mIoU"] == pytest.approx(results["folder_shapes_val"]["sem_seg"]["mIoU"])
    assert {f"IoU-{c}" for c in CLASSES} <= set(metrics)
    # The best constant prediction (the most frequent class everywhere) scores
    # pACC = its frequency and mIoU = its frequency / 3 on these val labels
    # (65 % and 22 % for data seed 0). 80 steps reach 58-62 mIoU / 81-83 pACC,
    # every class IoU >= 44 (data seeds 0 and 2, 1 or 2 threads); 40 steps
    # left pACC only 2-3 points above the constant's.
    labels = np.concatenate([np.array(Image.open(os.path.join(root, "labels", "val", n))).ravel()
                             for n in sorted(os.listdir(os.path.join(root, "labels", "val")))])
    frequency = np.bincount(labels[labels != 255], minlength=3) / np.count_nonzero(labels != 255)
    constant_miou, constant_pacc = 100 * frequency.max() / 3, 100 * frequency.max()
    assert metrics["mIoU"] > 2 * constant_miou, (metrics, constant_miou)
    assert metrics["pACC"] > constant_pacc + 10, (metrics, constant_pacc)
    assert min(metrics[f"IoU-{c}"] for c in CLASSES) > 30.0, metrics  # every class is learned

    # --eval-only on the checkpoint reproduces the numbers and writes its own results.
    eval_dir = str(tmp_path / "eval")
    argv = _readme_command(root, eval_dir) + FAST_OVERRIDES + [
        "MODEL.WEIGHTS", os.path.join(output_dir, "model_final.pth")]
    reproduced = train_net.main(default_argument_parser().parse_args(["--eval-only"] + argv))
    assert reproduced["folder_shapes_val"]["sem_seg"]["mIoU"] == pytest.approx(metrics["mIoU"], abs=1e-6)
    assert os.path.isfile(os.path.join(eval_dir, "eval_results.json"))
