"""Class-balanced training sampling: closed-form probabilities, drawn frequencies, resumability, trainer hook."""
import os

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from gmmseg_d2.data import samplers
from gmmseg_d2.data.samplers import (
    WeightedTrainingSampler,
    WeightedTrainingStream,
    class_balanced_probabilities,
    class_presence,
    draw_index,
    load_or_compute_class_presence,
    repeat_factor_probabilities,
)
from gmmseg_d2.engine import Trainer
from gmmseg_d2.data.training_stream import ResumableTrainingStream, find_stream

# Image i contains the classes of row i; class 3 is in no image, image 4 in none.
PRESENCE = np.array([
    [1, 0, 0, 0],
    [1, 1, 0, 0],
    [1, 0, 1, 0],
    [0, 0, 1, 0],
    [0, 0, 0, 0],
], dtype=bool)


def test_class_balanced_probabilities_closed_form():
    # Classes 0, 1, 2 occur in 3, 1, 2 images: each is drawn with probability 1/3,
    # then one of its images uniformly.
    expected = np.array([1 / 9, 1 / 9 + 1 / 3, 1 / 9 + 1 / 6, 1 / 6, 0.0])
    np.testing.assert_allclose(class_balanced_probabilities(PRESENCE), expected)
    assert expected.sum() == pytest.approx(1.0)


def test_drawn_frequencies_match_the_official_two_stage_draw():
    """The stream's draws, and an independent simulation of the official rule
    (uniform class among present ones, then uniform image containing it),
    both match the closed form within 5 binomial standard deviations."""
    n = 30000
    probabilities = class_balanced_probabilities(PRESENCE)
    cumulative = np.cumsum(probabilities)
    drawn = np.bincount([draw_index(cumulative, 7, k) for k in range(n)], minlength=5) / n

    rng = np.random.default_rng(0)
    classes = np.flatnonzero(PRESENCE.any(axis=0))
    images_of = {c: np.flatnonzero(PRESENCE[:, c]) for c in classes}
    picked = [rng.choice(images_of[c]) for c in rng.choice(classes, size=n)]
    official = np.bincount(picked, minlength=5) / n

    tolerance = 5 * np.sqrt(probabilities * (1 - probabilities) / n) + 1e-12
    assert np.all(np.abs(drawn - probabilities) <= tolerance), (drawn, probabilities)
    assert np.all(np.abs(official - probabilities) <= tolerance), (official, probabilities)
    assert drawn[4] == 0  # an image with no class is never drawn


def test_repeat_factor_probabilities_follow_the_rarest_class():
    # 10 images: class 0 in all, class 1 in image 0 only (f = 0.1), class 2 in images 0-3 (f = 0.4).
    presence = np.zeros((10, 3), dtype=bool)
    presence[:, 0] = True
    presence[0, 1] = True
    presence[:4, 2] = True
    # t = 0.4: r_0 = 1, r_1 = sqrt(4) = 2, r_2 = 1 -> image 0 weighs 2, the others 1.
    np.testing.assert_allclose(repeat_factor_probabilities(presence, 0.4), np.r_[2.0, [1.0] * 9] / 11)
    # t = 0.8 without the square root: r_1 = 8, r_2 = 2; image 0 takes its rarest class's 8.
    np.testing.assert_allclose(repeat_factor_probabilities(presence, 0.8, sqrt=False),
                               np.r_[8.0, 2.0, 2.0, 2.0, [1.0] * 6] / 20)
    with pytest.raises(ValueError, match="REPEAT_THRESHOLD must be > 0"):
        repeat_factor_probabilities(presence, 0.0)


def test_weighted_stream_is_a_pure_function_of_seed_and_position():
    dataset = [{"index": i} for i in range(5)]
    probabilities = class_balanced_probabilities(PRESENCE)
    make = lambda seed: WeightedTrainingStream(dataset, lambda d: d["index"], 2, seed=seed,  # noqa: E731
                                               probabilities=probabilities)
    first, again, other = make(3), make(3), make(4)
    again.start_iteration = 50  # a resumed stream: same draws at the same positions
    sequence = [first.index_at(k) for k in range(200)]
    assert sequence == [again.index_at(k) for k in range(200)]
    assert sequence != [other.index_at(k) for k in range(200)]
    # The iterator yields the mapped samples of its positions, from the start iteration on.
    iterator = iter(again)
    assert [next(iterator) for _ in range(4)] == sequence[100:104]
    # The Detectron2-style sampler shards the same draws (one process: every position).
    sampler = iter(WeightedTrainingSampler(probabilities, seed=3))
    assert [next(sampler) for _ in range(200)] == sequence
    with pytest.raises(ValueError, match="one probability per image"):
        WeightedTrainingStream(dataset, lambda d: d, 2, seed=0, probabilities=probabilities[:4])


def _write_labels(directory, labels):
    paths = []
    for i, label in enumerate(labels):
        path = os.path.join(directory, f"label_{i}.png")
        Image.fromarray(np.asarray(label, np.uint8)).save(path)
        paths.append(path)
    return paths


def test_class_presence_from_label_maps_and_cache(tmp_path, monkeypatch):
    labels = [np.array([[0, 0], [255, 2]]), np.array([[1, 255], [1, 1]]), np.full((2, 2), 255)]
    paths = _write_labels(str(tmp_path), labels)
    expected = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(class_presence(paths, 3, 255), expected)
    cache = str(tmp_path / "cache")
    np.testing.assert_array_equal(load_or_compute_class_presence(paths, 3, 255, cache), expected)
    (cached,) = os.listdir(cache)
    # A second call reads the cache and reads no label map...
    with monkeypatch.context() as patch:
        patch.setattr(samplers, "class_presence", lambda *a, **k: pytest.fail("recomputed despite the cache"))
        np.testing.assert_array_equal(load_or_compute_class_presence(paths, 3, 255, cache), expected)
    # ...while a changed label file gets a new cache entry.
    Image.fromarray(np.full((3, 3), 1, np.uint8)).save(paths[2])
    assert load_or_compute_class_presence(paths, 3, 255, cache)[2].tolist() == [False, True, False]
    assert len(os.listdir(cache)) == 2 and cached in os.listdir(cache)
    with pytest.raises(ValueError, match=r"label_0\.png contains value\(s\) \[2\]: labels must be 0\.\.1"):
        class_presence(paths, 2, 255)


def test_trainer_builds_a_resumable_class_balanced_loader(tmp_path, demo_cfg, one_torch_thread):
    name = "test_class_balanced_tiny"
    labels = [np.zeros((32, 32)), np.zeros((32, 32)), np.zeros((32, 32)), np.full((32, 32), 5)]
    labels[0][:8] = 3
    paths = _write_labels(str(tmp_path), labels)
    records = []
    for i, path in enumerate(paths):
        image = os.path.join(str(tmp_path), f"image_{i}.png")
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(image)
        records.append({"file_name": image, "sem_seg_file_name": path, "height": 32, "width": 32})
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(stuff_classes=[str(c) for c in range(8)], ignore_label=255,
                                  evaluator_type="sem_seg")
    try:
        demo_cfg.DATASETS.TRAIN = (name,)
        demo_cfg.DATALOADER.NUM_WORKERS = 0
        demo_cfg.SOLVER.IMS_PER_BATCH = 2
        demo_cfg.OUTPUT_DIR = str(tmp_path / "output")
        assert type(find_stream(Trainer.build_train_loader(demo_cfg))) is ResumableTrainingStream  # the default
        demo_cfg.DATALOADER.SAMPLER_TRAIN = "ClassBalancedTrainingSampler"
        loader = Trainer.build_train_loader(demo_cfg)
        stream = find_stream(loader)
        assert isinstance(stream, WeightedTrainingStream)
        # Classes 0, 3, 5 occur in 3, 1, 1 images: image 0 has 0 and 3, image 3 only 5.
        np.testing.assert_allclose(stream.probabilities, [1 / 9 + 1 / 3, 1 / 9, 1 / 9, 1 / 3])
        batch = next(iter(loader))
        assert len(batch) == 2 and batch[0]["image"].shape[0] == 3
        assert os.path.isdir(os.path.join(demo_cfg.OUTPUT_DIR, "class_presence"))

        demo_cfg.DATALOADER.SAMPLER_TRAIN = "RepeatFactorTrainingSampler"
        demo_cfg.DATALOADER.REPEAT_THRESHOLD = 1.0  # r_c = sqrt(4 / n_c)
        stream = find_stream(Trainer.build_train_loader(demo_cfg))
        np.testing.assert_allclose(stream.probabilities, np.array([2, 2 / np.sqrt(3), 2 / np.sqrt(3), 2])
                                   / (4 + 4 / np.sqrt(3)))
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
