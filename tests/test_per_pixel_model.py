"""FCN head, softmax anomaly scores and the per-pixel segmentor."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model

from einops import rearrange

from gmmseg_d2.modeling import softmax_anomaly_score
from gmmseg_d2.modeling.classifiers import ClassifierOutput, GMMClassifier, LinearClassifier
from gmmseg_d2.modeling.heads import FCNHead, pixel_classifier_builder
from tests.conftest import REPO_ROOT


GMM_CONFIG = os.path.join(REPO_ROOT, "configs", "mosaic", "fcn_R18_gmm.yaml")


def _head(**overrides):
    kwargs = dict(input_shape={"res5": ShapeSpec(channels=16, stride=8)}, num_classes=5,
                  in_feature="res5", conv_dims=8, num_convs=2, norm="", dropout=0.0)
    kwargs.update(overrides)
    return FCNHead(**kwargs)


def _softmax(anomaly_method="msp", num_classes=5):
    """A head's ``classifier`` builder: ``in_channels -> LinearClassifier``."""
    return lambda in_channels: LinearClassifier(in_channels, num_classes, anomaly_method=anomaly_method)


def test_softmax_anomaly_scores_match_closed_forms():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    probs = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    msp = softmax_anomaly_score(logits, "msp", dim=1)
    np.testing.assert_allclose(msp.numpy(), -probs.max(1), rtol=1e-6)
    np.testing.assert_allclose(softmax_anomaly_score(logits, "max_logit", dim=1).numpy(), [-2.0, -0.5])
    entropy = softmax_anomaly_score(logits, "entropy", dim=1).numpy()
    np.testing.assert_allclose(entropy, -(probs * np.log(probs)).sum(1), rtol=1e-6)
    # A uniform distribution has the largest entropy, log(C).
    assert entropy[1] == pytest.approx(math.log(3), rel=1e-6)
    with pytest.raises(ValueError, match="Unknown softmax anomaly score 'bogus'"):
        softmax_anomaly_score(logits, "bogus")


def test_fcn_head_training_loss_is_cross_entropy_at_target_size():
    torch.manual_seed(0)
    head = _head().train()
    features = {"res5": torch.randn(2, 16, 4, 4)}
    targets = torch.randint(0, 5, (2, 32, 32))
    targets[0, :8] = 255
    _, losses = head(features, targets)
    # Without a classifier builder: the softmax 1x1 conv, N(0, 0.01) weights and zero bias.
    assert isinstance(head.predictor, LinearClassifier) and head.predictor.level == "pixel"
    assert head.predictor.weight.shape == (5, 8, 1, 1) and not head.predictor.bias.any()
    assert set(losses) == {"loss_sem_seg"}  # the softmax classifier has no losses of its own
    with torch.no_grad():
        output = head.predictor(head.layers(features))
    assert isinstance(output, ClassifierOutput) and output.details is None
    logits = output.class_logits
    torch.testing.assert_close(logits, F.conv2d(head.layers(features), head.predictor.weight, head.predictor.bias))
    expected = F.cross_entropy(F.interpolate(logits, size=(32, 32), mode="bilinear",
                                             align_corners=False), targets, ignore_index=255)
    torch.testing.assert_close(losses["loss_sem_seg"], expected)


@pytest.mark.parametrize("method", ["msp", "max_logit", "entropy"])
def test_fcn_head_inference_outputs(method):
    head = _head(classifier=_softmax(method), concat_input=False).eval()
    with torch.no_grad():
        outputs, losses = head({"res5": torch.randn(3, 16, 4, 6)})
    assert losses == {}
    assert outputs["sem_seg"].shape == (3, 5, 32, 48)
    assert outputs["anomaly_score"].shape == (3, 32, 48)
    torch.testing.assert_close(outputs["anomaly_score"],
                               softmax_anomaly_score(outputs["sem_seg"], method, dim=1))


def test_fcn_head_rejects_unknown_names(demo_cfg):
    demo_cfg.MODEL.CLASSIFIER.NAME = "linear"
    with pytest.raises(KeyError, match=r"Unknown MODEL.CLASSIFIER.NAME .linear.; registered classifiers: .*gmm"):
        _head(classifier=pixel_classifier_builder(demo_cfg))
    demo_cfg.MODEL.CLASSIFIER.NAME = "softmax"
    demo_cfg.MODEL.SEM_SEG_HEAD.ANOMALY_SCORE = "odin"
    with pytest.raises(ValueError, match="Unknown MODEL.SEM_SEG_HEAD.ANOMALY_SCORE 'odin'"):
        _head(classifier=pixel_classifier_builder(demo_cfg))
    with pytest.raises(ValueError, match="Unknown MODEL.SEM_SEG_HEAD.ANOMALY_SCORE"):
        _head(classifier=_softmax("odin"))
    with pytest.raises(ValueError, match="not a backbone output"):
        _head(in_feature="res4")


def test_classifier_builder_reads_the_config(demo_cfg):
    """MODEL.CLASSIFIER.NAME picks the predictor, MODEL.SEM_SEG_HEAD the classes, ignore value, anomaly score."""
    demo_cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5
    demo_cfg.MODEL.SEM_SEG_HEAD.ANOMALY_SCORE = "entropy"
    head = _head(classifier=pixel_classifier_builder(demo_cfg))
    assert isinstance(head.predictor, LinearClassifier)
    assert (head.predictor.in_channels, head.predictor.num_classes, head.predictor.anomaly_method) == (8, 5, "entropy")
    demo_cfg.MODEL.CLASSIFIER.NAME = "gmm"
    demo_cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 7
    demo_cfg.MODEL.GMM.EMBED_DIM = 12
    head = _head(classifier=pixel_classifier_builder(demo_cfg))
    assert isinstance(head.predictor, GMMClassifier) and head.predictor.level == "pixel"
    assert (head.predictor.in_channels, head.predictor.num_classes, head.predictor.embed_dim,
            head.predictor.ignore_value) == (8, 5, 12, 7)
    # The per-pixel GMM keeps the per-pixel MODEL.GMM keys (the query ones are for Mask2Former).
    assert head.predictor.memory.capacity == demo_cfg.MODEL.GMM.MEMORY_SIZE


def test_segmentor_outputs_at_original_resolution(demo_cfg):
    model = build_model(demo_cfg).eval()
    inputs = [{"image": torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8), "height": 192,
               "width": 256},
              {"image": torch.randint(0, 255, (3, 100, 90), dtype=torch.uint8)}]
    with torch.no_grad():
        outputs = model(inputs)
    assert outputs[0]["sem_seg"].shape == (8, 192, 256)
    assert outputs[0]["anomaly_score"].shape == (192, 256)
    # Without height/width the input size is kept, padding cropped away.
    assert outputs[1]["sem_seg"].shape == (8, 100, 90)
    assert outputs[1]["anomaly_score"].shape == (100, 90)
    # Softmax probabilities are in (0, 1], so -MSP is in [-1, -1/C].
    scores = outputs[1]["anomaly_score"]
    assert scores.max() <= -1 / 8 + 1e-6 and scores.min() >= -1.0


def test_segmentor_training_returns_named_losses(demo_cfg):
    model = build_model(demo_cfg).train()
    inputs = [{"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8),
               "sem_seg": torch.randint(0, 8, (64, 64))} for _ in range(2)]
    losses = model(inputs)
    assert set(losses) == {"loss_sem_seg"}
    # Untrained classifier (std 0.01 init) ≈ uniform over 8 classes.
    assert losses["loss_sem_seg"].item() == pytest.approx(math.log(8), abs=0.3)


# --------------------------------------------------------------------- GMM head
def _gmm_head(embed_dim=8, **overrides):
    gmm_kwargs = dict(embed_dim=embed_dim, num_components=3, memory_size=50, update_interval=1)

    def classifier(in_channels):
        return GMMClassifier(level="pixel", in_channels=in_channels, num_classes=5, ignore_value=255, **gmm_kwargs)

    return _head(classifier=classifier, **overrides)


def test_gmm_head_shapes_and_density_anomaly_score():
    from gmmseg_d2.modeling.gmm import GaussianMixtureClassifier

    head = _gmm_head().eval()
    assert isinstance(head.predictor, GMMClassifier) and isinstance(head.predictor, GaussianMixtureClassifier)
    features = {"res5": torch.randn(2, 16, 4, 6)}
    with torch.no_grad():
        outputs, _ = head(features)
        output = head.predictor(head.layers(features))
        # The algorithm on the channels-last features, independently of the seam.
        direct = GaussianMixtureClassifier.forward(head.predictor, rearrange(head.layers(features),
                                                                             "b c h w -> b h w c"))
    assert direct.class_logits.shape == (2, 4, 6, 5)
    torch.testing.assert_close(output.details.class_log_likelihood, direct.class_log_likelihood)
    torch.testing.assert_close(output.class_logits, rearrange(direct.class_logits, "b h w k -> b k h w"))
    assert outputs["sem_seg"].shape == (2, 5, 32, 48)
    assert outputs["anomaly_score"].shape == (2, 32, 48)
    # The score is -max_c log p(x|c) at feature resolution, then upsampled.
    density_score = -direct.class_log_likelihood.amax(dim=-1)
    expected = F.interpolate(density_score[:, None], size=(32, 48), mode="bilinear",
                             align_corners=False)[:, 0]
    torch.testing.assert_close(outputs["anomaly_score"], expected)
    torch.testing.assert_close(
        outputs["sem_seg"],
        F.interpolate(rearrange(direct.class_logits, "b h w k -> b k h w"), scale_factor=8,
                      mode="bilinear", align_corners=False))


def test_gmm_head_trains_and_fills_memory():
    """On separable synthetic features, the GMM head's loss falls and its memory fills."""
    torch.manual_seed(0)
    # The defaults (official: conv -> BN -> ReLU embedding, random memory, no
    # bootstrap) at the paper's D = 64. The ReLU leaves about half of the D
    # dimensions active: at D = 8 the loss falls only 2.14 -> 1.22 in these
    # 40 steps (1.64 -> 0.72 with the linear embedding); at D = 64 1.36 -> 0.50.
    head = _gmm_head(embed_dim=64, num_convs=0, concat_input=False).train()
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    class_codes = torch.randn(5, 16) * 3
    history = []
    for step in range(40):
        targets = torch.randint(0, 5, (4, 4, 4))
        features = class_codes[targets].permute(0, 3, 1, 2) + 0.3 * torch.randn(4, 16, 4, 4)
        full_targets = targets.repeat_interleave(8, 1).repeat_interleave(8, 2)
        full_targets[:, :2] = 255
        _, losses = head({"res5": features}, full_targets)
        assert set(losses) == {"loss_sem_seg", "loss_gmm_component"}
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        history.append(losses["loss_sem_seg"].item())
    assert sum(history[-5:]) / 5 < 0.5 * history[0], history
    memory = head.predictor.memory
    assert head.predictor.memory_init == "random" and not head.predictor.bootstrap_empty_classes  # the defaults
    assert (memory.total_written > 0).all(), memory.total_written  # every class and component was fed
    assert head.predictor.iteration.item() == 40
    # Means stay on the unit sphere after the M-steps.
    torch.testing.assert_close(head.predictor.means.norm(dim=-1), torch.ones(5, 3))


def test_gmm_model_from_config_loss_names(demo_cfg):
    demo_cfg.merge_from_file(GMM_CONFIG)
    model = build_model(demo_cfg).train()
    # The default "stats" memory: K = 2000 in chunks of 20, plus the partly filled one.
    assert model.sem_seg_head.predictor.memory.chunk_sum.shape == (8, 5, 101, 64)
    inputs = [{"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8),
               "sem_seg": torch.randint(0, 8, (64, 64))} for _ in range(2)]
    losses = model(inputs)
    assert set(losses) == {"loss_sem_seg", "loss_gmm_component"}
    assert all(torch.isfinite(v) for v in losses.values())


def test_gmm_model_learns_and_fills_memory_on_mosaic_batches(demo_cfg, small_mosaic_root, one_torch_thread):
    """The full GMM model (R18 + FCN + GMM) on real mosaic batches: loss falls, memory fills by class."""
    from detectron2.data import DatasetCatalog

    from gmmseg_d2.data.dataset_mappers import PerPixelSemanticDatasetMapper

    demo_cfg.merge_from_file(GMM_CONFIG)
    demo_cfg.merge_from_list([
        "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.CROP.SIZE", "(64, 64)", "MODEL.GMM.MEMORY_SIZE", "64", "MODEL.GMM.UPDATE_INTERVAL", "2",
        "MODEL.GMM.MEMORY_KIND", "ring",  # the stored features are read below
    ])
    torch.manual_seed(0)
    np.random.seed(0)
    model = build_model(demo_cfg).train()
    mapper = PerPixelSemanticDatasetMapper(demo_cfg, is_train=True)
    records = DatasetCatalog.get("mosaic_sem_seg_train")[:12]
    batches = [[mapper(dict(r)) for r in records[i:i + 4]] for i in range(0, 12, 4)]
    labels = torch.stack([s["sem_seg"] for b in batches for s in b])
    present = set(labels.unique().tolist()) - {255}
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    passes = []
    for _ in range(6):  # six passes over three fixed batches: 18 steps, 9 M-steps
        losses_this_pass = []
        for batch in batches:
            losses = model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            losses_this_pass.append(losses["loss_sem_seg"].item())
        passes.append(sum(losses_this_pass) / len(losses_this_pass))
    assert passes[-1] < 0.9 * passes[0], passes  # measured: 2.33 -> 1.28

    classifier = model.sem_seg_head.predictor
    memory = classifier.memory
    # The config's defaults: the official random memory start, no bootstrap, conv -> BN -> ReLU embedding.
    assert (classifier.memory_init, classifier.bootstrap_empty_classes, classifier.embedding) == (
        "random", False, "conv_bn_relu")
    fed = memory.has_data().nonzero().flatten().tolist()
    # Memory is written only for classes in the labels; every class that is
    # present is classified correctly somewhere after a few passes.
    assert set(fed) <= present, (fed, present)
    assert len(fed) >= len(present) - 1, (fed, present)
    torch.testing.assert_close(memory.features.norm(dim=-1), torch.ones(memory.features.shape[:3]), atol=1e-3, rtol=0)
    # Real features fill slots 0, 1, ... of a component (the rest still hold
    # the random start) until the ring wraps.
    real = torch.arange(memory.capacity) < memory.total_written[..., None]  # (C, M, K)
    # The memory of a class holds that class's embeddings: its mean is closer
    # to the mean embedding of the class's pixels than to any other class's.
    # Batch statistics, as in the steps that wrote the memory (18 steps leave
    # BatchNorm's running averages far from them), of the same 4-image
    # batches (the embedding's own BatchNorm normalises by them); no dropout.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    with torch.no_grad():
        per_batch = []
        for batch in batches:
            images = torch.stack([s["image"] for s in batch]).float()
            images = (images - model.pixel_mean) / model.pixel_std
            feature_map = model.sem_seg_head.layers(model.backbone(images))
            per_batch.append(classifier(feature_map).details.embeddings)  # (B, h, w, D)
        embeddings = torch.cat(per_batch)
    small_labels = F.interpolate(labels[:, None].float(), size=embeddings.shape[1:3], mode="nearest")[:, 0].long()
    class_means = {c: F.normalize(embeddings[small_labels == c].mean(0), dim=0) for c in fed}
    for c in fed:
        slots = memory.features[c][real[c]]
        memory_mean = F.normalize(slots.float().mean(0), dim=0)
        similarity = {k: float(memory_mean @ v) for k, v in class_means.items()}
        assert max(similarity, key=similarity.get) == c, (c, similarity)
