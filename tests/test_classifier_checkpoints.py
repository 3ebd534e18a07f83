"""Checkpoints written before the classifier seam load unchanged and give the same outputs.

The files under tests/data/pre_classifier_seam/ were written by the code of
commit ccf0766 (see make_checkpoints.py there), when the classifier was
chosen by MODEL.SEM_SEG_HEAD.CLASSIFIER / MODEL.MASK_FORMER.CLASSIFIER and
the query memory by MODEL.MASK_FORMER.GMM_MEMORY_SIZE. The seam kept every
state-dict key (``predictor.*``, ``predictor.class_embed.*``), so no rename
hook is needed: these tests are what says so.
"""
import os

import pytest
import torch

from tests.conftest import REPO_ROOT

DATA = os.path.join(REPO_ROOT, "tests", "data", "pre_classifier_seam")
# The options make_checkpoints.py used, under today's key names.
RENAMED_OPTS = {"MODEL.MASK_FORMER.GMM_MEMORY_SIZE": "MODEL.GMM.QUERY.MEMORY_SIZE"}


def _cfg(saved, memory_kind):
    from detectron2.config import get_cfg

    from gmmseg_d2.config import add_gmmseg_config

    opts = list(saved["opts"])
    for i in range(0, len(opts), 2):
        opts[i] = RENAMED_OPTS.get(opts[i], opts[i])
        if opts[i] == "MODEL.GMM.MEMORY_KIND":
            opts[i + 1] = memory_kind
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, saved["config"]))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def _load(name, memory_kind):
    from detectron2.modeling import build_model

    from gmmseg_d2.engine import AtomicDetectionCheckpointer

    saved = torch.load(os.path.join(DATA, f"{name}.pth"), map_location="cpu", weights_only=False)
    model = build_model(_cfg(saved, memory_kind)).eval()
    head_keys = {k for k in model.state_dict() if k.startswith("sem_seg_head.")}
    # Detectron2's checkpointer, as MODEL.WEIGHTS would use it; only the head was saved.
    incompatible = AtomicDetectionCheckpointer(model)._load_model({"model": dict(saved["model"])})
    return saved, model, head_keys, incompatible


@pytest.mark.parametrize("name", ["fcn_gmm", "deeplabv3plus_gmm", "maskformer2_gmm"])
def test_checkpoint_from_before_the_seam_loads_key_for_key_with_the_same_outputs(name):
    saved, model, head_keys, incompatible = _load(name, "ring")
    assert set(saved["model"]) == head_keys  # no key was renamed, added or removed
    assert not [k for k in incompatible.missing_keys if k.startswith("sem_seg_head.")]
    assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    state = model.state_dict()
    for key, value in saved["model"].items():
        assert torch.equal(state[key], value), key
    # The files were written with 2 intra-op threads; float32 convolutions
    # round differently with 1 (DeepLabV3+: up to 1.5e-5 in the logits, old
    # and new code alike), so the outputs are compared at the writer's count.
    # Another CPU (other vector kernels) still differs by ~1.3e-5 in the GMM
    # logits (log-likelihoods of order 100), hence the 1e-4 tolerance; a
    # changed computation moves them by far more.
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            outputs = model.sem_seg_head(saved["features"])
    finally:
        torch.set_num_threads(previous)
    if name == "maskformer2_gmm":
        for key in ("pred_logits", "pred_masks"):
            torch.testing.assert_close(outputs[key], saved["outputs"][key], rtol=0, atol=1e-4)
    else:
        for key in ("sem_seg", "anomaly_score"):
            torch.testing.assert_close(outputs[0][key], saved["outputs"][key], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["fcn_gmm", "maskformer2_gmm"])
def test_checkpoint_from_before_the_seam_loads_into_the_stats_memory(name):
    """The ring memory those checkpoints hold converts into today's default kind."""
    saved, model, _, incompatible = _load(name, "stats")
    assert not incompatible.unexpected_keys
    prefix = "sem_seg_head.predictor." + ("class_embed." if name == "maskformer2_gmm" else "")
    classifier = model.sem_seg_head.classifier if name == "maskformer2_gmm" else model.sem_seg_head.predictor
    assert torch.equal(classifier.means, saved["model"][prefix + "means"])
    ring = saved["model"][prefix + "memory.features"].double()  # (C, M, K, D)
    count = saved["model"][prefix + "memory.count"]
    stored = count > 0  # never-written slots of an "empty" ring hold zeros
    assert bool(stored.any())
    n, first, second = classifier.memory.moments(stored)
    torch.testing.assert_close(first[stored].double(), ring[stored].sum(dim=1), rtol=0, atol=1e-4)
    torch.testing.assert_close(second[stored].double(), ring[stored].square().sum(dim=1), rtol=0, atol=1e-4)
    assert torch.equal(n[stored].round().long(), count[stored].long())
