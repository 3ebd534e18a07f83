"""The official Mask2Former code as a test-time reference.

``tools/setup_env.sh`` fetches the PyPI sdist ``maskformer2==0.1`` (the
modeling code of facebookresearch/Mask2Former; only its criterion's
constructor differs from GitHub's, which inference does not use) and unpacks
it in ``<venv>/reference/maskformer2-0.1``. Nothing of it is vendored and
gmmseg_d2 never imports it: only the parity tests do, through this module.
``MASK2FORMER_REFERENCE_ROOT`` points elsewhere (the folder holding
``mask2former/``, or that package folder itself).

The reference is optional (setup skips it offline): without it the tests that
need it skip, naming the command that installs it. They fail instead when
``MASK2FORMER_REFERENCE_ROOT`` names a folder without the package (an explicit
request that cannot be met) or when ``GMMSEG_REQUIRE_REFERENCE=1`` is set (for
CI runs that must not skip the parity checks silently).

The official package cannot be imported as a whole here: its ``__init__``
files register datasets under the names ours use and pull in modules that need
detectron2's compiled ops. :func:`import_official_mask2former_module` imports
single modules with empty parent packages instead, and keeps the official
classes out of Detectron2's registries, so ``MaskFormer``,
``MSDeformAttnPixelDecoder`` etc. still resolve to gmmseg_d2's classes;
:func:`official_registries` switches them to the official ones for a block.
"""
import contextlib
import functools
import importlib
import os
import sys
import types

import pytest
import torch

REFERENCE_ENV = "MASK2FORMER_REFERENCE_ROOT"
REQUIRE_ENV = "GMMSEG_REQUIRE_REFERENCE"
SDIST_NAME = "maskformer2-0.1"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Registry entries the official modules registered, kept apart from ours.
OFFICIAL_REGISTRY_ENTRIES = {}


def _holds_package(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "mask2former", "maskformer_model.py"))


#: How to install the reference, for skip and failure messages.
INSTALL_HINT = (
    f"install it with `make setup` (network) or `MASK2FORMER_SDIST=/path/to/{SDIST_NAME}.tar.gz make setup` "
    f"(only that step: `bash tools/setup_env.sh --reference-only`), or set {REFERENCE_ENV} to a folder "
    "holding the official mask2former/ package"
)


def reference_root() -> str:
    """The folder holding the official ``mask2former/`` package.

    Skips the calling test when it is not installed (see the module
    docstring for when it fails instead).
    """
    explicit = os.environ.get(REFERENCE_ENV)
    if explicit:
        candidates = [explicit, os.path.dirname(os.path.normpath(explicit))]
    else:
        candidates = [os.path.join(sys.prefix, "reference", SDIST_NAME),
                      os.path.join(REPO_ROOT, ".venv", "reference", SDIST_NAME)]
    candidates = list(dict.fromkeys(os.path.abspath(c) for c in candidates))
    for folder in candidates:
        if _holds_package(folder):
            return os.path.abspath(folder)
    if explicit:
        pytest.fail(f"{REFERENCE_ENV}={explicit!r} holds no mask2former/maskformer_model.py "
                    f"(looked in {candidates}); point it at the unpacked {SDIST_NAME} folder.", pytrace=False)
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"The official Mask2Former sources are missing (looked in {candidates}) and {REQUIRE_ENV}=1; "
                    f"{INSTALL_HINT}.", pytrace=False)
    pytest.skip(f"skipped: reference not installed (official Mask2Former sources {SDIST_NAME}, looked in "
                f"{candidates}); {INSTALL_HINT}.")


def _d2_registries():
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY

    return (BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY)


def import_official_mask2former_module(module_name: str, root: str = None):
    """Import one module of the official ``mask2former`` package.

    Skips the package ``__init__`` files of ``mask2former`` and
    ``mask2former.modeling`` by installing empty parent packages, and records
    what the module registers in Detectron2's registries in
    ``OFFICIAL_REGISTRY_ENTRIES`` instead of the registries themselves.
    """
    root = root or reference_root()
    for parent in ("mask2former", "mask2former.modeling"):
        package = sys.modules.get(parent)
        if package is None:
            package = types.ModuleType(parent)
            package.__path__ = [os.path.join(root, *parent.split("."))]
            sys.modules[parent] = package
        elif os.path.realpath(package.__path__[0]) != os.path.realpath(os.path.join(root, *parent.split("."))):
            raise RuntimeError(f"{parent} is already imported from {package.__path__[0]}, not from {root}")
    saved = [r._obj_map for r in _d2_registries()]
    for r in _d2_registries():
        r._obj_map = dict(OFFICIAL_REGISTRY_ENTRIES.get(r._name, {}))
    try:
        return importlib.import_module(module_name)
    finally:
        for r, objs in zip(_d2_registries(), saved):
            OFFICIAL_REGISTRY_ENTRIES[r._name] = r._obj_map
            r._obj_map = objs


@contextlib.contextmanager
def official_registries():
    """Within the block, Detectron2's registries resolve names to the official classes
    (with ours as fallback for names the official code does not define, e.g.
    ``build_resnet_backbone``), e.g. to build the official model with ``build_model``."""
    saved = [r._obj_map for r in _d2_registries()]
    for r, objs in zip(_d2_registries(), saved):
        r._obj_map = {**objs, **OFFICIAL_REGISTRY_ENTRIES.get(r._name, {})}
    try:
        yield
    finally:
        for r, objs in zip(_d2_registries(), saved):
            r._obj_map = objs


def _criterion_with_the_github_signature(sdist_set_criterion):
    """The sdist's SetCriterion, built from the arguments GitHub's takes.

    The sdist's packager changed SetCriterion's constructor (per-loss weights
    and a layer count instead of ``weight_dict``), but not MaskFormer.from_config,
    which still calls it as GitHub's code does; this adapter bridges the two.
    The module itself (its ``empty_weight`` buffer, its losses) is unchanged.
    """

    def build(num_classes, matcher, weight_dict, eos_coef, losses, num_points, oversample_ratio,
              importance_sample_ratio):
        criterion = sdist_set_criterion(
            num_classes, matcher, class_weight=weight_dict["loss_ce"], mask_weight=weight_dict["loss_mask"],
            dice_weight=weight_dict["loss_dice"], num_layers=0, eos_coef=eos_coef, losses=losses,
            num_points=num_points, oversample_ratio=oversample_ratio, importance_sample_ratio=importance_sample_ratio,
        )
        criterion.weight_dict = dict(weight_dict)
        return criterion

    return build


@functools.lru_cache(maxsize=None)
def official_model_modules(root: str = None) -> types.SimpleNamespace:
    """Import what the official semantic-segmentation model needs (once)."""
    root = root or reference_root()
    names = {
        "config": "mask2former.config",
        "swin": "mask2former.modeling.backbone.swin",
        "msdeformattn": "mask2former.modeling.pixel_decoder.msdeformattn",
        "mask_former_head": "mask2former.modeling.meta_arch.mask_former_head",
        "maskformer_model": "mask2former.maskformer_model",
    }
    modules = types.SimpleNamespace(**{k: import_official_mask2former_module(v, root) for k, v in names.items()})
    model_module = modules.maskformer_model
    if not getattr(model_module.SetCriterion, "adapted_for_tests", False):
        model_module.SetCriterion = _criterion_with_the_github_signature(model_module.SetCriterion)
        model_module.SetCriterion.adapted_for_tests = True
    return modules


def official_cfg(config_file: str, *opts):
    """Config as the official ``train_net.py`` sets it up, on CPU."""
    from detectron2.config import get_cfg
    from detectron2.projects.deeplab import add_deeplab_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    official_model_modules().config.add_maskformer2_config(cfg)
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    cfg.freeze()
    return cfg


def build_official_model(cfg) -> torch.nn.Module:
    """The official model for ``cfg`` (from :func:`official_cfg`), randomly initialised."""
    from detectron2.modeling import build_model

    official_model_modules()
    with official_registries():
        model = build_model(cfg)
    assert type(model).__module__ == "mask2former.maskformer_model", type(model)
    return model
