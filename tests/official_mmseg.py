"""MMSegmentation 0.22.1's MiT backbone and SegFormer head as a test-time reference.

``tools/setup_env.sh`` installs, with ``pip --no-deps --require-hashes
--target``, the pinned files ``mmcv==1.7.2`` (its sdist built without the
compiled ops, ``MMCV_WITH_OPS=0``), ``mmsegmentation==0.22.1``,
``addict==2.4.0`` and ``yapf==0.32.0`` into ``<venv>/reference/mmseg-0.22.1``.
Nothing of it is vendored, the venv's site-packages is untouched and
gmmseg_d2 never imports it: only the MiT/SegFormer parity tests do, through
this module (:func:`official_mit_class`, :func:`official_segformer_head_class`).
``MMSEG_REFERENCE_ROOT`` points elsewhere (the folder holding ``mmseg/`` and
``mmcv/``, or the ``mmseg/`` package folder itself).

The reference is optional (setup skips it offline): without it the tests that
need it skip, naming the command that installs it. They fail instead when
``MMSEG_REFERENCE_ROOT`` names a folder without it (an explicit request that
cannot be met) or when ``GMMSEG_REQUIRE_REFERENCE=1`` is set (for CI runs
that must not skip the parity checks silently).

What the folder holds, and why only that: ``mmseg/models/backbones/mit.py`` and
``mmseg/models/decode_heads/segformer_head.py`` import, besides torch, only
mmcv (``mmcv.cnn``, ``mmcv.runner``, ``mmcv.utils``), and importing mmcv
needs addict and yapf (``mmcv.utils.config`` imports both at module level);
numpy, PyYAML, OpenCV, Pillow, packaging and torch come from the venv.
``prettytable`` and the rest of mmsegmentation's requirements belong to code
these two modules never import. The wheels also carry stray top-level
packages (mmsegmentation ships its own ``tests`` package, which would shadow
this one; yapf ships ``yapftests``); setup drops them, and
:func:`mmseg_reference_root` refuses a folder holding anything but
:data:`EXPECTED_TOP_LEVEL`, so that the folder cannot shadow a package of the
venv.

What the import works around (:func:`_import_official_modules`), and why:

1. ``mmseg/__init__.py`` asserts ``1.3.13 <= mmcv <= 1.5.0`` at import; the
   reference uses mmcv 1.7.2. While that file runs, ``mmcv.__version__`` reads
   ``"1.5.0"`` (the highest version it accepts); then the real version is put
   back, and ``mmseg.mmcv_version`` (which mit.py reads lazily, at
   construction, to fall back to a legacy attention forward for mmcv < 1.3.17)
   is recomputed from it. Nothing else reads the patched value.
2. ``mmseg/models/__init__.py`` imports every model and loss, and
   ``mmseg/models/losses/focal_loss.py`` imports the compiled ``mmcv.ops``,
   which an ops-less mmcv lacks; ``mmseg/core/__init__.py`` pulls in the
   evaluation code and its dependencies. So ``mmseg.models``,
   ``mmseg.models.backbones``, ``mmseg.models.decode_heads``,
   ``mmseg.models.losses`` and ``mmseg.core`` are installed as empty packages
   (pointing at the real folders), and only the modules that mit.py and
   segformer_head.py need are imported from them (``mmseg.models.builder``,
   ``mmseg.models.utils``, ``mmseg.ops``, ``mmseg.core.seg``, the accuracy
   and cross-entropy losses, ``decode_head``). The two names those modules
   take from the emptied packages, ``accuracy`` and ``build_pixel_sampler``,
   are bound to the same objects the real ``__init__`` files would bind. The
   cross-entropy loss is imported because ``BaseDecodeHead`` builds its
   default loss from mmseg's ``LOSSES`` registry when constructed.
3. ``mmcv.cnn.bricks.transformer`` tries ``mmcv.ops`` for
   ``MultiScaleDeformableAttention`` and warns when it is absent; mmcv warns
   about its 2.0 release and yapf 0.32 about the deprecated ``lib2to3``.
   These three known warnings are silenced during the import; any other is
   left alone.

What stays behind after the import: ``mmcv``, ``mmseg``, ``addict``, ``yapf``
(names the venv does not have) in ``sys.modules``, with the emptied packages
above (a later ``import mmseg.models`` gets the empty one). The folder is on
``sys.path`` only during the import (later submodule imports resolve through
the packages' ``__path__``); no import hook is added; the registries filled
are mmseg's own (mmcv ``Registry`` objects), never Detectron2's. One effect is
the venv's, not the reference's: ``mmcv.utils.parrots_wrapper`` imports
``torch.utils.cpp_extension`` (to read ``CUDA_HOME``), which imports the venv's
setuptools, which appends its ``setuptools/_vendor`` folder to ``sys.path``
(as in any process importing it); being last, it shadows nothing the venv has.
"""
import functools
import importlib
import os
import sys
import types
import warnings

import pytest

REFERENCE_ENV = "MMSEG_REFERENCE_ROOT"
REQUIRE_ENV = "GMMSEG_REQUIRE_REFERENCE"
FOLDER_NAME = "mmseg-0.22.1"
MMCV_VERSION = "1.7.2"
MMSEG_VERSION = "0.22.1"
#: The highest mmcv version mmsegmentation 0.22.1's ``__init__`` accepts.
MMSEG_MMCV_MAX = "1.5.0"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Everything (but dot files) the reference folder may hold.
EXPECTED_TOP_LEVEL = frozenset({
    "mmcv", f"mmcv-{MMCV_VERSION}.dist-info", "mmseg", f"mmsegmentation-{MMSEG_VERSION}.dist-info",
    "addict", "addict-2.4.0.dist-info", "yapf", "yapf-0.32.0.dist-info",
})

#: mmseg packages whose ``__init__`` is not run (see the module docstring, point 2).
EMPTIED_PACKAGES = ("mmseg.models", "mmseg.models.backbones", "mmseg.models.decode_heads",
                    "mmseg.models.losses", "mmseg.core")

#: The known, harmless warnings of the import (module docstring, point 3).
SILENCED_WARNINGS = (
    r"lib2to3 package is deprecated",
    r"On January 1, 2023, MMCV will release v2\.0\.0",
    r"Fail to import ``MultiScaleDeformableAttention`` from ``mmcv\.ops",
)

#: How to install the reference, for skip and failure messages.
INSTALL_HINT = (
    "install it with `make setup` (network access to PyPI) or, offline, `MMSEG_REFERENCE_WHEELHOUSE=/folder "
    "make setup` with the pinned files named in tools/setup_env.sh (only that step: "
    f"`bash tools/setup_env.sh --reference-only`), or set {REFERENCE_ENV} to a folder holding mmseg/ and mmcv/"
)


def _holds_reference(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, *rel)) for rel in (
        ("mmseg", "models", "backbones", "mit.py"),
        ("mmseg", "models", "decode_heads", "segformer_head.py"),
        ("mmcv", "__init__.py"),
    ))


def mmseg_reference_root() -> str:
    """The folder holding ``mmseg/``, ``mmcv/``, ``addict/`` and ``yapf/``.

    Skips the calling test when the reference is not installed (see the
    module docstring for when it fails instead), and fails when the folder
    holds more than :data:`EXPECTED_TOP_LEVEL`.
    """
    explicit = os.environ.get(REFERENCE_ENV)
    if explicit:
        candidates = [explicit, os.path.dirname(os.path.normpath(explicit))]
    else:
        candidates = [os.path.join(sys.prefix, "reference", FOLDER_NAME),
                      os.path.join(REPO_ROOT, ".venv", "reference", FOLDER_NAME)]
    candidates = list(dict.fromkeys(os.path.abspath(c) for c in candidates))
    for folder in candidates:
        if _holds_reference(folder):
            unexpected = sorted(e for e in os.listdir(folder) if not e.startswith(".") and e not in EXPECTED_TOP_LEVEL)
            if unexpected:
                pytest.fail(f"The mmseg reference folder {folder} holds {unexpected}, which could shadow the venv's "
                            f"packages on sys.path; it may hold only {sorted(EXPECTED_TOP_LEVEL)}. Remove it and "
                            "reinstall with `bash tools/setup_env.sh --reference-only`.", pytrace=False)
            return folder
    if explicit:
        pytest.fail(f"{REFERENCE_ENV}={explicit!r} holds no mmseg/models/backbones/mit.py, "
                    f"mmseg/models/decode_heads/segformer_head.py and mmcv/ (looked in {candidates}); point it at "
                    f"the {FOLDER_NAME} folder that tools/setup_env.sh installs.", pytrace=False)
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"The MMSegmentation reference {FOLDER_NAME} is missing (looked in {candidates}) and "
                    f"{REQUIRE_ENV}=1; {INSTALL_HINT}.", pytrace=False)
    pytest.skip(f"skipped: reference not installed (MMSegmentation {MMSEG_VERSION} with mmcv {MMCV_VERSION}, "
                f"looked in {candidates}); {INSTALL_HINT}.")


def _inside(path: str, root: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(root) + os.sep)


def _check_not_imported_elsewhere(root: str) -> None:
    """An mmcv or mmseg imported from another place would be mixed with ours."""
    for name in ("mmcv", "mmseg", "addict", "yapf"):
        module = sys.modules.get(name)
        location = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), None)
        if module is not None and (location is None or not _inside(location, root)):
            raise RuntimeError(f"{name} is already imported from {location}, not from the reference in {root}; "
                               "import the reference before anything else imports that package.")


def _import_mmseg_with_the_real_mmcv(mmcv) -> types.ModuleType:
    """Import ``mmseg`` past its mmcv version cap (module docstring, point 1)."""
    real_version = mmcv.__version__
    mmcv.__version__ = MMSEG_MMCV_MAX
    try:
        mmseg = importlib.import_module("mmseg")
    finally:
        mmcv.__version__ = real_version
    mmseg.mmcv_version = mmseg.digit_version(real_version)
    return mmseg


def _empty_package(name: str, root: str) -> types.ModuleType:
    package = types.ModuleType(name)
    package.__path__ = [os.path.join(root, *name.split("."))]
    package.__package__ = name
    sys.modules[name] = package
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, package)
    return package


def _import_official_modules(root: str) -> types.SimpleNamespace:
    """Import mit.py and segformer_head.py from ``root`` (see the module docstring)."""
    _check_not_imported_elsewhere(root)
    if "mmseg.models.backbones.mit" in sys.modules:
        return types.SimpleNamespace(mit=sys.modules["mmseg.models.backbones.mit"],
                                     segformer_head=sys.modules["mmseg.models.decode_heads.segformer_head"])
    added_to_path = root not in sys.path
    if added_to_path:
        # Appended, never prepended: the venv's own packages always win.
        sys.path.append(root)
    created = []
    try:
        with warnings.catch_warnings():
            for message in SILENCED_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            mmcv = importlib.import_module("mmcv")
            if not _inside(mmcv.__file__, root) or mmcv.__version__ != MMCV_VERSION:
                raise RuntimeError(f"imported mmcv {mmcv.__version__} from {mmcv.__file__}, expected mmcv "
                                   f"{MMCV_VERSION} from {root}; reinstall the reference.")
            mmseg = _import_mmseg_with_the_real_mmcv(mmcv)
            if mmseg.__version__ != MMSEG_VERSION:
                raise RuntimeError(f"{root} holds mmseg {mmseg.__version__}, expected {MMSEG_VERSION}; "
                                   "reinstall the reference.")
            for name in EMPTIED_PACKAGES:
                if name not in sys.modules:
                    created.append(name)
                    _empty_package(name, root)
            # What the real __init__ files would bind and decode_head.py imports from them.
            sys.modules["mmseg.core"].build_pixel_sampler = importlib.import_module(
                "mmseg.core.seg").build_pixel_sampler
            losses = sys.modules["mmseg.models.losses"]
            losses.accuracy = importlib.import_module("mmseg.models.losses.accuracy").accuracy
            losses.CrossEntropyLoss = importlib.import_module(
                "mmseg.models.losses.cross_entropy_loss").CrossEntropyLoss
            mit = importlib.import_module("mmseg.models.backbones.mit")
            segformer_head = importlib.import_module("mmseg.models.decode_heads.segformer_head")
    except BaseException:
        # A failed attempt leaves no emptied package behind for the next one to trip on.
        for name in [m for m in sys.modules if any(m == c or m.startswith(c + ".") for c in created)]:
            del sys.modules[name]
        raise
    finally:
        if added_to_path and root in sys.path:
            sys.path.remove(root)
    return types.SimpleNamespace(mit=mit, segformer_head=segformer_head)


@functools.lru_cache(maxsize=None)
def _official_modules(root: str) -> types.SimpleNamespace:
    return _import_official_modules(root)


def official_mit_class() -> type:
    """mmseg 0.22.1's ``MixVisionTransformer`` (mmseg/models/backbones/mit.py).

    Its forward maps an image (N, 3, H, W) to four maps (N, C_i, H / s_i, W / s_i)
    with strides s = 4, 8, 16, 32 (for ``out_indices=(0, 1, 2, 3)``).
    """
    return _official_modules(mmseg_reference_root()).mit.MixVisionTransformer


def official_segformer_head_class() -> type:
    """mmseg 0.22.1's ``SegformerHead`` (mmseg/models/decode_heads/segformer_head.py).

    Its forward maps the backbone's list of maps (N, C_i, H_i, W_i) to logits
    (N, num_classes, H_0, W_0) at the first map's resolution.
    """
    return _official_modules(mmseg_reference_root()).segformer_head.SegformerHead
