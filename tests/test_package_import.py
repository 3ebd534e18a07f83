"""Importing gmmseg_d2 is quiet: the `torch.jit.script` FutureWarnings that
fvcore and Detectron2 trigger at import are filtered there, and only there."""
import subprocess
import sys

from tests.conftest import REPO_ROOT

PROBE = """
import warnings
warnings.simplefilter("default")
import gmmseg_d2
print("IMPORTED", flush=True)
import torch

def identity(x: torch.Tensor) -> torch.Tensor:
    return x

torch.jit.script(identity)  # a later call of the user's still warns
"""


def test_import_hides_exactly_the_jit_warnings_it_triggers(tmp_path):
    probe = tmp_path / "probe.py"  # a file: torch.jit.script reads the function's source
    probe.write_text(PROBE)
    run = subprocess.run([sys.executable, str(probe)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "IMPORTED"
    warned = [line for line in run.stderr.splitlines() if "FutureWarning" in line]
    # Without the filter, importing alone gives such lines (fvcore, box_regression).
    assert len(warned) == 1 and "`torch.jit.script` is deprecated" in warned[0], run.stderr[-3000:]
