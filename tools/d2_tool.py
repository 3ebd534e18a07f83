#!/usr/bin/env python
"""Run one of Detectron2's own tools on gmmseg_d2's configs.

Detectron2's ``tools/analyze_model.py``, ``benchmark.py`` and
``visualize_data.py`` build their config as ``get_cfg()`` then
``cfg.merge_from_file(...)``: on our YAML files that fails with
``KeyError: Non-existent config key`` (Mask2Former's and gmmseg_d2's keys
are not in Detectron2's defaults), and our models and datasets are not
registered. This wrapper sets both up, then runs the unmodified script in this
process as ``__main__``::

    .venv/bin/python tools/d2_tool.py analyze_model --tasks parameter \\
        --config-file configs/textures/maskformer2_R18_gmm.yaml
    .venv/bin/python tools/d2_tool.py benchmark --task eval \\
        --config-file configs/mosaic/fcn_R18_gmm.yaml MODEL.WEIGHTS output/model_final.pth
    .venv/bin/python tools/d2_tool.py visualize_data --source annotation \\
        --config-file configs/textures/fcn_R18_gmm.yaml --output-dir output/vis
    .venv/bin/python tools/d2_tool.py --script path/to/detectron2/tools/analyze_model.py ARGS...
    .venv/bin/python tools/d2_tool.py --list

A tool name is looked up in ``$DETECTRON2_TOOLS_DIR`` and in the ``tools/``
folder beside the installed ``detectron2`` package (the offline wheel ships it
in site-packages; a source checkout has it at the repository root);
``--script`` runs any other script file. Everything after the tool name (or
the script path) goes to the tool unchanged.

Before the tool runs, the wrapper

1. imports ``gmmseg_d2``, which registers its datasets, backbones, heads and
   meta-architectures with Detectron2's catalogs and registries;
2. replaces ``detectron2.config.get_cfg`` with one that returns Detectron2's
   defaults plus :func:`gmmseg_d2.config.add_gmmseg_config`'s keys
   (Mask2Former's included), and ``MODEL.DEVICE`` defaulting to ``"cpu"``
   when no GPU is available (our configs leave the device to the default;
   ``MODEL.DEVICE cuda`` on the command line still wins). ``setup_cfg``'s other
   post-merge step, ``DATASETS.FOLDER``, is not applied: name the registered
   folder datasets in ``DATASETS.TRAIN``/``TEST`` instead;
3. shims NumPy >= 2.4 for ``benchmark.py --task data``: Detectron2's
   ``detectron2/data/benchmark.py`` (``DataLoaderBenchmark._log_time``) calls
   ``np.percentile(..., interpolation="nearest")``, a keyword NumPy deprecated
   in 1.22 and removed in 2.4 (``TypeError: percentile() got an unexpected
   keyword argument 'interpolation'``). Only that module's ``np`` is replaced,
   by a view of NumPy whose ``percentile`` maps ``interpolation=`` to
   ``method=``; nothing else in the process changes.

``benchmark.py`` imports ``psutil`` (``make setup`` installs it).
"""
import argparse
import contextlib
import inspect
import os
import runpy
import sys
import types
import warnings
from typing import Iterator, List, Optional, Sequence

# Same filter as tools/train_net.py: detectron2/fvcore script functions at import.
warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)

#: The Detectron2 tools this wrapper is documented and tested with.
KNOWN_TOOLS = ("analyze_model", "benchmark", "visualize_data")
TOOLS_DIR_ENV = "DETECTRON2_TOOLS_DIR"


def detectron2_tools_dirs() -> List[str]:
    """Folders that may hold Detectron2's tool scripts, in lookup order."""
    import detectron2

    dirs = []
    if os.environ.get(TOOLS_DIR_ENV):
        dirs.append(os.path.abspath(os.environ[TOOLS_DIR_ENV]))
    # Wheel: site-packages/tools beside site-packages/detectron2; source
    # checkout (pip install -e): <repo>/tools beside <repo>/detectron2.
    dirs.append(os.path.abspath(os.path.join(os.path.dirname(detectron2.__file__), os.pardir, "tools")))
    return list(dict.fromkeys(dirs))


def find_detectron2_tool(name: str) -> str:
    """Path of Detectron2's ``tools/<name>.py``; raises FileNotFoundError saying what to do."""
    filename = name if name.endswith(".py") else f"{name}.py"
    dirs = detectron2_tools_dirs()
    for folder in dirs:
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"Detectron2's tools/{filename} is not installed here (looked in {dirs}). Take it from a Detectron2 "
        f"checkout (github.com/facebookresearch/detectron2, folder tools/) and run "
        f"`tools/d2_tool.py --script /path/to/{filename} ARGS...`, or set {TOOLS_DIR_ENV} to that tools/ folder."
    )


#: Detectron2's own ``get_cfg``, saved by :func:`gmmseg_d2_tool_environment` before it patches the name.
_DETECTRON2_GET_CFG = None


def _detectron2_get_cfg():
    import detectron2.config.config

    return (_DETECTRON2_GET_CFG or detectron2.config.config.get_cfg)()


def gmmseg_get_cfg():
    """``detectron2.config.get_cfg()`` with gmmseg_d2's keys and a CPU fallback device.

    Returns:
        a fresh, mutable CfgNode: Detectron2's defaults, Mask2Former's and
        gmmseg_d2's keys (:func:`gmmseg_d2.config.add_gmmseg_config`), and
        ``MODEL.DEVICE`` ``"cpu"`` when CUDA is unavailable.
    """
    import torch

    from gmmseg_d2.config import add_gmmseg_config

    cfg = _detectron2_get_cfg()
    add_gmmseg_config(cfg)
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def _percentile_accepts_interpolation() -> bool:
    import numpy as np

    try:
        return "interpolation" in inspect.signature(np.percentile).parameters
    except (TypeError, ValueError):  # no introspectable signature: assume the old API
        return True


class _NumpyWithPercentileInterpolation(types.ModuleType):
    """NumPy, except that ``percentile(..., interpolation=m)`` means ``method=m``."""

    def __init__(self, numpy_module: types.ModuleType):
        super().__init__(numpy_module.__name__, numpy_module.__doc__)
        self._numpy = numpy_module

    def __getattr__(self, name: str):
        return getattr(self._numpy, name)

    def percentile(self, a, q, *args, interpolation: Optional[str] = None, **kwargs):
        if interpolation is not None:
            if "method" in kwargs:
                raise TypeError("percentile() got both 'interpolation' and 'method'; pass only 'method'.")
            kwargs["method"] = interpolation
        return self._numpy.percentile(a, q, *args, **kwargs)


@contextlib.contextmanager
def numpy_percentile_shim() -> Iterator[bool]:
    """Within the block, ``detectron2.data.benchmark`` sees a NumPy that takes ``interpolation=``.

    Yields whether a shim was needed (False on NumPy < 2.4, which still takes the keyword).
    """
    import detectron2.data.benchmark as benchmark_module

    if _percentile_accepts_interpolation():
        yield False
        return
    original = benchmark_module.np
    benchmark_module.np = _NumpyWithPercentileInterpolation(original)
    try:
        yield True
    finally:
        benchmark_module.np = original


@contextlib.contextmanager
def gmmseg_d2_tool_environment() -> Iterator[None]:
    """Registrations, the patched ``get_cfg`` and the NumPy shim, undone on exit (but for the imports)."""
    import detectron2.config
    import detectron2.config.config

    import gmmseg_d2  # noqa: F401  (registers datasets, models)

    global _DETECTRON2_GET_CFG
    originals = (detectron2.config.get_cfg, detectron2.config.config.get_cfg)
    if originals[1] is not gmmseg_get_cfg:  # not already inside such a block
        _DETECTRON2_GET_CFG = originals[1]
    # Both names: scripts import it from the package, Detectron2's own helpers
    # (e.g. model_zoo) from the module.
    detectron2.config.get_cfg = detectron2.config.config.get_cfg = gmmseg_get_cfg
    try:
        with numpy_percentile_shim():
            yield
    finally:
        detectron2.config.get_cfg, detectron2.config.config.get_cfg = originals


def run_tool(script: str, args: Sequence[str]) -> None:
    """Run the script file ``script`` as ``__main__`` with command-line ``args``, set up for gmmseg_d2."""
    if not os.path.isfile(script):
        raise FileNotFoundError(f"No tool script at {script!r}; pass the path of an existing .py file to --script.")
    script = os.path.abspath(script)
    if os.path.basename(script) == "benchmark.py":
        import importlib.util

        if importlib.util.find_spec("psutil") is None:
            raise ModuleNotFoundError(
                "Detectron2's benchmark.py needs psutil, which is not installed: run `make setup` "
                "(it is in requirements.txt) or `.venv/bin/pip install psutil`.")
    saved_argv, saved_path = sys.argv, list(sys.path)
    # As `python script.py` would: argv[0] is the script, its folder leads sys.path.
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(script))
    try:
        with gmmseg_d2_tool_environment():
            runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description="Run Detectron2's tools (analyze_model, benchmark, visualize_data, or any --script) "
                    "with gmmseg_d2's config keys, datasets and models registered.",
        usage="%(prog)s {TOOL | --script PATH | --list} [TOOL ARGS...]",
    )
    parser.add_argument("--list", action="store_true", help="list the tool scripts found and exit")
    parser.add_argument("--script", metavar="PATH", help="run this script file instead of a named tool")
    # Only the wrapper's own options are parsed; the rest goes to the tool.
    own, rest = [], argv
    while rest and rest[0] in ("--list", "--script", "-h", "--help"):
        take = 2 if rest[0] == "--script" else 1
        own, rest = own + rest[:take], rest[take:]
    opts = parser.parse_args(own)
    if opts.list:
        for folder in detectron2_tools_dirs():
            if os.path.isdir(folder):
                names = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py")
                print(f"{folder}: {' '.join(names)}")
            else:
                print(f"{folder}: (missing)")
        return
    if opts.script:
        script = opts.script
    elif rest:
        script, rest = find_detectron2_tool(rest[0]), rest[1:]
    else:
        parser.error(f"name a tool ({', '.join(KNOWN_TOOLS)}) or pass --script PATH")
    run_tool(script, rest)


if __name__ == "__main__":
    main()
