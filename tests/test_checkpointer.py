"""atomic_write_bytes and AtomicDetectionCheckpointer: file modes as open() gives
them, and the clean-up of the temporaries a killed writer leaves behind
(atomicity itself: tests/test_train_net.py::test_checkpoint_write_is_atomic)."""
import json
import os
import signal
import stat
import subprocess
import sys

import pytest
import torch

from gmmseg_d2.engine import AtomicDetectionCheckpointer, write_eval_results
from gmmseg_d2.engine.checkpointer import _TEMPORARY_NAME, _host_tag, atomic_write_bytes
from tests.conftest import REPO_ROOT


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for a test (restored afterwards)."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda value: os.umask(value)
    os.umask(previous)


@pytest.mark.parametrize("mask, want", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)],
                         ids=["umask022", "umask027", "umask002"])
def test_written_files_get_the_mode_open_would_give(tmp_path, umask, mask, want):
    umask(mask)
    with open(tmp_path / "plain.txt", "w"):
        pass
    assert _mode(tmp_path / "plain.txt") == want  # what open() does, the reference
    run = tmp_path / "run"
    checkpointer = AtomicDetectionCheckpointer(torch.nn.Linear(3, 2), save_dir=str(run))
    checkpointer.save("model_0000009")
    write_eval_results({"mosaic_sem_seg_val": {"sem_seg": {"mIoU": 50.0}}}, str(run))
    for name in ("model_0000009.pth", "last_checkpoint", "eval_results.json"):
        assert _mode(run / name) == want, (name, oct(_mode(run / name)))
    assert json.loads((run / "eval_results.json").read_text())["mosaic_sem_seg_val"]["sem_seg"]["mIoU"] == 50.0


def test_rewriting_keeps_the_mode_of_the_replaced_file(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "last_checkpoint"
    atomic_write_bytes(str(target), lambda f: f.write(b"model_0000001.pth"))
    os.chmod(target, 0o660)
    atomic_write_bytes(str(target), lambda f: f.write(b"model_0000002.pth"))
    assert target.read_bytes() == b"model_0000002.pth"
    assert _mode(target) == 0o660


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_orphans_of_dead_writers_are_removed_when_the_checkpointer_starts(tmp_path):
    host, dead, alive = _host_tag(), _dead_pid(), os.getpid()
    removed = [f".model_0000009.pth.{host}.{dead}.deadbeef.tmp", f".last_checkpoint.{host}.{dead}.0badf00d.tmp"]
    kept = [
        f".model_0000009.pth.{host}.{alive}.12345678.tmp",  # a live writer (this process)
        f".model_0000009.pth.{host}x.{dead}.deadbeef.tmp",  # another host: its pids mean nothing here
        f".notes.txt.{host}.{dead}.deadbeef.tmp",  # not a file the checkpointer writes
        ".model_0000009.pth.k3j2_a1",  # not our naming (e.g. an older mkstemp temporary)
        "model_0000009.pth",
        "last_checkpoint",
    ]
    for name in removed + kept:
        (tmp_path / name).write_bytes(b"x")
    # A rank that does not write (save_to_disk False) leaves the directory alone.
    AtomicDetectionCheckpointer(torch.nn.Linear(3, 2), save_dir=str(tmp_path), save_to_disk=False)
    assert sorted(os.listdir(tmp_path)) == sorted(removed + kept)
    AtomicDetectionCheckpointer(torch.nn.Linear(3, 2), save_dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    # write_eval_results cleans its own file's orphans.
    (tmp_path / f".eval_results.json.{host}.{dead}.abcdef01.tmp").write_bytes(b"{")
    write_eval_results({}, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["eval_results.json"])


KILLED_WRITER = """
import importlib, os, signal, sys
sys.path.insert(0, sys.argv[1])
module = importlib.import_module("gmmseg_d2.engine.checkpointer")

def write_then_die(f):
    f.write(b"half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

module.atomic_write_bytes(sys.argv[2], write_then_die)
"""


def test_a_writer_killed_mid_write_leaves_an_orphan_that_the_next_start_removes(tmp_path):
    target = tmp_path / "model_0000019.pth"
    torch.save({"model": {"w": torch.ones(2)}}, target)
    before = target.read_bytes()
    child = subprocess.run([sys.executable, "-c", KILLED_WRITER, REPO_ROOT, str(target)], capture_output=True)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    orphans = [n for n in os.listdir(tmp_path) if n != target.name]
    assert len(orphans) == 1, orphans
    match = _TEMPORARY_NAME.match(orphans[0])
    assert match and match["target"] == target.name and match["host"] == _host_tag(), orphans
    assert (tmp_path / orphans[0]).read_bytes() == b"half a checkpoint"
    assert target.read_bytes() == before  # the old checkpoint is intact
    AtomicDetectionCheckpointer(torch.nn.Linear(3, 2), save_dir=str(tmp_path))
    assert os.listdir(tmp_path) == [target.name]
