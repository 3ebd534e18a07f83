"""Checkpoint and output parity of gmmseg_d2's Mask2Former with the official one.

For the official ADE20K semantic-segmentation configs of R50 and Swin-T (the
YAML files as Mask2Former ships them, tests/test_maskformer2_config.py), the
official model (tests/official_mask2former.py) is built from the official
config code and ours from ``setup_cfg``. The official model's randomly
initialised weights, saved as a torch checkpoint and in the model-zoo ``.pkl``
format, load into ours through ``DetectionCheckpointer`` with no missing,
unexpected or mis-shaped key, and the two models then produce the same
``sem_seg`` on the same image; our weights load into the official model just
as cleanly. Last, a gmmseg_d2 Mask2Former checkpoint round-trips exactly.
"""
import argparse
import os
import pickle

import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from gmmseg_d2.engine import setup_cfg
from tests.conftest import REPO_ROOT
from tests.official_mask2former import build_official_model, official_cfg
from tests.test_maskformer2_config import OFFICIAL_STYLE_BASE, OFFICIAL_STYLE_R50, OFFICIAL_STYLE_SWIN_T

CONFIGS = {
    "R50": "maskformer2_R50_bs16_160k.yaml",
    "SwinT": os.path.join("swin", "maskformer2_swin_tiny_bs16_160k.yaml"),
}
#: Largest |ours - official| / max |official| allowed on ``sem_seg``.
MAX_RELATIVE_DIFFERENCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread_for_the_module():
    # Two threads on a shared 2-core machine make these forwards 10-40x slower
    # (OpenMP barriers); see conftest's one_torch_thread.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def official_config_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mask2former_configs")
    (root / "swin").mkdir()
    (root / "Base-ADE20K-SemanticSegmentation.yaml").write_text(OFFICIAL_STYLE_BASE)
    (root / CONFIGS["R50"]).write_text(OFFICIAL_STYLE_R50)
    (root / CONFIGS["SwinT"]).write_text(OFFICIAL_STYLE_SWIN_T)
    return root


def _our_cfg(config_file, *opts):
    args = argparse.Namespace(config_file=str(config_file), opts=["MODEL.DEVICE", "cpu", *opts])
    return setup_cfg(args, default_setup_logging=False)


def _image_batch():
    # 90x120 pads to 96x128 (size divisibility 32), and the output size differs
    # from the input's: both steps of sem_seg_postprocess are exercised.
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 90, 120), generator=g, dtype=torch.uint8).float()
    return [{"image": image, "height": 135, "width": 180}]


def _load_reporting_incompatible_keys(model, path):
    """``DetectionCheckpointer(model).load(path)``, returning what it found incompatible."""
    checkpointer = DetectionCheckpointer(model)
    reported = []
    checkpointer._log_incompatible_keys = reported.append
    checkpointer.load(str(path))
    assert len(reported) == 1
    return reported[0]


def _assert_compatible(incompatible):
    assert incompatible.missing_keys == []
    assert incompatible.unexpected_keys == []
    assert incompatible.incorrect_shapes == []


def _snapshot(model):
    """A copy of ``model.state_dict()`` that keeps its ``_metadata`` (module versions),
    as ``torch.save(model.state_dict())`` and DetectionCheckpointer files do.

    The official MaskFormerHead needs it: given no version, it takes the state
    dict for a MaskFormer-v1 one and moves every ``sem_seg_head.*`` key but the
    predictor's under ``sem_seg_head.pixel_decoder.``, even keys already there.
    (Ours renames only the keys not yet there, so a plain dict loads too.)
    """
    state = model.state_dict()
    for key, value in state.items():
        state[key] = value.detach().clone()
    return state


def _relative_difference(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model_pair(request, official_config_dir):
    """(name, official model, its initial state dict, our model, our model's initial state dict).

    The tests load weights into the models; each loads what it needs first.
    """
    config_file = official_config_dir / CONFIGS[request.param]
    torch.manual_seed(0)
    official = build_official_model(official_cfg(config_file)).eval()
    official_state = _snapshot(official)
    torch.manual_seed(1)
    ours = build_model(_our_cfg(config_file)).eval()
    ours_state = _snapshot(ours)
    return request.param, official, official_state, ours, ours_state


def test_official_checkpoints_load_with_no_incompatible_key(model_pair, tmp_path):
    name, _, official_state, ours, ours_state = model_pair
    assert type(ours).__module__.startswith("gmmseg_d2.")
    assert {k: tuple(v.shape) for k, v in ours_state.items()} == {
        k: tuple(v.shape) for k, v in official_state.items()}

    # A plain dict, without the module versions a state_dict() carries: the harder case for us.
    pkl_model = {k: v.numpy() for k, v in official_state.items()}
    files = {
        "pth": ({"model": official_state}, torch.save),
        # Mask2Former's model-zoo .pkl layout; with and without D2's name matching.
        "pkl": ({"model": pkl_model, "__author__": "Mask2Former"}, pickle.dump),
        "heuristic.pkl": ({"model": pkl_model, "__author__": "Mask2Former", "matching_heuristics": True},
                          pickle.dump),
    }
    for suffix, (content, dump) in files.items():
        path = tmp_path / f"{name}_official.{suffix}"
        with open(path, "wb") as f:
            dump(content, f)
        with torch.no_grad():  # start from other weights, so the load has to set every one
            for v in ours.state_dict().values():
                v.add_(1)
        _assert_compatible(_load_reporting_incompatible_keys(ours, path))
        for key, value in ours.state_dict().items():
            assert torch.equal(value, official_state[key]), (suffix, key)


def test_same_weights_give_the_official_sem_seg(model_pair, tmp_path):
    name, official, official_state, ours, _ = model_pair
    official.load_state_dict(official_state)
    path = tmp_path / f"{name}_official.pth"
    torch.save({"model": official_state}, path)
    _assert_compatible(_load_reporting_incompatible_keys(ours, path))
    batch = _image_batch()
    with torch.no_grad():
        want = official(batch)[0]["sem_seg"]
        got = ours(batch)[0]
    assert want.shape == (150, 135, 180)
    assert got["sem_seg"].shape == want.shape and got["anomaly_score"].shape == want.shape[1:]
    difference = _relative_difference(got["sem_seg"], want)
    print(f"{name}: max |ours - official| / max |official| = {difference:.3g}")
    assert difference < MAX_RELATIVE_DIFFERENCE, difference
    # Random weights still give a non-degenerate prediction to compare.
    assert want.std() > 1e-3 * want.abs().max()


def test_our_checkpoints_load_into_the_official_model(model_pair, tmp_path):
    name, official, _, _, ours_state = model_pair
    path = tmp_path / f"{name}_ours.pth"
    torch.save({"model": ours_state}, path)  # what our DetectionCheckpointer.save writes for it
    _assert_compatible(_load_reporting_incompatible_keys(official, path))
    for key, value in official.state_dict().items():
        assert torch.equal(value, ours_state[key]), key


# ---------------------------------------------------------------- round trip
def test_saved_and_reloaded_checkpoint_gives_identical_outputs(tmp_path):
    cfg = _our_cfg(os.path.join(REPO_ROOT, "configs", "mosaic", "maskformer2_R18_softmax.yaml"))
    torch.manual_seed(0)
    model = build_model(cfg)
    # A few training-mode forwards move the BatchNorm statistics off their init values.
    with torch.no_grad():
        for seed in range(2):
            images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 255
            model.sem_seg_head(model.backbone((images - model.pixel_mean) / model.pixel_std))
    model.eval()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    path = tmp_path / "model_final.pth"
    assert path.is_file()

    torch.manual_seed(1)
    reloaded = build_model(cfg).eval()
    batch = [{"image": torch.rand(3, 60, 70, generator=torch.Generator().manual_seed(5)) * 255,
              "height": 90, "width": 105}]
    with torch.no_grad():
        want = model(batch)[0]
        assert not torch.equal(reloaded(batch)[0]["sem_seg"], want["sem_seg"])
        _assert_compatible(_load_reporting_incompatible_keys(reloaded, path))
        got = reloaded(batch)[0]
    assert set(got) == set(want) == {"sem_seg", "anomaly_score"}
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
