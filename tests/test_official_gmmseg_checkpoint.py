"""Official GMMSeg (MMSegmentation) checkpoints load into our SegFormer + GMM model unchanged.

No official file can be downloaded here, so the tests write state dicts laid
out exactly as the official ``SegformerGMMSegHead`` saves them (names, shapes
and dtypes of leonnnop/GMMSeg's ``gmmseg_head.py``: ``means``/``diagonal``
``(C, M, D)`` parameters, ``queue (C*M, D, K)``, ``queue_ptr``,
``iteration_counter (1,)`` float, the unused ``conv_seg`` and ``eye_matrix``)
with a MiT backbone in MMSegmentation's names, and check that

* the checkpointer loads the ``.pth`` directly, and the converter's ``.pkl``,
  with no missing or unexpected key;
* our class logits and anomaly scores equal a direct evaluation of the
  official head's formulas on those tensors (projection conv+BN+ReLU,
  ``feat_norm``, L2, diagonal-Gaussian log-densities with the normalised
  means, max over components, ``mask_norm``);
* the memory's M-step moments equal the official ``update_GMM`` on ``queue``
  (ring and stats memories);
* MiT ImageNet weights in both releases' layouts load into the backbone.

The MiT backbone and SegFormer decoder themselves are compared against
MMSegmentation's code in ``tests/test_mmseg_parity.py``.
"""
import importlib.util
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from gmmseg_d2.checkpoint_conversion import convert_mit_imagenet, convert_mmseg_segformer, detect_mmseg_checkpoint
from gmmseg_d2.config import add_gmmseg_config
from gmmseg_d2.engine import AtomicDetectionCheckpointer
from tests.conftest import REPO_ROOT

C, M, D, K, CHANNELS = 5, 3, 16, 40, 64


def small_cfg(classifier="gmm", memory_kind="stats"):
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "PerPixelSegmentor", "MODEL.BACKBONE.NAME", "D2MixVisionTransformer",
        "MODEL.MIT.EMBED_DIM", 32, "MODEL.MIT.DEPTHS", [2, 2, 2, 2],
        "MODEL.SEM_SEG_HEAD.NAME", "SegFormerHead", "MODEL.SEM_SEG_HEAD.IN_FEATURES", ["res2", "res3", "res4", "res5"],
        "MODEL.SEM_SEG_HEAD.CONVS_DIM", CHANNELS, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", C,
        "MODEL.SEM_SEG_HEAD.NORM", "BN", "MODEL.CLASSIFIER.NAME", classifier,
        "MODEL.GMM.NUM_COMPONENTS", M, "MODEL.GMM.EMBED_DIM", D, "MODEL.GMM.MEMORY_SIZE", K,
        "MODEL.GMM.MEMORY_KIND", memory_kind, "MODEL.GMM.MAX_SAMPLES_PER_COMPONENT", 20,
        "MODEL.PIXEL_MEAN", [123.675, 116.28, 103.53], "MODEL.PIXEL_STD", [58.395, 57.12, 57.375],
        "MODEL.DEVICE", "cpu",
    ])
    return cfg


# --------------------------------------------------- the official layout, by hand

def to_mmseg_mit(ours, prefix_in="backbone.", prefix_out="backbone."):
    """Our MiT names -> MMSegmentation's (an independent statement of the layout)."""
    out = {}
    grouped = {}
    for key, t in ours.items():
        if not key.startswith(prefix_in):
            continue
        parts = key[len(prefix_in):].split(".")
        i = parts[1]
        if parts[2] == "patch_embed":
            name = {"proj": "projection", "norm": "norm"}[parts[3]]
            out[f"{prefix_out}layers.{i}.0.{name}.{parts[4]}"] = t
        elif parts[2] == "norm":
            out[f"{prefix_out}layers.{i}.2.{parts[3]}"] = t
        else:
            j, module, rest = parts[3], parts[4], parts[5:]
            base = f"{prefix_out}layers.{i}.1.{j}"
            if module in ("norm1", "norm2"):
                out[f"{base}.{module}.{rest[0]}"] = t
            elif module == "attn" and rest[0] in ("q", "kv"):
                grouped.setdefault((base, rest[1]), {})[rest[0]] = t
            elif module == "attn" and rest[0] == "proj":
                out[f"{base}.attn.attn.out_proj.{rest[1]}"] = t
            elif module == "attn":
                out[f"{base}.attn.{rest[0]}.{rest[1]}"] = t
            else:
                index = {"fc1": 0, "dwconv": 1, "fc2": 4}[rest[0]]
                if rest[0] != "dwconv" and rest[1] == "weight":
                    t = t[:, :, None, None]
                out[f"{base}.ffn.layers.{index}.{rest[1]}"] = t
    for (base, what), parts in grouped.items():
        out[f"{base}.attn.attn.in_proj_{what}"] = torch.cat([parts["q"], parts["kv"]])
    return out


def official_state_dict(model, seed=0):
    """A state dict with the official GMMSeg SegFormer's keys, shapes and dtypes, random values."""
    g = torch.Generator().manual_seed(seed)
    ours = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in ours.items():  # random but valid values (positive running variances)
        if v.is_floating_point():
            ours[k] = torch.rand(v.shape, generator=g) + 0.5 if "running_var" in k else \
                torch.randn(v.shape, generator=g) * 0.2
    sd = to_mmseg_mit(ours)
    for i in range(4):
        sd[f"decode_head.convs.{i}.conv.weight"] = ours[f"sem_seg_head.convs.{i}.weight"]
        for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            sd[f"decode_head.convs.{i}.bn.{n}"] = ours[f"sem_seg_head.convs.{i}.norm.{n}"]
    sd["decode_head.fusion_conv.conv.weight"] = ours["sem_seg_head.fusion_conv.weight"]
    for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        sd[f"decode_head.fusion_conv.bn.{n}"] = ours[f"sem_seg_head.fusion_conv.norm.{n}"]
        sd[f"decode_head.projection.bn.{n}"] = (torch.rand(D, generator=g) + 0.5 if n == "running_var" else
                                                torch.tensor(12) if n == "num_batches_tracked" else
                                                torch.randn(D, generator=g) * 0.3)
    sd["decode_head.projection.conv.weight"] = torch.randn(D, CHANNELS, 1, 1, generator=g) * 0.2
    sd["decode_head.conv_seg.weight"] = torch.randn(C, CHANNELS, 1, 1, generator=g)
    sd["decode_head.conv_seg.bias"] = torch.randn(C, generator=g)
    sd["decode_head.feat_norm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
    sd["decode_head.feat_norm.bias"] = 0.1 * torch.randn(D, generator=g)
    sd["decode_head.mask_norm.weight"] = 1 + 0.1 * torch.randn(C, generator=g)
    sd["decode_head.mask_norm.bias"] = 0.1 * torch.randn(C, generator=g)
    # After a momentum update the saved means are not exactly unit vectors.
    sd["decode_head.means"] = F.normalize(torch.randn(C, M, D, generator=g), dim=-1) * 1.03
    sd["decode_head.diagonal"] = 0.2 + 0.3 * torch.rand(C, M, D, generator=g)
    sd["decode_head.eye_matrix"] = torch.ones(D)
    sd["decode_head.iteration_counter"] = torch.tensor([17.0])
    sd["decode_head.queue"] = F.normalize(torch.randn(C * M, D, K, generator=g), dim=-2)
    sd["decode_head.queue_ptr"] = torch.randint(0, K, (C * M,), generator=g)
    return sd


def official_logits(sd, fused):
    """The official head's forward after ``base_feature_transform``'s fusion, by its formulas.

    ``fused (B, CHANNELS, h, w)`` -> class logits ``(B*h*w, C)`` and ``max_c`` log-likelihood ``(B*h*w,)``.
    """
    h = F.conv2d(fused, sd["decode_head.projection.conv.weight"])
    h = F.batch_norm(h, sd["decode_head.projection.bn.running_mean"], sd["decode_head.projection.bn.running_var"],
                     sd["decode_head.projection.bn.weight"], sd["decode_head.projection.bn.bias"], False, 0.0, 1e-5)
    x = F.relu(h).permute(0, 2, 3, 1).reshape(-1, D)
    x = F.normalize(F.layer_norm(x, (D,), sd["decode_head.feat_norm.weight"], sd["decode_head.feat_norm.bias"]),
                    dim=-1)
    means = F.normalize(sd["decode_head.means"], dim=-1)  # the official forward's first step
    gauss = torch.distributions.Normal(means.reshape(-1, D), sd["decode_head.diagonal"].reshape(-1, D))
    log_prob = gauss.log_prob(x[:, None, :].double()).sum(-1).float().view(-1, C, M)
    class_scores = log_prob.amax(-1)
    logits = F.layer_norm(class_scores, (C,), sd["decode_head.mask_norm.weight"], sd["decode_head.mask_norm.bias"])
    return logits, class_scores.amax(-1)


def official_m_step_moments(queue):
    """``update_GMM``'s direction and (pre-floor) variance for every component, ``(C*M, D)`` each."""
    features = queue.transpose(1, 2)  # (C*M, K, D)
    direction = F.normalize(features.sum(1), dim=-1)
    variance = ((features - direction[:, None]) ** 2).sum(1) / K
    return direction, variance


def load_through_checkpointer(model, path):
    checkpointer = AtomicDetectionCheckpointer(model)
    result = {}
    load_model = checkpointer._load_model
    checkpointer._load_model = lambda checkpoint: result.setdefault("incompatible", load_model(checkpoint))
    checkpointer.load(path)
    return result["incompatible"]


def _tool():
    spec = importlib.util.spec_from_file_location(
        "convert_gmmseg_official", os.path.join(REPO_ROOT, "tools", "convert_gmmseg_official.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(small_cfg())
    sd = official_state_dict(model)
    path = str(tmp_path_factory.mktemp("official") / "segformer_gmmseg.pth")
    torch.save({"meta": {"CLASSES": tuple(f"c{i}" for i in range(C)), "iter": 17}, "state_dict": sd,
                "optimizer": {"state": {}, "param_groups": []}}, path)
    return path, sd


def _check_equivalence(model, sd):
    model.eval()
    torch.manual_seed(1)
    image = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        fused = model.sem_seg_head.layers(model.backbone(image))
        outputs = model.sem_seg_head.predictor(fused)
        ours_logits = outputs.class_logits.permute(0, 2, 3, 1).reshape(-1, C)
        ours_score = model.sem_seg_head.predictor.anomaly_score(outputs).reshape(-1)
    expected_logits, expected_max_ll = official_logits(sd, fused)
    torch.testing.assert_close(ours_logits, expected_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_score, -expected_max_ll, rtol=1e-4, atol=1e-3)


def _check_memory(model, sd):
    memory = model.sem_seg_head.predictor.memory
    direction, variance = memory.statistics(torch.ones(C, M, dtype=torch.bool))
    expected_direction, expected_variance = official_m_step_moments(sd["decode_head.queue"])
    torch.testing.assert_close(direction.reshape(-1, D), expected_direction, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(variance.reshape(-1, D), expected_variance, rtol=1e-4, atol=1e-6)
    assert int(model.sem_seg_head.predictor.iteration) == 17


def test_the_official_file_is_recognised(official_file):
    path, sd = official_file
    assert detect_mmseg_checkpoint(torch.load(path, weights_only=False)) == "segformer"
    assert detect_mmseg_checkpoint({"model": {"backbone.stages.0.norm.weight": torch.ones(1)}}) is None


@pytest.mark.parametrize("memory_kind", ["stats", "ring"])
def test_checkpointer_loads_the_official_pth_directly(official_file, memory_kind, one_torch_thread):
    path, sd = official_file
    model = build_model(small_cfg(memory_kind=memory_kind))
    incompatible = load_through_checkpointer(model, path)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    assert not incompatible.incorrect_shapes
    _check_equivalence(model, sd)
    _check_memory(model, sd)
    if memory_kind == "ring":
        ring = model.sem_seg_head.predictor.memory
        torch.testing.assert_close(ring.features, sd["decode_head.queue"].view(C, M, D, K).transpose(2, 3))
        assert torch.equal(ring.pointer.view(-1), sd["decode_head.queue_ptr"])


@pytest.mark.parametrize("memory", ["stats", "ring"])
def test_converted_pkl_loads_with_no_missing_key_and_the_same_outputs(official_file, tmp_path, memory, capsys,
                                                                       one_torch_thread):
    path, sd = official_file
    pkl = str(tmp_path / "converted.pkl")
    _tool().main([path, pkl, "--memory", memory, "--trust-pickle"])
    printed = capsys.readouterr().out
    assert "decode_head.conv_seg.weight" in printed and "decode_head.eye_matrix" in printed
    with open(pkl, "rb") as f:
        data = pickle.load(f)
    assert data["__author__"] == "mmsegmentation:gmmseg_segformer" and data["matching_heuristics"] is False
    model = build_model(small_cfg(memory_kind=memory))
    incompatible = load_through_checkpointer(model, pkl)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    assert not incompatible.incorrect_shapes
    _check_equivalence(model, sd)
    _check_memory(model, sd)


def test_drop_memory_leaves_only_the_memory_missing(official_file, tmp_path, one_torch_thread):
    path, sd = official_file
    pkl = str(tmp_path / "eval_only.pkl")
    _tool().main([path, pkl, "--drop-memory", "--trust-pickle"])
    model = build_model(small_cfg())
    incompatible = load_through_checkpointer(model, pkl)
    assert incompatible.missing_keys and all(".predictor.memory." in k for k in incompatible.missing_keys)
    assert not incompatible.unexpected_keys
    _check_equivalence(model, sd)  # predicting needs no memory


def test_tool_refuses_pickled_objects_without_trust_and_unknown_files(official_file, tmp_path):
    path, _ = official_file
    torch.save({"meta": {"best": object.__new__(torch.nn.Identity)}, "state_dict": {}}, str(tmp_path / "x.pth"))
    with pytest.raises(SystemExit, match="--trust-pickle"):
        _tool().main([str(tmp_path / "x.pth"), str(tmp_path / "x.pkl")])
    torch.save({"weight": torch.ones(1)}, str(tmp_path / "y.pth"))
    with pytest.raises(SystemExit, match="neither an MMSegmentation SegFormer"):
        _tool().main([str(tmp_path / "y.pth"), str(tmp_path / "y.pkl")])


def test_converter_rejects_unknown_head_keys(official_file):
    _, sd = official_file
    with pytest.raises(ValueError, match="decode_head.something"):
        convert_mmseg_segformer({**sd, "decode_head.something": torch.ones(1)})


def test_softmax_segformer_checkpoint_maps_conv_seg_to_the_predictor(official_file, tmp_path, one_torch_thread):
    _, sd = official_file
    softmax_sd = {k: v for k, v in sd.items()
                  if not k.startswith("decode_head.") or k.startswith(("decode_head.convs", "decode_head.fusion_conv",
                                                                       "decode_head.conv_seg"))}
    path = str(tmp_path / "segformer.pth")
    torch.save({"meta": {}, "state_dict": softmax_sd}, path)
    model = build_model(small_cfg(classifier="softmax")).eval()
    incompatible = load_through_checkpointer(model, path)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fused = model.sem_seg_head.layers(model.backbone(image))
        logits = model.sem_seg_head.predictor(fused).class_logits
    expected = F.conv2d(fused, sd["decode_head.conv_seg.weight"], sd["decode_head.conv_seg.bias"])
    torch.testing.assert_close(logits, expected)


def to_original_mit(mmseg):
    """MMSegmentation MiT names (no prefix) -> the original SegFormer release's."""
    out = {}
    for key, t in mmseg.items():
        parts = key.split(".")
        n = int(parts[1]) + 1
        if parts[2] == "0":
            out[f"patch_embed{n}.{'proj' if parts[3] == 'projection' else 'norm'}.{parts[4]}"] = t
        elif parts[2] == "2":
            out[f"norm{n}.{parts[3]}"] = t
        else:
            base = f"block{n}.{parts[3]}"
            rest = ".".join(parts[4:])
            if rest.startswith("attn.attn.in_proj_"):
                what = rest.rsplit("_", 1)[1]
                dim = t.shape[0] // 3
                out[f"{base}.attn.q.{what}"], out[f"{base}.attn.kv.{what}"] = t[:dim], t[dim:]
            elif rest.startswith("attn.attn.out_proj."):
                out[f"{base}.attn.proj.{parts[-1]}"] = t
            elif rest.startswith("ffn.layers."):
                name = {"0": "mlp.fc1", "1": "mlp.dwconv.dwconv", "4": "mlp.fc2"}[parts[6]]
                out[f"{base}.{name}.{parts[-1]}"] = t.flatten(1) if parts[6] != "1" and parts[-1] == "weight" else t
            else:
                out[f"{base}.{rest}"] = t
    out["head.weight"], out["head.bias"] = torch.zeros(1000, 256), torch.zeros(1000)
    return out


@pytest.mark.parametrize("layout", ["mmseg", "original"])
def test_mit_imagenet_weights_load_into_the_backbone(tmp_path, layout, one_torch_thread):
    torch.manual_seed(0)
    source = build_model(small_cfg(classifier="softmax")).eval()
    with torch.no_grad():
        for p in source.backbone.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    mmseg = to_mmseg_mit(source.state_dict(), "backbone.", "")
    weights = mmseg if layout == "mmseg" else to_original_mit(mmseg)
    path = str(tmp_path / f"mit_b0_{layout}.pth")
    torch.save(weights, path)
    converted = convert_mit_imagenet(weights)
    assert converted.dropped == ([] if layout == "mmseg" else ["head.bias", "head.weight"]) or \
        sorted(converted.dropped) == ["head.bias", "head.weight"]
    target = build_model(small_cfg(classifier="softmax")).eval()
    incompatible = load_through_checkpointer(target, path)
    assert not incompatible.unexpected_keys
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.")]
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for name, feature in source.backbone(image).items():
            torch.testing.assert_close(target.backbone(image)[name], feature)
