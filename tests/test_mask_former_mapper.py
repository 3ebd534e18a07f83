"""MaskFormerSemanticDatasetMapper: padding, per-class masks, ignore handling,
the crop constraint, label validation, and the trainer's mapper dispatch."""
import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from gmmseg_d2.data.dataset_mappers import MaskFormerSemanticDatasetMapper, PerPixelSemanticDatasetMapper
from gmmseg_d2.engine import Trainer
from gmmseg_d2.data.training_stream import find_stream

IGNORE = 255
NUM_CLASSES = 4
DATASET = "gmmseg_test_mask_former_mapper_train"


def _write_record(directory, name, image, label):
    image_path, label_path = str(directory / f"{name}.png"), str(directory / f"{name}_label.png")
    Image.fromarray(image).save(image_path)
    Image.fromarray(label).save(label_path)
    return {"file_name": image_path, "sem_seg_file_name": label_path,
            "height": image.shape[0], "width": image.shape[1]}


@pytest.fixture
def record(tmp_path):
    """A 40 x 60 image whose label has classes 0, 2, 3 and an ignored block."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    label = np.zeros((40, 60), dtype=np.uint8)
    label[:, 30:] = 2
    label[25:, 45:] = 3
    label[:5, :10] = IGNORE
    return _write_record(tmp_path, "a", image, label), image, label


def _mapper(size_divisibility=32, augmentations=()):
    return MaskFormerSemanticDatasetMapper(
        True, augmentations=list(augmentations), image_format="RGB", ignore_label=IGNORE,
        size_divisibility=size_divisibility, allowed_label_values=list(range(NUM_CLASSES)) + [IGNORE])


def test_pads_to_size_divisibility_and_builds_one_mask_per_class(record):
    rec, image, label = record
    out = _mapper(size_divisibility=32)(rec)
    assert "sem_seg_file_name" not in out
    img, sem_seg = out["image"], out["sem_seg"]
    assert img.shape == (3, 64, 64) and img.dtype == torch.uint8
    assert sem_seg.shape == (64, 64) and sem_seg.dtype == torch.int64
    # Content at the top-left, padding at the bottom/right: 128 (official) and ignore.
    assert np.array_equal(img[:, :40, :60].numpy(), image.transpose(2, 0, 1))
    assert (img[:, 40:] == 128).all() and (img[:, :, 60:] == 128).all()
    assert np.array_equal(sem_seg[:40, :60].numpy(), label)
    assert (sem_seg[40:] == IGNORE).all() and (sem_seg[:, 60:] == IGNORE).all()

    instances = out["instances"]
    assert instances.image_size == (64, 64)
    assert instances.gt_classes.tolist() == [0, 2, 3]
    assert instances.gt_classes.dtype == torch.int64
    masks = instances.gt_masks
    assert masks.shape == (3, 64, 64) and masks.dtype == torch.bool
    padded_label = np.full((64, 64), IGNORE)
    padded_label[:40, :60] = label
    for mask, cls in zip(masks, (0, 2, 3)):
        assert np.array_equal(mask.numpy(), padded_label == cls)
    # Masks partition exactly the non-ignored pixels.
    assert np.array_equal(masks.sum(0).numpy(), (padded_label != IGNORE).astype(int))


def test_no_padding_without_size_divisibility(record):
    rec, _, label = record
    out = _mapper(size_divisibility=-1)(rec)
    assert out["image"].shape == (3, 40, 60)
    assert np.array_equal(out["sem_seg"].numpy(), label)
    assert out["instances"].image_size == (40, 60)


def test_pads_to_next_multiple_not_smaller(record):
    rec, _, _ = record
    out = _mapper(size_divisibility=16)(rec)
    assert out["image"].shape == (3, 48, 64)  # 40 -> 48, 60 -> 64


def test_fully_ignored_label_gives_no_instances(tmp_path):
    rec = _write_record(tmp_path, "void", np.zeros((20, 30, 3), np.uint8), np.full((20, 30), IGNORE, np.uint8))
    instances = _mapper(size_divisibility=32)(rec)["instances"]
    assert instances.gt_classes.shape == (0,)
    assert instances.gt_masks.shape == (0, 32, 32)


def test_invalid_records_fail_with_clear_errors(tmp_path, record):
    bad_label = np.zeros((20, 30), np.uint8)
    bad_label[3, 4] = 7  # 4 classes: 7 is neither a class nor the ignore label
    rec = _write_record(tmp_path, "bad", np.zeros((20, 30, 3), np.uint8), bad_label)
    with pytest.raises(ValueError, match=r"bad_label\.png contains value\(s\) \[7\]"):
        _mapper()(rec)
    good, _, _ = record
    with pytest.raises(ValueError, match="no 'sem_seg_file_name'"):
        _mapper()({k: v for k, v in good.items() if k != "sem_seg_file_name"})
    with pytest.raises(ValueError, match="'annotations'"):
        _mapper()({**good, "annotations": []})
    with pytest.raises(ValueError, match="training targets only"):
        MaskFormerSemanticDatasetMapper(False, augmentations=[], image_format="RGB", ignore_label=IGNORE,
                                        size_divisibility=-1, allowed_label_values=[0, IGNORE])


@pytest.fixture
def registered_dataset(tmp_path):
    """A one-image dataset (left half class 0, right half class 1) registered in the catalogs."""
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    label = np.zeros((64, 64), np.uint8)
    label[:, 32:] = 1
    rec = _write_record(tmp_path, "halves", image, label)
    rec["image_id"] = 0
    DatasetCatalog.register(DATASET, lambda: [dict(rec)])
    MetadataCatalog.get(DATASET).set(stuff_classes=["a", "b", "c", "d"], ignore_label=IGNORE,
                                     evaluator_type="sem_seg")
    yield rec
    DatasetCatalog.remove(DATASET)
    MetadataCatalog.remove(DATASET)


def _crop_cfg(demo_cfg, max_area):
    cfg = demo_cfg.clone()
    cfg.DATASETS.TRAIN = (DATASET,)
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = (32, 32)
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = max_area
    cfg.INPUT.COLOR_AUG_SSD = True
    cfg.INPUT.SIZE_DIVISIBILITY = 32
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 19  # the dataset's 4 stuff classes take precedence
    return cfg


def _largest_class_fractions(mapper, rec, samples=40):
    np.random.seed(0)  # Detectron2's augmentations draw from numpy's global RNG
    fractions = []
    for _ in range(samples):
        out = mapper(rec)
        assert out["image"].shape == (3, 32, 32)
        counts = np.bincount(out["sem_seg"].numpy().ravel(), minlength=2)[:2]
        fractions.append(counts.max() / counts.sum())
    return np.array(fractions)


def test_crop_respects_single_category_area_limit(demo_cfg, registered_dataset):
    # A 32-wide crop of the two 32-wide halves: the larger class covers
    # 50-100 %; at most 90 % is allowed in 25 of 33 crop positions, so the
    # 10 retries of Detectron2's constraint fail with probability ~1e-6.
    constrained = MaskFormerSemanticDatasetMapper(_crop_cfg(demo_cfg, 0.9), True)
    assert constrained.ignore_label == IGNORE
    assert constrained.allowed_label_values == (0, 1, 2, 3, IGNORE)
    assert (_largest_class_fractions(constrained, registered_dataset) < 0.9).all()
    # Without the constraint, crops dominated by one class do occur.
    free = MaskFormerSemanticDatasetMapper(_crop_cfg(demo_cfg, 1.0), True)
    assert (_largest_class_fractions(free, registered_dataset) >= 0.9).any()


def test_trainer_dispatches_on_dataset_mapper_name(demo_cfg, registered_dataset):
    cfg = demo_cfg.clone()
    cfg.DATASETS.TRAIN = (DATASET,)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 1
    # The per-pixel demo config selects the per-pixel mapper explicitly (the
    # key's default is Mask2Former's "mask_former_semantic").
    assert cfg.INPUT.DATASET_MAPPER_NAME == "per_pixel_semantic"
    assert type(find_stream(Trainer.build_train_loader(cfg)).mapper) is PerPixelSemanticDatasetMapper
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_semantic"
    cfg.INPUT.SIZE_DIVISIBILITY = 128
    loader = Trainer.build_train_loader(cfg)
    assert type(find_stream(loader).mapper) is MaskFormerSemanticDatasetMapper
    batch = next(iter(loader))
    assert batch[0]["image"].shape == (3, 128, 128) and "instances" in batch[0]
    cfg.INPUT.DATASET_MAPPER_NAME = "coco_panoptic_lsj"
    with pytest.raises(ValueError, match="mask_former_semantic"):
        Trainer.build_train_loader(cfg)
