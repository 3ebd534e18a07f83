"""tools/d2_tool.py: Detectron2's own tools (analyze_model, benchmark) run on
gmmseg_d2's configs, which they cannot load on their own; the NumPy >= 2.4 shim
for benchmark.py's data benchmark; the stand-in path for a script given by file."""
import importlib.util
import logging
import os
import runpy
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT

MASK_FORMER_CONFIG = os.path.join(REPO_ROOT, "configs", "textures", "maskformer2_R18_gmm.yaml")
FCN_CONFIG = os.path.join(REPO_ROOT, "configs", "mosaic", "fcn_R18_softmax.yaml")


@pytest.fixture(scope="module")
def d2_tool():
    spec = importlib.util.spec_from_file_location("d2_tool", os.path.join(REPO_ROOT, "tools", "d2_tool.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Records(logging.Handler):
    """Collects the messages of one logger (Detectron2's loggers do not propagate to the root)."""

    def __init__(self, name: str):
        super().__init__(logging.INFO)
        self.logger, self.messages = logging.getLogger(name), []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger.addHandler(self)
        self.previous_level = self.logger.level
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.previous_level)


def _tool(d2_tool, name):
    try:
        return d2_tool.find_detectron2_tool(name)
    except FileNotFoundError as e:
        pytest.skip(f"skipped: Detectron2's tools/{name}.py is not installed ({e})")


def _our_model(config_file, *opts):
    import argparse

    from detectron2.modeling import build_model

    from gmmseg_d2.engine import setup_cfg

    args = argparse.Namespace(config_file=config_file, opts=["MODEL.DEVICE", "cpu", *opts])
    return build_model(setup_cfg(args, default_setup_logging=False))


def test_analyze_model_counts_our_parameters_and_plain_detectron2_cannot(d2_tool, monkeypatch, one_torch_thread):
    import detectron2.config
    from detectron2.utils.analysis import parameter_count_table

    script = _tool(d2_tool, "analyze_model")
    argv = ["--tasks", "parameter", "--config-file", MASK_FORMER_CONFIG]
    # Detectron2's tool as shipped: our YAML names keys its defaults lack.
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(KeyError, match="Non-existent config key"):
        runpy.run_path(script, run_name="__main__")
    monkeypatch.undo()

    with _Records("detectron2") as logs:
        d2_tool.run_tool(script, argv)
    table = next(m for m in logs.messages if m.startswith("Parameter Count:"))
    rows = {cells[1].strip(): cells[2].strip() for cells in
            (line.split("|") for line in table.splitlines()[3:]) if len(cells) > 2}
    # The very model tools/train_net.py builds (same modules, same counts).
    ours = _our_model(MASK_FORMER_CONFIG)
    assert table == "Parameter Count:\n" + parameter_count_table(ours, max_depth=5)
    total = sum(p.numel() for p in ours.parameters())
    assert 11.75e6 < total < 11.85e6 and rows["model"] == "11.8M"
    assert "sem_seg_head.predictor" in rows and "sem_seg_head.pixel_decoder" in rows
    # The patch is undone: plain get_cfg is Detectron2's again.
    assert detectron2.config.get_cfg is detectron2.config.config.get_cfg
    assert "GMM" not in detectron2.config.get_cfg().MODEL


def test_benchmark_eval_times_our_model_on_the_mosaic(d2_tool, small_mosaic_root, monkeypatch, one_torch_thread):
    import detectron2.utils.collect_env

    script = _tool(d2_tool, "benchmark")
    # collect_env_info probes compilers for ~7 s; the benchmark itself does not need it.
    monkeypatch.setattr(detectron2.utils.collect_env, "collect_env_info", lambda: "(skipped in tests)")
    with _Records("detectron2") as logs:
        d2_tool.run_tool(script, [
            "--task", "eval", "--config-file", FCN_CONFIG,
            "DATASETS.TEST", "('mosaic_sem_seg_val',)", "INPUT.MIN_SIZE_TEST", "32", "INPUT.MAX_SIZE_TEST", "32",
        ])
    model_log = next(m for m in logs.messages if m.startswith("Model:"))
    assert model_log.splitlines()[1].startswith("PerPixelSegmentor(")
    timing = next(m for m in logs.messages if " iters in " in m)
    iters, seconds = timing.split(" iters in ")
    assert int(iters) == 300
    assert 0.0 < float(seconds.split()[0]) < 120.0, timing


def test_numpy_percentile_shim_gives_nearest_percentiles_to_the_data_benchmark(d2_tool):
    import detectron2.data.benchmark as benchmark_module

    times = [0.5, 0.01, 0.02, 0.03, 0.04, 0.2, 0.07, 0.011, 0.3, 0.09]
    if not d2_tool._percentile_accepts_interpolation():  # NumPy >= 2.4: what the shim is for
        with pytest.raises(TypeError, match="interpolation"):
            benchmark_module.DataLoaderBenchmark._log_time(None, "loader", 10.0, times)
    with _Records("detectron2.data.benchmark") as logs, d2_tool.numpy_percentile_shim():
        benchmark_module.DataLoaderBenchmark._log_time(None, "loader", 10.0, times)
    assert benchmark_module.np is np  # only inside the block
    want = [np.percentile(times, k, method="nearest") for k in (1, 5, 95, 99)]
    assert want == [0.01, 0.01, 0.5, 0.5]
    assert logs.messages == [f"loader: avg=0.1 it/s, p1={want[0]:.2g}s, p5={want[1]:.2g}s, "
                             f"p95={want[2]:.2g}s, p99={want[3]:.2g}s."]
    shimmed = d2_tool._NumpyWithPercentileInterpolation(np)
    assert shimmed.percentile(times, 50, interpolation="lower") == np.percentile(times, 50, method="lower")
    assert shimmed.mean is np.mean


def test_script_path_stand_in_sees_our_keys_and_datasets(d2_tool, tmp_path):
    # What a Detectron2-style tool does, for machines without Detectron2's tools/.
    out = tmp_path / "cfg.txt"
    script = tmp_path / "stand_in_tool.py"
    script.write_text(
        "import sys\n"
        "from detectron2.config import get_cfg\n"
        "from detectron2.data import DatasetCatalog\n"
        "cfg = get_cfg()\n"
        "cfg.merge_from_file(sys.argv[1])\n"
        "cfg.merge_from_list(sys.argv[3:])\n"
        "open(sys.argv[2], 'w').write('|'.join([cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.CLASSIFIER.NAME,\n"
        "    str(cfg.MODEL.GMM.EMBED_DIM), cfg.MODEL.DEVICE, str('textures_sem_seg_test' in DatasetCatalog.list())]))\n"
    )
    d2_tool.main(["--script", str(script), MASK_FORMER_CONFIG, str(out), "MODEL.GMM.EMBED_DIM", "32"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert out.read_text() == f"MaskFormer|gmm|32|{device}|True"
    assert sys.argv[0] != str(script)  # argv restored


def test_unknown_tool_and_missing_script_say_what_to_do(d2_tool, tmp_path):
    with pytest.raises(FileNotFoundError, match="--script .*no_such_tool.py.*DETECTRON2_TOOLS_DIR"):
        d2_tool.find_detectron2_tool("no_such_tool")
    with pytest.raises(FileNotFoundError, match="--script"):
        d2_tool.run_tool(str(tmp_path / "missing.py"), [])
