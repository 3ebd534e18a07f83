"""The MMSegmentation 0.22.1 reference (tests/official_mmseg.py): it imports
without side effects on the rest of the session, builds MiT-B0 and the SegFormer
head with the key names the checkpoint converter maps, and its setup step
(tools/setup_env.sh) skips cleanly when it cannot be installed."""
import os
import subprocess
import sys

import pytest
import torch

from tests import official_mmseg
from tests.conftest import REPO_ROOT
from tests.official_mmseg import official_mit_class, official_segformer_head_class

SETUP = os.path.join(REPO_ROOT, "tools", "setup_env.sh")

#: MiT-B0 as mmseg's configs/_base_/models/segformer_mit-b0.py builds it.
MIT_B0 = dict(embed_dims=32, num_layers=[2, 2, 2, 2], num_heads=[1, 2, 5, 8], patch_sizes=[7, 3, 3, 3],
              sr_ratios=[8, 4, 2, 1], qkv_bias=True, drop_path_rate=0.1)
#: The SegFormer head of the same config, for 19 classes.
SEGFORMER_HEAD_B0 = dict(in_channels=[32, 64, 160, 256], in_index=[0, 1, 2, 3], channels=256, dropout_ratio=0.1,
                         num_classes=19, norm_cfg=dict(type="BN", requires_grad=True), align_corners=False)


def _detectron2_registry_names():
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY

    return {r._name: sorted(r._obj_map) for r in (BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY)}


def test_the_loader_leaves_the_import_machinery_and_detectron2_alone():
    official_mmseg.mmseg_reference_root()  # skips without the reference
    path, meta_path, path_hooks = list(sys.path), list(sys.meta_path), list(sys.path_hooks)
    registries = _detectron2_registry_names()
    mit_class, head_class = official_mit_class(), official_segformer_head_class()
    assert mit_class.__module__ == "mmseg.models.backbones.mit"
    assert head_class.__module__ == "mmseg.models.decode_heads.segformer_head"
    # No import hook, and the reference folder is off sys.path again. (mmcv
    # imports torch.utils.cpp_extension, which imports the venv's setuptools,
    # which appends its own _vendor folder: that one is the venv's doing.)
    root = official_mmseg.mmseg_reference_root()
    assert sys.meta_path == meta_path and sys.path_hooks == path_hooks
    added = [p for p in sys.path if p not in path]
    assert all(os.path.basename(p) == "_vendor" and "setuptools" in p for p in added), added
    assert not any(os.path.realpath(p).startswith(os.path.realpath(root)) for p in sys.path)
    assert _detectron2_registry_names() == registries
    # The venv's packages are the ones in use, never copies from the reference folder.
    import numpy
    import yaml

    for module in (numpy, yaml, torch):
        assert not os.path.realpath(module.__file__).startswith(os.path.realpath(root)), module
    import mmcv

    assert mmcv.__version__ == official_mmseg.MMCV_VERSION and sys.modules["mmseg"].mmcv_version[:3] == (1, 7, 2)


def test_mit_b0_and_segformer_head_run_with_the_expected_shapes_and_keys():
    torch.manual_seed(0)
    backbone = official_mit_class()(**MIT_B0).eval()
    head = official_segformer_head_class()(**SEGFORMER_HEAD_B0).eval()
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features = backbone(image)
        logits = head(features)
        again = head(backbone(image))
    assert [tuple(f.shape) for f in features] == [(1, 32, 16, 24), (1, 64, 8, 12), (1, 160, 4, 6), (1, 256, 2, 3)]
    assert tuple(logits.shape) == (1, 19, 16, 24)
    # Eval mode: drop path and dropout are off.
    assert torch.equal(logits, again)

    backbone_keys = set(backbone.state_dict())
    for key in ("layers.0.0.projection.weight", "layers.0.1.0.attn.attn.in_proj_weight",
                "layers.0.1.0.ffn.layers.1.weight", "layers.3.2.weight", "layers.0.1.0.attn.sr.weight"):
        assert key in backbone_keys, key
    head_keys = set(head.state_dict())
    for key in ("convs.0.conv.weight", "convs.3.bn.running_var", "fusion_conv.conv.weight",
                "fusion_conv.bn.weight", "conv_seg.weight", "conv_seg.bias"):
        assert key in head_keys, key
    assert not any(k.startswith("loss_decode") for k in head_keys)


def test_the_loader_skips_without_the_reference_and_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.delenv(official_mmseg.REFERENCE_ENV, raising=False)
    monkeypatch.delenv(official_mmseg.REQUIRE_ENV, raising=False)
    monkeypatch.setattr(official_mmseg.sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setattr(official_mmseg, "REPO_ROOT", str(tmp_path / "repo"))
    with pytest.raises(pytest.skip.Exception, match=r"skipped: reference not installed .*make setup"):
        official_mmseg.mmseg_reference_root()
    # CI can insist on it; an explicit but wrong location is an error too.
    monkeypatch.setenv(official_mmseg.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="GMMSEG_REQUIRE_REFERENCE=1"):
        official_mmseg.mmseg_reference_root()
    monkeypatch.delenv(official_mmseg.REQUIRE_ENV)
    monkeypatch.setenv(official_mmseg.REFERENCE_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(pytest.fail.Exception, match="holds no mmseg/models/backbones/mit.py"):
        official_mmseg.mmseg_reference_root()


def test_a_reference_folder_that_could_shadow_the_venv_is_refused(tmp_path, monkeypatch):
    for rel in ("mmseg/models/backbones/mit.py", "mmseg/models/decode_heads/segformer_head.py", "mmcv/__init__.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    (tmp_path / "numpy").mkdir()
    monkeypatch.setenv(official_mmseg.REFERENCE_ENV, str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match=r"holds \['numpy'\], which could shadow"):
        official_mmseg.mmseg_reference_root()


def test_setup_step_without_a_source_skips_with_instructions_and_leaves_nothing(tmp_path):
    # A scratch venv whose interpreter runs this one (with its pip; a symlink
    # would lose the venv), and an empty wheelhouse standing for "offline"
    # without any network call.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    wheelhouse = tmp_path / "empty_wheelhouse"
    wheelhouse.mkdir()
    inherited = {k: v for k, v in os.environ.items() if k not in ("SKIP_TEST_REFERENCES", "MMSEG_REFERENCE_WHEELHOUSE")}
    env = {**inherited, "VENV": str(venv), "MASK2FORMER_SDIST": str(tmp_path / "missing.tar.gz"),
           "MMSEG_REFERENCE_WHEELHOUSE": str(wheelhouse)}
    run = subprocess.run(["bash", SETUP, "--reference-only"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "SKIPPED (test-only, optional): the MMSegmentation reference mmseg-0.22.1" in run.stderr, run.stderr
    assert "pip could not install it" in run.stderr and "MMSEG_REFERENCE_WHEELHOUSE=/folder make setup" in run.stderr
    assert "tests/test_official_mmseg_reference.py" in run.stderr
    # No half-installed folder or work folder is left behind.
    assert os.listdir(venv / "reference") == []
