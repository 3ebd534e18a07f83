"""Mask2Former meta-architecture: anomaly scores, semantic inference, head wiring, training."""
import math
import os

import numpy as np

import pytest
import torch
import torch.nn.functional as F

from gmmseg_d2.modeling.anomaly import MASK_CLASSIFICATION_ANOMALY_SCORES, mask_classification_anomaly_score
from tests.conftest import REPO_ROOT


def test_mask_classification_anomaly_scores_match_hand_computed_values():
    # Two queries, two classes (+ no object), one pixel fully covered by query
    # 0 and half by query 1, one pixel covered by nothing.
    class_logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, -1.0]])
    mask_probs = torch.tensor([[[1.0, 0.0]], [[0.5, 0.0]]])  # (Q=2, H=1, W=2)
    p0 = [math.exp(2) / (math.exp(2) + 2), 1 / (math.exp(2) + 2)]
    p1 = [1 / (1 + math.e + math.exp(-1)), math.e / (1 + math.e + math.exp(-1))]
    semantic = [p0[0] + 0.5 * p1[0], p0[1] + 0.5 * p1[1]]
    evidence = [2.0 + 0.5 * 0.0, 0.0 + 0.5 * 1.0]

    msp = mask_classification_anomaly_score(class_logits, mask_probs, "msp")
    assert msp[0, 0].item() == pytest.approx(-max(semantic), rel=1e-6)
    assert msp[0, 1].item() == 0.0
    max_logit = mask_classification_anomaly_score(class_logits, mask_probs, "max_logit")
    assert max_logit[0, 0].item() == pytest.approx(-2.0)
    entropy = mask_classification_anomaly_score(class_logits, mask_probs, "entropy")
    q = [s / sum(semantic) for s in semantic]
    assert entropy[0, 0].item() == pytest.approx(-sum(v * math.log(v) for v in q), rel=1e-6)
    rba = mask_classification_anomaly_score(class_logits, mask_probs, "rba")
    assert rba[0, 0].item() == pytest.approx(-(math.tanh(evidence[0]) + math.tanh(evidence[1])), rel=1e-6)
    # A pixel no query covers has no evidence for any class: RbA's maximum
    # among non-negative evidence, 0.
    assert rba[0, 1].item() == 0.0
    with pytest.raises(ValueError, match="rba"):
        mask_classification_anomaly_score(class_logits, mask_probs, "energy")
    assert set(MASK_CLASSIFICATION_ANOMALY_SCORES) == {"msp", "max_logit", "entropy", "rba"}


MASKFORMER_CONFIG = os.path.join(REPO_ROOT, "configs", "mosaic", "maskformer2_R18_softmax.yaml")


def _maskformer_cfg(*opts):
    from detectron2.config import get_cfg

    from gmmseg_d2.config import add_gmmseg_config

    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(MASKFORMER_CONFIG)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def test_semantic_inference_and_outputs_at_original_size():
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(_maskformer_cfg()).eval()
    image = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)
    with torch.no_grad():
        (output,) = model([{"image": image, "height": 48, "width": 64}])
        # Independent recomputation from the head's raw predictions.
        images = model.preprocess_image([{"image": image}])
        predictions = model.sem_seg_head(model.backbone(images.tensor))
    assert output["sem_seg"].shape == (8, 48, 64) and output["anomaly_score"].shape == (48, 64)
    masks = F.interpolate(predictions["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear",
                          align_corners=False)[0, :, :96, :128]
    semantic = torch.einsum("qc,qhw->chw", predictions["pred_logits"][0].softmax(-1)[:, :-1], masks.sigmoid())
    expected = F.interpolate(semantic[None], size=(48, 64), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(output["sem_seg"], expected)
    assert len(predictions["aux_outputs"]) == 3  # DEC_LAYERS 4: 3 auxiliary predictions + the final one
    assert predictions["pred_logits"].shape == (1, 16, 9)


def test_rejects_panoptic_and_instance_inference():
    from detectron2.modeling import build_model

    with pytest.raises(NotImplementedError, match="semantic segmentation only"):
        build_model(_maskformer_cfg("MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "True"))


def mosaic_batches(cfg, images=8, batch_size=4):
    """The first ``images`` mosaic training records, mapped for MaskFormer, in batches."""
    from detectron2.data import DatasetCatalog

    from gmmseg_d2.data.dataset_mappers import MaskFormerSemanticDatasetMapper

    mapper = MaskFormerSemanticDatasetMapper(cfg, is_train=True)
    records = DatasetCatalog.get("mosaic_sem_seg_train")[:images]
    return [[mapper(dict(r)) for r in records[i:i + batch_size]] for i in range(0, images, batch_size)]


def mean_loss_per_pass(model, batches, passes=10, check_losses=None):
    """Train ``model`` with AdamW (1e-3) over ``batches`` ``passes`` times; the mean
    total loss of each pass. ``check_losses(losses)`` sees every step's loss dict."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    means = []
    for _ in range(passes):
        totals = []
        for batch in batches:
            losses = model(batch)
            if check_losses is not None:
                check_losses(losses)
            total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            totals.append(total.item())
        means.append(sum(totals) / len(totals))
    return means


def test_training_steps_on_mosaic_reduce_the_loss(small_mosaic_root, one_torch_thread):
    from detectron2.modeling import build_model

    cfg = _maskformer_cfg("INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.CROP.SIZE", "(64, 64)",
                          "INPUT.SIZE_DIVISIBILITY", "64", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256")
    torch.manual_seed(0)
    np.random.seed(0)
    model = build_model(cfg).train()
    batches = mosaic_batches(cfg)

    def check(losses):
        # Deep supervision: the final layer's and 3 auxiliary layers' losses, weighted.
        assert set(losses) == {f"loss_{k}{s}" for k in ("ce", "mask", "dice") for s in ("", "_0", "_1", "_2")}

    passes = mean_loss_per_pass(model, batches, check_losses=check)  # 20 steps
    assert passes[-1] < 0.75 * passes[0], passes
