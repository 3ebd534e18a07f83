"""The classifier seam (gmmseg_d2.modeling.classifiers) seen from outside the package.

* The config keys the seam replaced fail to merge, from the command line and
  from a YAML file, with a message naming their successor.
* A classifier defined and registered here (cosine similarity to one learnable
  prototype per class, with a loss of its own) plugs into FCN, DeepLabV3+ and
  Mask2Former built from the mosaic configs with only ``MODEL.CLASSIFIER.NAME``
  changed: it trains (its loss in the loss dict, ``_{i}`` for Mask2Former's
  auxiliary layers, one state update per step) and its anomaly score is the
  one inference returns.
* An unknown name lists the registered ones; ``"prototype"`` points to
  ``projects/ProtoSeg``.
"""
import math
import os
import re
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
import yaml
from einops import rearrange
from torch import Tensor, nn

from gmmseg_d2.config import _RENAMED_CLASSIFIER_KEYS, add_gmmseg_config, add_maskformer2_config
from gmmseg_d2.modeling.anomaly import DENSITY_AVG_FALLBACK_WEIGHT, softmax_anomaly_score
from gmmseg_d2.modeling.classifiers import (
    CLASSIFIER_REGISTRY, QUERY_IGNORE_LABEL, ClassifierOutput, SegmentationClassifier, check_level,
)
from tests.conftest import REPO_ROOT

MOSAIC = os.path.join(REPO_ROOT, "configs", "mosaic")
FCN_CONFIG = os.path.join(MOSAIC, "fcn_R18_softmax.yaml")
DEEPLAB_CONFIG = os.path.join(MOSAIC, "deeplabv3plus_R18_softmax.yaml")
# The GMM Mask2Former config: its anomaly rule (density_mask_avg) reads the
# classifier's per-query score, which the softmax config's "msp" would not.
MASK2FORMER_CONFIG = os.path.join(MOSAIC, "maskformer2_R18_gmm.yaml")

#: Registry name of the test classifier: unique, removed again after each test.
COSINE = "test_seam_cosine_prototypes"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(path, *opts, add_config=add_gmmseg_config):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def _build(cfg, seed=0):
    from detectron2.modeling import build_model

    torch.manual_seed(seed)
    return build_model(cfg)


# ----------------------------------------------------------------------------- renamed keys

#: A value of each former key's type (the former defaults).
FORMER_VALUES = {
    "MODEL.SEM_SEG_HEAD.CLASSIFIER": "gmm",
    "MODEL.MASK_FORMER.CLASSIFIER": "gmm",
    "MODEL.MASK_FORMER.GMM_MEMORY_SIZE": 5000,
    "MODEL.MASK_FORMER.GMM_MEMORY_SAMPLES": "labelled",
    "MODEL.MASK_FORMER.GMM_MEMORY_INIT": "empty",
    "MODEL.MASK_FORMER.GMM_BOOTSTRAP_EMPTY_CLASSES": True,
    "MODEL.MASK_FORMER.GMM_MEMORY_LAYERS": "last",
    "MODEL.MASK_FORMER.GMM_NO_OBJECT_RATIO": 1.0,
}
RENAMED = sorted(_RENAMED_CLASSIFIER_KEYS.items())


def _nested(full_key: str, value) -> dict:
    """``"A.B.C", v`` -> ``{"A": {"B": {"C": v}}}`` (a YAML file's layout)."""
    node = value
    for part in reversed(full_key.split(".")):
        node = {part: node}
    return node


def _lookup(cfg, full_key: str):
    node = cfg
    for part in full_key.split("."):
        node = node[part]
    return node


def test_every_former_key_is_renamed_to_an_existing_key():
    assert set(_RENAMED_CLASSIFIER_KEYS) == set(FORMER_VALUES)
    cfg = _cfg(FCN_CONFIG)
    for old_key, new_key in RENAMED:
        assert cfg.key_is_renamed(old_key), old_key
        _lookup(cfg, new_key)  # the successor exists (KeyError otherwise)
        with pytest.raises(KeyError):
            _lookup(cfg, old_key)
    # add_gmmseg_config twice on one config (add_maskformer2_config then add_gmmseg_config) registers once.
    add_gmmseg_config(cfg)
    assert cfg.key_is_renamed("MODEL.MASK_FORMER.CLASSIFIER")


@pytest.mark.parametrize("add_config", [add_gmmseg_config, add_maskformer2_config], ids=lambda f: f.__name__)
@pytest.mark.parametrize("old_key, new_key", RENAMED, ids=[old for old, _ in RENAMED])
def test_former_key_fails_to_merge_naming_the_new_one(old_key, new_key, add_config, tmp_path):
    message = re.escape(f"{old_key} was renamed to {new_key}")
    with pytest.raises(KeyError, match=message):
        _cfg(FCN_CONFIG, old_key, str(FORMER_VALUES[old_key]), add_config=add_config)
    # A YAML file written before the seam, on top of a shipped config.
    path = tmp_path / "former.yaml"
    path.write_text(yaml.safe_dump({"_BASE_": MASK2FORMER_CONFIG, **_nested(old_key, FORMER_VALUES[old_key])}))
    with pytest.raises(KeyError, match=message):
        _cfg(str(path), add_config=add_config)


def test_former_key_fails_through_the_training_script_setup(tmp_path):
    from gmmseg_d2.engine import setup_cfg

    class Args:
        config_file = str(tmp_path / "former.yaml")
        opts = []

    with open(Args.config_file, "w") as f:
        yaml.safe_dump({"_BASE_": MASK2FORMER_CONFIG, **_nested("MODEL.MASK_FORMER.GMM_MEMORY_LAYERS", "all")}, f)
    with pytest.raises(KeyError, match=re.escape("renamed to MODEL.CLASSIFIER.QUERY.UPDATE_LAYERS")):
        setup_cfg(Args(), default_setup_logging=False)


# ----------------------------------------------------------------------------- a classifier from outside


@dataclass
class CosineDetails:
    #: ``(N, H, W, K)`` (pixel level) or ``(B, Q, K)`` (query level): cosine of
    #: each feature with each class's prototype, channels last.
    cosine: Tensor


class CosinePrototypeClassifier(SegmentationClassifier):
    """One learnable prototype per class; logits ``SCALE x cos(feature, prototype)``.

    Own loss ``loss_cosine_pull``: the mean of ``1 - cos`` to the label's
    prototype over the labelled features. Its "state": ``updates`` counts the
    calls with ``update=True``. Anomaly score: ``-max_c cos`` (at query level
    over the real classes). Every ``losses`` call is recorded in ``calls`` as
    ``(update, labels, cosine)``.
    """

    loss_names = ("loss_cosine_pull",)
    SCALE = 10.0

    def __init__(self, in_channels: int, num_classes: int, *, level: str, ignore_value: int) -> None:
        super().__init__()
        check_level(level)
        self.level, self.ignore_value = level, ignore_value
        self.prototypes = nn.Parameter(torch.randn(num_classes, in_channels))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.calls = []
        self.last_output: Optional[ClassifierOutput] = None

    @classmethod
    def from_config(cls, cfg, *, in_channels: int, num_classes: int, level: str, ignore_value: int) -> dict:
        return {"in_channels": in_channels, "num_classes": num_classes, "level": level, "ignore_value": ignore_value}

    def forward(self, features: Tensor) -> ClassifierOutput:
        channels_last = rearrange(features, "n d h w -> n h w d") if self.level == "pixel" else features
        cosine = F.normalize(channels_last, dim=-1) @ F.normalize(self.prototypes, dim=-1).T
        logits = self.SCALE * cosine
        if self.level == "pixel":
            logits = rearrange(logits, "n h w k -> n k h w")
        self.last_output = ClassifierOutput(logits, CosineDetails(cosine))
        return self.last_output

    def losses(self, outputs: ClassifierOutput, labels: Tensor, *, update: bool):
        cosine = outputs.details.cosine
        self.calls.append((update, labels.detach().clone(), cosine.detach().clone()))
        valid = labels != self.ignore_value
        pulled = cosine[valid].gather(1, labels[valid][:, None])
        loss = (1 - pulled).mean() if pulled.numel() else cosine.sum() * 0
        if update:
            self.updates += 1
        return {"loss_cosine_pull": loss}

    def anomaly_score(self, outputs: ClassifierOutput, output_size: Optional[Tuple[int, int]] = None) -> Tensor:
        cosine = outputs.details.cosine
        if self.level == "query":
            return -cosine[..., :-1].amax(dim=-1)
        score = -cosine.amax(dim=-1)
        if output_size is not None and tuple(score.shape[-2:]) != tuple(output_size):
            score = F.interpolate(score[:, None], size=output_size, mode="bilinear", align_corners=False)[:, 0]
        return score


@pytest.fixture
def cosine_classifier():
    """``COSINE`` registered for one test, removed afterwards."""
    assert COSINE not in CLASSIFIER_REGISTRY
    CLASSIFIER_REGISTRY.register(COSINE)(CosinePrototypeClassifier)
    try:
        yield CosinePrototypeClassifier
    finally:
        CLASSIFIER_REGISTRY._obj_map.pop(COSINE, None)


def _pull_loss(labels: Tensor, cosine: Tensor, ignore_value: int) -> Tensor:
    """Closed form of ``loss_cosine_pull``: mean over labelled features of 1 - cos(label)."""
    valid = labels != ignore_value
    rows = cosine[valid]
    return (1 - rows[torch.arange(rows.shape[0]), labels[valid]]).mean()


def _train_one_step(model, inputs, classifier):
    losses = model(inputs)
    # The own loss reaches the prototypes by itself (it is part of the graph).
    (own_grad,) = torch.autograd.grad(losses["loss_cosine_pull"], classifier.prototypes, retain_graph=True)
    assert own_grad.abs().sum() > 0
    before = classifier.prototypes.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    assert not torch.equal(classifier.prototypes.detach(), before)
    return losses


@pytest.mark.parametrize("path", [FCN_CONFIG, DEEPLAB_CONFIG], ids=["fcn", "deeplabv3plus"])
def test_registered_classifier_trains_and_scores_in_a_per_pixel_head(cosine_classifier, path):
    model = _build(_cfg(path, "MODEL.CLASSIFIER.NAME", COSINE)).train()
    classifier = model.sem_seg_head.predictor
    assert type(classifier) is cosine_classifier and classifier.level == "pixel"
    assert classifier.ignore_value == 255 and classifier.prototypes.shape[0] == 8

    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 8, (2, 64, 64), generator=generator)
    targets[0, :16] = 255
    inputs = [{"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8, generator=generator),
               "sem_seg": targets[i]} for i in range(2)]
    losses = _train_one_step(model, inputs, classifier)
    assert set(losses) == {"loss_sem_seg", "loss_cosine_pull"}
    # One call, with the state update, on the labels under the feature centres.
    assert [update for update, _, _ in classifier.calls] == [True] and int(classifier.updates) == 1
    _, labels, cosine = classifier.calls[0]
    stride = 64 // cosine.shape[1]
    assert stride in (4, 8) and cosine.shape[1:] == (64 // stride, 64 // stride, 8)
    assert torch.equal(labels, targets[:, ::stride, ::stride])
    torch.testing.assert_close(losses["loss_cosine_pull"], _pull_loss(labels, cosine, 255))

    model.eval()
    with torch.no_grad():
        (output,) = model([{"image": inputs[0]["image"][:, :, :48]}])  # 64 x 48
    assert len(classifier.calls) == 1  # inference takes no loss and no update
    cosine = classifier.last_output.details.cosine[0]  # (h, w, K)
    expected = F.interpolate(-cosine.amax(dim=-1)[None, None], scale_factor=stride, mode="bilinear",
                             align_corners=False)[0, 0]
    assert output["anomaly_score"].shape == expected.shape == (64, 48)
    torch.testing.assert_close(output["anomaly_score"], expected)
    assert output["anomaly_score"].abs().max() <= 1 + 1e-5  # a cosine, not a softmax score
    assert not torch.allclose(output["anomaly_score"], softmax_anomaly_score(output["sem_seg"], "msp", dim=0))


def test_registered_classifier_trains_and_scores_in_mask2former(cosine_classifier):
    from tests.test_gmm_mask_former import _toy_batch

    cfg = _cfg(MASK2FORMER_CONFIG, "MODEL.CLASSIFIER.NAME", COSINE, "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256")
    model = _build(cfg).train()
    classifier = model.sem_seg_head.classifier
    assert classifier is model.sem_seg_head.predictor.class_embed
    assert type(classifier) is cosine_classifier and classifier.level == "query"
    assert classifier.ignore_value == QUERY_IGNORE_LABEL and classifier.prototypes.shape == (9, 64)
    assert model.criterion.classifier_loss_names == ("loss_cosine_pull",)
    suffixes = ("", "_0", "_1", "_2")
    assert all(model.criterion.weight_dict[f"loss_cosine_pull{s}"] == 1.0 for s in suffixes)

    batch = _toy_batch()  # image 0: classes {1, 3}; image 1: {5}
    losses = _train_one_step(model, batch, classifier)
    assert set(losses) == {f"loss_{k}{s}" for k in ("ce", "mask", "dice", "cosine_pull") for s in suffixes}
    # The final layer with the update, then the three auxiliary layers without.
    assert [update for update, _, _ in classifier.calls] == [True, False, False, False]
    assert int(classifier.updates) == 1
    for (_, labels, cosine), suffix in zip(classifier.calls, suffixes):
        assert labels.shape == (2, 16) and cosine.shape == (2, 16, 9)
        # Every target matched once; as many unmatched queries "no object" (8) as matched (ratio 1).
        for image, classes in enumerate(({1, 3}, {5})):
            row = labels[image]
            assert sorted(row[(row >= 0) & (row < 8)].tolist()) == sorted(classes)
            assert int((row == 8).sum()) == math.ceil(1.0 * len(classes))
            assert int((row == QUERY_IGNORE_LABEL).sum()) == 16 - 2 * len(classes)
        torch.testing.assert_close(losses[f"loss_cosine_pull{suffix}"],
                                   _pull_loss(labels, cosine, QUERY_IGNORE_LABEL))

    model.eval()
    assert model.anomaly_score_method == "density_mask_avg"
    image = batch[0]["image"][:, :, :48]
    with torch.no_grad():
        (output,) = model([{"image": image, "height": 64, "width": 48}])
        images = model.preprocess_image([{"image": image}])
        predictions = model.sem_seg_head(model.backbone(images.tensor))
    assert len(classifier.calls) == 4  # inference takes no loss and no update
    # The per-query score the meta-architecture reads is the classifier's: -max_c cos over the 8 classes.
    density = -predictions["pred_classifier"].details.cosine[0, :, :8].amax(dim=-1)
    torch.testing.assert_close(model.query_anomaly_score(predictions)[0], density)
    # density_mask_avg from it, in closed form.
    masks = F.interpolate(predictions["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear",
                          align_corners=False)[0, :, :64, :48].sigmoid()
    weight = (1 - predictions["pred_logits"][0].softmax(-1)[:, -1])[:, None, None] * masks
    eps = DENSITY_AVG_FALLBACK_WEIGHT
    expected = ((weight * density[:, None, None]).sum(0) + eps * density.max()) / (weight.sum(0) + eps)
    assert output["anomaly_score"].shape == (64, 48)
    torch.testing.assert_close(output["anomaly_score"], expected, rtol=1e-5, atol=1e-5)


def test_registered_classifier_is_gone_after_the_test():
    # The fixture's teardown: later tests (and other files) see the registry as it was.
    assert COSINE not in CLASSIFIER_REGISTRY


# ----------------------------------------------------------------------------- unknown names


@pytest.mark.parametrize("path", [FCN_CONFIG, DEEPLAB_CONFIG, MASK2FORMER_CONFIG],
                         ids=["fcn", "deeplabv3plus", "mask2former"])
def test_unknown_name_lists_the_registered_classifiers(path):
    with pytest.raises(KeyError) as error:
        _build(_cfg(path, "MODEL.CLASSIFIER.NAME", "cosine"))
    message = str(error.value)
    assert "Unknown MODEL.CLASSIFIER.NAME 'cosine'" in message
    registered = sorted(name for name, _ in CLASSIFIER_REGISTRY)
    assert f"registered classifiers: {registered}" in message and "'gmm'" in message and "'softmax'" in message
    assert "projects/ProtoSeg" not in message  # no project registers "cosine"


@pytest.mark.parametrize("path", [FCN_CONFIG, MASK2FORMER_CONFIG], ids=["fcn", "mask2former"])
def test_unregistered_prototype_points_to_the_protoseg_script(path, monkeypatch):
    # tests/projects imports protoseg, which registers "prototype", possibly in
    # this very process: take it out for this test (monkeypatch puts it back).
    monkeypatch.delitem(CLASSIFIER_REGISTRY._obj_map, "prototype", raising=False)
    with pytest.raises(KeyError) as error:
        _build(_cfg(path, "MODEL.CLASSIFIER.NAME", "prototype"))
    message = str(error.value)
    assert "Unknown MODEL.CLASSIFIER.NAME 'prototype'" in message
    assert "projects/ProtoSeg/train_net.py" in message
    assert "'prototype'" not in message.split("registered classifiers:")[1].split("]")[0]
