"""GMMSeg-Mask2Former: the GMM class head (``MODEL.CLASSIFIER.NAME: "gmm"`` at query level), query-level EM
through SetCriterion's classifier losses, checkpoint initialisation, density anomaly scores."""
import logging
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gmmseg_d2.modeling.anomaly import (
    DENSITY_AVG_FALLBACK_WEIGHT, MASK_DENSITY_ANOMALY_SCORES, mask_density_anomaly_score,
)
from gmmseg_d2.modeling.classifiers import (
    CLASSIFIER_REGISTRY, QUERY_IGNORE_LABEL, ClassifierOutput, GMMClassifier, LinearClassifier, build_classifier,
)
from gmmseg_d2.modeling.criterion import SetCriterion, query_class_labels
from tests.conftest import REPO_ROOT
from tests.test_mask_former import mean_loss_per_pass, mosaic_batches

GMM_CONFIG = os.path.join(REPO_ROOT, "configs", "mosaic", "maskformer2_R18_gmm.yaml")
SOFTMAX_CONFIG = os.path.join(REPO_ROOT, "configs", "mosaic", "maskformer2_R18_softmax.yaml")
# Small inputs for fast model-level tests.
SMALL = ("INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.CROP.SIZE", "(64, 64)", "INPUT.SIZE_DIVISIBILITY", "64",
         "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256")


def _cfg(path=GMM_CONFIG, *opts):
    from detectron2.config import get_cfg

    from gmmseg_d2.config import add_gmmseg_config

    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def _build(cfg, seed=0):
    from detectron2.modeling import build_model

    torch.manual_seed(seed)
    return build_model(cfg)


def _instances(labels, masks):
    from detectron2.structures import Instances

    instances = Instances(tuple(masks.shape[-2:]))
    instances.gt_classes = torch.tensor(labels, dtype=torch.int64)
    instances.gt_masks = masks
    return instances


def _toy_batch(size=64):
    """Two images: classes {1, 3} (top/bottom halves) and {5} (everywhere)."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 255, (3, size, size), dtype=torch.uint8, generator=generator) for _ in range(2)]
    halves = torch.zeros(2, size, size, dtype=torch.bool)
    halves[0, : size // 2] = True
    halves[1, size // 2:] = True
    return [
        {"image": images[0], "instances": _instances([1, 3], halves)},
        {"image": images[1], "instances": _instances([5], torch.ones(1, size, size, dtype=torch.bool))},
    ]


# ----------------------------------------------------------------------------- head and losses


def _query_head(cfg):
    """The decoder's class head as the transformer decoder's from_config builds it."""
    return build_classifier(cfg, in_channels=cfg.MODEL.MASK_FORMER.HIDDEN_DIM,
                            num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES + 1, level="query",
                            ignore_value=QUERY_IGNORE_LABEL)


def test_config_key_lives_outside_the_official_block_and_selects_the_head():
    cfg = _cfg(SOFTMAX_CONFIG)
    assert cfg.MODEL.CLASSIFIER.NAME == "softmax"
    head = _build(cfg).sem_seg_head.predictor.class_embed
    # Mask2Former's nn.Linear(HIDDEN_DIM, C + 1), same parameter layout.
    assert isinstance(head, LinearClassifier) and head.level == "query"
    assert head.weight.shape == (9, 64) and head.bias.shape == (9,)
    registered = sorted(name for name, _ in CLASSIFIER_REGISTRY)
    assert {"gmm", "softmax"} <= set(registered)
    with pytest.raises(KeyError, match=r"Unknown MODEL.CLASSIFIER.NAME 'linear'; registered classifiers: \[.*'gmm'"):
        _build(_cfg(SOFTMAX_CONFIG, "MODEL.CLASSIFIER.NAME", "linear"))
    with pytest.raises(ValueError, match=r"MODEL.GMM.QUERY.MEMORY_SAMPLES must be one of .*'some'"):
        _build(_cfg(GMM_CONFIG, "MODEL.GMM.QUERY.MEMORY_SAMPLES", "some"))
    with pytest.raises(ValueError, match="density_min.*needs a per-query anomaly score"):
        _build(_cfg(SOFTMAX_CONFIG, "MODEL.MASK_FORMER.TEST.ANOMALY_SCORE", "density_min"))
    with pytest.raises(ValueError, match="MODEL.CLASSIFIER.QUERY.UPDATE_LAYERS must be one of"):
        _build(_cfg(GMM_CONFIG, "MODEL.CLASSIFIER.QUERY.UPDATE_LAYERS", "first"))


def test_gmm_head_shapes_losses_and_weight_dict(one_torch_thread):
    cfg = _cfg(GMM_CONFIG, *SMALL)
    model = _build(cfg).train()
    head = model.sem_seg_head.predictor.class_embed
    assert isinstance(head, GMMClassifier) and head.level == "query"
    assert model.sem_seg_head.classifier is head
    assert (head.num_classes, head.num_components, head.embed_dim, head.in_channels) == (9, 5, 64, 64)
    assert head.memory.capacity == cfg.MODEL.GMM.QUERY.MEMORY_SIZE == 100
    assert head.ignore_value == QUERY_IGNORE_LABEL
    assert (head.estep_samples, head.memory_samples) == ("all", "all")  # MEMORY_SAMPLES "labelled"
    # The query head's own defaults, not the per-pixel MODEL.GMM ones.
    assert (head.embedding, head.memory_init, head.bootstrap_empty_classes) == ("linear", "empty", True)
    assert head.memory.count.sum() == 0
    # The criterion knows the classifier's loss names only; it gets the
    # classifier at every call, and its state appears once, under the decoder.
    assert model.criterion.classifier_loss_names == ("loss_gmm_component",)
    assert not any(module is head for module in model.criterion.modules())
    assert not [k for k in model.state_dict() if k.startswith("criterion.") and k != "criterion.empty_weight"]

    batch = _toy_batch()
    images = model.preprocess_image(batch)
    outputs = model.sem_seg_head(model.backbone(images.tensor))
    assert outputs["pred_logits"].shape == (2, 16, 9) and outputs["pred_masks"].shape == (2, 16, 16, 16)
    assert len(outputs["aux_outputs"]) == 3
    for prediction in [outputs] + outputs["aux_outputs"]:
        assert isinstance(prediction["pred_classifier"], ClassifierOutput)
        gmm = prediction["pred_classifier"].details
        assert torch.equal(prediction["pred_logits"], prediction["pred_classifier"].class_logits)
        assert gmm.embeddings.shape == (2, 16, 64)
        assert gmm.component_log_likelihood.shape == (2, 16, 9, 5)
        assert torch.equal(prediction["pred_logits"], gmm.class_logits)
        # One classifier for every layer: the logits are its function of the embeddings.
        torch.testing.assert_close(head.classify(gmm.embeddings).class_logits, gmm.class_logits)
        torch.testing.assert_close(gmm.embeddings.norm(dim=-1), torch.ones(2, 16))

    losses = model(batch)
    suffixes = ("", "_0", "_1", "_2")
    expected = {f"loss_{k}{s}" for k in ("ce", "mask", "dice", "gmm_component") for s in suffixes}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    weights = model.criterion.weight_dict
    assert all(weights[f"loss_gmm_component{s}"] == 1.0 for s in suffixes)
    # The classifier's loss already carries MODEL.GMM.CONTRASTIVE_LOSS_WEIGHT: CE over 45 components is ~log 45.
    assert 0 < losses["loss_gmm_component"].item() < 0.01 * 2 * math.log(45)
    assert int(head.iteration) == 1  # one state update per step, aux layers leave the state alone
    sum(losses.values()).backward()
    assert head.projection.weight.grad.abs().sum() > 0


def test_query_head_embedding_and_memory_start_ignore_the_per_pixel_keys():
    # MODEL.GMM.EMBEDDING / MEMORY_INIT / BOOTSTRAP_EMPTY_CLASSES / MEMORY_SIZE /
    # MAX_SAMPLES_PER_COMPONENT are per-pixel keys.
    cfg = _cfg(GMM_CONFIG, "MODEL.GMM.EMBEDDING", "conv_bn_relu", "MODEL.GMM.MEMORY_INIT", "random",
               "MODEL.GMM.BOOTSTRAP_EMPTY_CLASSES", "False", "MODEL.GMM.MEMORY_SIZE", "7",
               "MODEL.GMM.MAX_SAMPLES_PER_COMPONENT", "3")
    head = _query_head(cfg)
    assert isinstance(head, GMMClassifier) and head.level == "query"
    assert (head.embedding, head.memory_init, head.bootstrap_empty_classes) == ("linear", "empty", True)
    assert (head.memory.capacity, head.memory.max_new_per_component) == (100, 20)
    assert {k for k in head.state_dict() if k.startswith("projection.")} == {"projection.weight", "projection.bias"}
    # The query-level keys decide.
    cfg = _cfg(GMM_CONFIG, "MODEL.GMM.QUERY.MEMORY_INIT", "random",
               "MODEL.GMM.QUERY.BOOTSTRAP_EMPTY_CLASSES", "False", "MODEL.GMM.QUERY.MEMORY_SIZE", "6",
               "MODEL.GMM.QUERY.MAX_SAMPLES_PER_COMPONENT", "2")
    head = _query_head(cfg)
    assert (head.memory_init, head.bootstrap_empty_classes, head.embedding) == ("random", False, "linear")
    assert (head.memory.capacity, head.memory.max_new_per_component) == (6, 2)
    assert (head.memory.count == head.memory.capacity).all() and head.memory.pending.all()
    head = _query_head(_cfg(GMM_CONFIG, "MODEL.GMM.QUERY.EMBEDDING", "conv_bn_relu"))
    assert head.embedding == "conv_bn_relu"
    # MEMORY_SAMPLES "correct": the per-pixel rule (E-step by MODEL.GMM.E_STEP_SAMPLES,
    # only correctly classified queries stored).
    for estep in ("all", "correct"):
        head = _query_head(_cfg(GMM_CONFIG, "MODEL.GMM.QUERY.MEMORY_SAMPLES", "correct",
                                "MODEL.GMM.E_STEP_SAMPLES", estep))
        assert (head.estep_samples, head.memory_samples) == (estep, "correct")
    head = _query_head(_cfg(GMM_CONFIG, "MODEL.GMM.E_STEP_SAMPLES", "correct"))  # "labelled" overrides it
    assert (head.estep_samples, head.memory_samples) == ("all", "all")
    # Built from explicit arguments, the same defaults ("labelled" included).
    toy = _toy_classifier()
    assert (toy.embedding, toy.memory_init, toy.bootstrap_empty_classes) == ("linear", "empty", True)
    assert (toy.estep_samples, toy.memory_samples, toy.ignore_value) == ("all", "all", QUERY_IGNORE_LABEL)
    assert _toy_classifier(embedding="conv_bn_relu").embedding == "conv_bn_relu"
    assert GMMClassifier(in_channels=HIDDEN, num_classes=C + 1, level="query").memory.capacity == 5000


def test_without_deep_supervision_only_the_final_component_loss():
    cfg = _cfg(GMM_CONFIG, "MODEL.MASK_FORMER.DEEP_SUPERVISION", "False")
    criterion = _build(cfg).criterion
    assert not criterion.aux_classifier_losses
    assert "loss_gmm_component" in criterion.weight_dict and "loss_gmm_component_0" not in criterion.weight_dict
    # "all" layers: one update with every layer's queries, one loss, even with deep supervision.
    criterion = _build(_cfg(GMM_CONFIG, "MODEL.CLASSIFIER.QUERY.UPDATE_LAYERS", "all")).criterion
    assert criterion.update_layers == "all" and not criterion.aux_classifier_losses
    assert "loss_gmm_component" in criterion.weight_dict and "loss_gmm_component_0" not in criterion.weight_dict
    assert "loss_ce_0" in criterion.weight_dict


# ----------------------------------------------------------------------------- query-level EM


C, M, D, HIDDEN, Q = 3, 5, 8, 16, 4


class FixedMatcher(nn.Module):
    """Returns the same matching for every layer."""

    def __init__(self, indices):
        super().__init__()
        self.indices = indices
        self.calls = 0

    def forward(self, outputs, targets):
        self.calls += 1
        return [(torch.as_tensor(s, dtype=torch.int64), torch.as_tensor(t, dtype=torch.int64))
                for s, t in self.indices]


def _toy_classifier(**kwargs):
    torch.manual_seed(0)
    return GMMClassifier(
        level="query", in_channels=HIDDEN, num_classes=C + 1, embed_dim=D, num_components=M, memory_size=16,
        **{"memory_kind": "ring", **kwargs})  # tests read the stored queries


def _toy_criterion(indices, **kwargs):
    weight_dict = {"loss_ce": 1.0, "loss_mask": 1.0, "loss_dice": 1.0, "loss_gmm_component": 1.0,
                   "loss_gmm_component_0": 1.0}
    return SetCriterion(
        num_classes=C, matcher=FixedMatcher(indices), weight_dict=weight_dict, eos_coef=0.1,
        losses=["labels", "masks"], num_points=16, oversample_ratio=3.0, importance_sample_ratio=0.75,
        classifier_loss_names=GMMClassifier.loss_names, **kwargs)


# Image 0: targets of classes (2, 0) matched to queries (3, 1); image 1: class 2 matched to query 0.
INDICES = [([3, 1], [0, 1]), ([0], [0])]
TARGETS = [
    {"labels": torch.tensor([2, 0]), "masks": torch.ones(2, 8, 8)},
    {"labels": torch.tensor([2]), "masks": torch.ones(1, 8, 8)},
]
# Query -> EM class with every unmatched query given to "no object" (C).
EXPECTED_LABELS = torch.tensor([[C, 0, C, 2], [2, C, C, C]])


def _predictions(classifier, queries):
    output = classifier(queries)
    return {"pred_logits": output.class_logits, "pred_masks": torch.randn(2, Q, 8, 8), "pred_classifier": output}


def _make_every_query_correct(classifier, queries):
    """Put one component of each query's EM class exactly on its embedding, with sharp stds."""
    with torch.no_grad():
        embeddings = classifier.embed(queries)
        used = [0] * (C + 1)
        for b in range(2):
            for q in range(Q):
                c = int(EXPECTED_LABELS[b, q])
                classifier.means[c, used[c]] = embeddings[b, q]
                used[c] += 1
        classifier.stds.fill_(0.05)


def _check_memory_holds_the_final_layers_labelled_queries(classifier, outputs):
    memory = classifier.memory
    # Per class: class 0 one query, class 1 none, class 2 two, no object the five unmatched ones.
    assert memory.count.sum(dim=1).tolist() == [1, 0, 2, 5]
    assert int(classifier.iteration) == 1
    # The stored features are exactly the final layer's embeddings of those queries.
    embeddings = outputs["pred_classifier"].details.embeddings.detach()
    for c in (0, 2, 3):
        stored = torch.cat([memory.features[c, m, : memory.count[c, m]] for m in range(M)])
        expected = embeddings[EXPECTED_LABELS == c]
        assert stored.shape == expected.shape
        # Same rows in any order: every expected row has an exact match.
        distances = torch.cdist(expected, stored)
        assert torch.all(distances.min(dim=1).values < 1e-6), c
        assert torch.all(distances.min(dim=0).values < 1e-6), c


def test_matched_queries_land_in_their_class_memory_whether_classified_correctly_or_not():
    """The query head's default (MEMORY_SAMPLES "labelled"): every labelled query is stored."""
    classifier = _toy_classifier()
    assert (classifier.estep_samples, classifier.memory_samples) == ("all", "all")
    criterion = _toy_criterion(INDICES, no_object_ratio=-1.0)
    outputs = _predictions(classifier, torch.randn(2, Q, HIDDEN))
    assert not torch.equal(outputs["pred_logits"].argmax(-1), EXPECTED_LABELS)  # a fresh GMM errs
    outputs["aux_outputs"] = [_predictions(classifier, torch.randn(2, Q, HIDDEN))]
    with pytest.raises(ValueError, match="need the classifier"):
        criterion(outputs, TARGETS)
    losses = criterion(outputs, TARGETS, classifier)
    assert {"loss_gmm_component", "loss_gmm_component_0"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    # The unmatched queries' features went to the "no object" mixture (class C).
    _check_memory_holds_the_final_layers_labelled_queries(classifier, outputs)


def test_in_correct_mode_only_correctly_classified_queries_are_stored():
    # M-step at step 0 only; the per-pixel storage rule (MEMORY_SAMPLES "correct").
    classifier = _toy_classifier(update_interval=1000, memory_samples="correct")
    criterion = _toy_criterion(INDICES, no_object_ratio=-1.0)
    final_queries = torch.randn(2, Q, HIDDEN)
    _make_every_query_correct(classifier, final_queries)
    outputs = _predictions(classifier, final_queries)
    assert torch.equal(outputs["pred_logits"].argmax(-1), EXPECTED_LABELS)  # all correctly classified
    outputs["aux_outputs"] = [_predictions(classifier, torch.randn(2, Q, HIDDEN))]

    criterion(outputs, TARGETS, classifier)
    _check_memory_holds_the_final_layers_labelled_queries(classifier, outputs)
    # Sinkhorn spreads the queries of a class over distinct components, here
    # the ones their embedding sits on.
    assert classifier.memory.count.max() == 1

    # A misclassified query is left out of the memory (once its class has a
    # memory: the bootstrap of empty classes is off here).
    classifier = _toy_classifier(update_interval=1000, memory_samples="correct", bootstrap_empty_classes=False)
    criterion = _toy_criterion(INDICES, no_object_ratio=-1.0)
    _make_every_query_correct(classifier, final_queries)
    with torch.no_grad():
        classifier.means[0] = -classifier.means[0]  # class 0's only query (image 0, query 1) now errs
    outputs = _predictions(classifier, final_queries)
    outputs["aux_outputs"] = []
    assert outputs["pred_logits"].argmax(-1)[0, 1] != 0
    criterion(outputs, TARGETS, classifier)
    assert classifier.memory.count.sum(dim=1).tolist() == [0, 0, 2, 5]


def test_all_layers_mode_feeds_every_layer_in_one_update():
    classifier = _toy_classifier(memory_samples="correct")
    criterion = _toy_criterion(INDICES, no_object_ratio=-1.0, update_layers="all")
    queries = torch.randn(2, Q, HIDDEN)
    _make_every_query_correct(classifier, queries)
    outputs = _predictions(classifier, queries)
    outputs["aux_outputs"] = [_predictions(classifier, queries)]  # same queries: all correct again
    losses = criterion(outputs, TARGETS, classifier)
    assert "loss_gmm_component" in losses and "loss_gmm_component_0" not in losses
    assert classifier.memory.count.sum(dim=1).tolist() == [2, 0, 4, 10]
    assert int(classifier.iteration) == 1


def test_same_number_of_em_calls_whatever_the_matches(monkeypatch):
    """Every state update all-gathers: ranks must call the classifier equally often, with or without targets."""
    classifier = _toy_classifier()
    calls = []
    original_losses, original_em_step = classifier.losses, classifier.em_step

    def counting_losses(outputs, labels, *, update):
        calls.append((update, int((labels != QUERY_IGNORE_LABEL).sum())))
        return original_losses(outputs, labels, update=update)

    em_updates = []

    def counting_em_step(outputs, labels, *, update=True):
        em_updates.append(update)
        return original_em_step(outputs, labels, update=update)

    monkeypatch.setattr(classifier, "losses", counting_losses)
    monkeypatch.setattr(classifier, "em_step", counting_em_step)
    queries = torch.randn(2, Q, HIDDEN)

    def run(indices, targets):
        calls.clear()
        em_updates.clear()
        outputs = _predictions(classifier, queries)
        outputs["aux_outputs"] = [_predictions(classifier, queries)]
        losses = _toy_criterion(indices)(outputs, targets, classifier)
        assert all(torch.isfinite(v) for v in losses.values())
        assert em_updates == [u for u, _ in calls]  # one EM step per classifier call
        return list(calls)

    with_targets = run(INDICES, TARGETS)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8)}] * 2
    without_targets = run([([], []), ([], [])], empty)
    assert [u for u, _ in with_targets] == [u for u, _ in without_targets] == [True, False]
    # Without targets each image still gives one query to "no object".
    assert [n for _, n in without_targets] == [2, 2]
    assert [n for _, n in with_targets] == [3 + 3, 3 + 3]


def test_no_object_subsample_size_and_reproducibility():
    targets = [{"labels": torch.tensor([2, 0])}, {"labels": torch.tensor([2])}]
    indices = [(torch.tensor([3, 1]), torch.tensor([0, 1])), (torch.tensor([0]), torch.tensor([0]))]

    def labels(ratio, num_queries=10, seed=0):
        torch.manual_seed(seed)
        return query_class_labels(indices, targets, num_queries, C, ratio)

    one = labels(1.0)
    assert one[0, 3] == 2 and one[0, 1] == 0 and one[1, 0] == 2
    assert ((one == C).sum(dim=1)).tolist() == [2, 1]
    assert ((one == QUERY_IGNORE_LABEL).sum(dim=1)).tolist() == [6, 8]
    assert torch.equal(one, labels(1.0))  # same seed, same subset
    assert not torch.equal(one, labels(1.0, seed=1)) or not torch.equal(one, labels(1.0, seed=2))
    assert ((labels(2.5) == C).sum(dim=1)).tolist() == [5, 3]  # ceil(2.5 x matched)
    assert ((labels(0.0) == C).sum(dim=1)).tolist() == [1, 1]  # at least one per image
    assert ((labels(-1.0) == C).sum(dim=1)).tolist() == [8, 9]  # all unmatched
    assert ((labels(100.0, num_queries=4) == C).sum(dim=1)).tolist() == [2, 3]  # at most all


# ----------------------------------------------------------------------------- checkpoint initialisation


def test_official_softmax_checkpoint_loads_all_but_the_class_head(tmp_path, caplog):
    from detectron2.checkpoint import DetectionCheckpointer

    softmax = _build(_cfg(SOFTMAX_CONFIG), seed=1)
    # The model-zoo format: {"model": {name: ndarray}, "__author__": ...}.
    release = {"model": {k: v.numpy() for k, v in softmax.state_dict().items()}, "__author__": "Mask2Former"}
    path = str(tmp_path / "model_final.pkl")
    with open(path, "wb") as f:
        pickle.dump(release, f)

    model = _build(_cfg(GMM_CONFIG), seed=2)
    head = model.sem_seg_head.predictor.class_embed
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    checkpointer = DetectionCheckpointer(model)
    checkpointer._parsed_url_during_load = None
    with caplog.at_level(logging.WARNING, logger="gmmseg_d2.modeling.classifiers.gmm"):
        incompatible = checkpointer._load_model(checkpointer._load_file(path))

    skipped = ["sem_seg_head.predictor.class_embed.weight", "sem_seg_head.predictor.class_embed.bias"]
    assert head.skipped_checkpoint_keys == skipped
    assert "skipped its linear class head" in caplog.text and all(k in caplog.text for k in skipped)
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    gmm_keys = sorted(k for k in model.state_dict() if k.startswith("sem_seg_head.predictor.class_embed."))
    assert sorted(incompatible.missing_keys) == gmm_keys
    assert {k.rsplit(".", 1)[0] for k in gmm_keys} >= {
        "sem_seg_head.predictor.class_embed.projection", "sem_seg_head.predictor.class_embed.memory"}
    source = softmax.state_dict()
    for name, value in model.state_dict().items():
        if name in gmm_keys:
            assert torch.equal(value, fresh[name]), name  # the GMM starts fresh
        else:
            assert torch.equal(value, source[name]), name
    assert set(source) - set(model.state_dict()) == set(skipped)

    # The same through MODEL.WEIGHTS and DetectionCheckpointer.load, then a
    # GMM checkpoint of our own reloads completely (nothing skipped).
    DetectionCheckpointer(model).load(path)
    assert head.skipped_checkpoint_keys == skipped
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("gmm")
    reloaded = _build(_cfg(GMM_CONFIG), seed=3)
    reloader = DetectionCheckpointer(reloaded)
    reloader._parsed_url_during_load = None
    incompatible = reloader._load_model(torch.load(str(tmp_path / "gmm.pth"), weights_only=False))
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    assert reloaded.sem_seg_head.predictor.class_embed.skipped_checkpoint_keys == []


# ----------------------------------------------------------------------------- training


def test_training_steps_on_mosaic_reduce_the_loss_and_fill_the_memories(small_mosaic_root, one_torch_thread):
    cfg = _cfg(GMM_CONFIG, *SMALL)
    np.random.seed(0)
    model = _build(cfg).train()
    head = model.sem_seg_head.predictor.class_embed
    batches = mosaic_batches(cfg)
    present = {c for batch in batches for r in batch for c in r["instances"].gt_classes.tolist()}

    def check(losses):
        assert all(torch.isfinite(v) for v in losses.values())

    passes = mean_loss_per_pass(model, batches, check_losses=check)  # 20 steps
    assert passes[-1] < 0.75 * passes[0], passes
    assert int(head.iteration) == 20
    per_class = head.memory.count.sum(dim=1)
    # Every class seen and "no object" have features, the absent classes none.
    assert per_class[-1] > 0, per_class
    assert all((per_class[c] > 0) == (c in present) for c in range(8)), (per_class, present)
    assert torch.isfinite(head.means).all() and torch.isfinite(head.stds).all()


# ----------------------------------------------------------------------------- inference and anomaly


def test_semantic_inference_and_density_anomaly_from_raw_predictions(one_torch_thread):
    model = _build(_cfg(GMM_CONFIG)).eval()
    image = torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        outputs = {}
        for method in MASK_DENSITY_ANOMALY_SCORES + ("msp",):
            model.anomaly_score_method = method
            (outputs[method],) = model([{"image": image, "height": 64, "width": 96}])
        images = model.preprocess_image([{"image": image}])
        predictions = model.sem_seg_head(model.backbone(images.tensor))
    for output in outputs.values():
        assert output["sem_seg"].shape == (8, 64, 96) and output["anomaly_score"].shape == (64, 96)
        assert torch.isfinite(output["anomaly_score"]).all()
    masks = F.interpolate(predictions["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear",
                          align_corners=False)[0, :, :64, :96].sigmoid()
    logits = predictions["pred_logits"][0]
    semantic = torch.einsum("qc,qhw->chw", logits.softmax(-1)[:, :-1], masks)
    torch.testing.assert_close(outputs["density_mask_avg"]["sem_seg"], semantic)
    # Closed form of density_mask_avg from the raw per-query densities.
    density = -predictions["pred_classifier"].details.class_log_likelihood[0, :, :8].amax(-1)  # (Q,)
    # What the meta-architecture reads through the seam.
    torch.testing.assert_close(model.query_anomaly_score(predictions)[0], density)
    weight = (1 - logits.softmax(-1)[:, -1])[:, None, None] * masks
    eps = DENSITY_AVG_FALLBACK_WEIGHT
    expected = ((weight * density[:, None, None]).sum(0) + eps * density.max()) / (weight.sum(0) + eps)
    torch.testing.assert_close(outputs["density_mask_avg"]["anomaly_score"], expected, rtol=1e-5, atol=1e-4)
    assert not torch.equal(outputs["density_min"]["anomaly_score"], outputs["msp"]["anomaly_score"])


def test_density_rules_on_a_hand_made_case():
    # Three queries on a 1x3 image; query 2 is "no object" (objectness ~0).
    big = 20.0
    class_logits = torch.tensor([[0.0, 0.0, -big], [0.0, 0.0, -big], [-big, -big, big]])
    objectness = 1 - class_logits.softmax(-1)[:, -1]
    density = torch.tensor([1.0, 5.0, 9.0])
    # Pixel 0: queries 0 and 1 cover it fully; pixel 1: only query 1 at 0.6;
    # pixel 2: only the no-object query.
    masks = torch.tensor([[[1.0, 0.0, 0.0]], [[1.0, 0.6, 0.0]], [[0.0, 0.0, 1.0]]])
    avg = mask_density_anomaly_score(class_logits, density, masks, "density_mask_avg")
    w = objectness[:, None, None] * masks
    eps = DENSITY_AVG_FALLBACK_WEIGHT
    expected = ((w * density[:, None, None]).sum(0) + eps * 9.0) / (w.sum(0) + eps)
    torch.testing.assert_close(avg, expected)
    assert avg[0, 0].item() == pytest.approx(3.0, abs=1e-3)
    assert avg[0, 1].item() == pytest.approx(5.0, abs=1e-3)
    assert avg[0, 2].item() == pytest.approx(9.0, abs=1e-3)  # uncovered: the most anomalous query
    low = mask_density_anomaly_score(class_logits, density, masks, "density_min")
    high = mask_density_anomaly_score(class_logits, density, masks, "density_max")
    assert low.tolist() == [[1.0, 5.0, 9.0]]
    assert high.tolist() == [[5.0, 5.0, 9.0]]
    with pytest.raises(ValueError, match="density_mask_avg"):
        mask_density_anomaly_score(class_logits, density, masks, "density")
