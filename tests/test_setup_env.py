"""The optional test-only reference of tools/setup_env.sh (--reference-only on a
scratch VENV, never the real .venv) and the parity tests' skip when it is absent."""
import os
import shutil
import subprocess
import sys

import pytest

from tests import official_mask2former
from tests.conftest import REPO_ROOT

SETUP = os.path.join(REPO_ROOT, "tools", "setup_env.sh")
REAL_TARBALL = os.path.join(sys.prefix, "reference", f"{official_mask2former.SDIST_NAME}.tar.gz")


def _reference_step(venv, **env):
    inherited = {k: v for k, v in os.environ.items() if k not in ("SKIP_TEST_REFERENCES", "MASK2FORMER_SDIST")}
    full_env = {**inherited, "VENV": str(venv), **env}
    return subprocess.run(["bash", SETUP, "--reference-only"], env=full_env, capture_output=True, text=True,
                          timeout=120)


def _assert_skipped(run, reason):
    assert run.returncode == 0, run.stderr
    assert "SKIPPED (test-only, optional)" in run.stderr and reason in run.stderr, run.stderr
    # Which tests skip, and how to install it later.
    assert "tests/test_mask2former_parity.py" in run.stderr and "tests/test_pixel_decoder.py" in run.stderr
    assert "MASK2FORMER_SDIST=/path/to/maskformer2-0.1.tar.gz make setup" in run.stderr
    assert "rerun `make setup` with network access" in run.stderr


def test_unavailable_reference_is_skipped_with_instructions_and_leaves_nothing(tmp_path):
    venv = tmp_path / "venv"
    _assert_skipped(_reference_step(venv, MASK2FORMER_SDIST=str(tmp_path / "missing.tar.gz")), "not a readable file")
    (tmp_path / "wrong.tar.gz").write_bytes(b"not the sdist")
    _assert_skipped(_reference_step(venv, MASK2FORMER_SDIST=str(tmp_path / "wrong.tar.gz")), "expected sha256")
    _assert_skipped(_reference_step(venv, SKIP_TEST_REFERENCES="1"), "SKIP_TEST_REFERENCES=1")
    # No half-written tarball, unpacked tree or work folder is left behind.
    assert os.listdir(venv / "reference") == []


def test_reference_from_a_local_sdist_is_installed_once_then_only_checked(tmp_path):
    if not os.path.isfile(REAL_TARBALL):
        pytest.skip(f"skipped: reference not installed ({REAL_TARBALL} is missing; {official_mask2former.INSTALL_HINT})")
    venv = tmp_path / "venv"
    copy = tmp_path / "maskformer2-0.1.tar.gz"
    shutil.copy(REAL_TARBALL, copy)
    first = _reference_step(venv, MASK2FORMER_SDIST=str(copy))
    assert first.returncode == 0 and "unpacked the reference sources" in first.stdout, first.stderr
    root = venv / "reference" / official_mask2former.SDIST_NAME
    assert (root / "mask2former" / "maskformer_model.py").is_file()
    # A second run verifies the hash and touches nothing (no network, no unpacking).
    second = _reference_step(venv)
    # Nothing about Mask2Former on stderr (the MMSegmentation step skips there: this venv has no interpreter).
    assert second.returncode == 0 and "present (sha256 verified)" in second.stdout
    assert "Mask2Former" not in second.stderr, second.stderr
    assert sorted(os.listdir(venv / "reference")) == ["maskformer2-0.1", "maskformer2-0.1.tar.gz"]


def test_unknown_option_is_refused():
    run = subprocess.run(["bash", SETUP, "--no-such-option"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--help" in run.stderr


def test_parity_tests_skip_without_the_reference_and_say_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.delenv(official_mask2former.REFERENCE_ENV, raising=False)
    monkeypatch.delenv(official_mask2former.REQUIRE_ENV, raising=False)
    monkeypatch.setattr(official_mask2former.sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setattr(official_mask2former, "REPO_ROOT", str(tmp_path / "repo"))
    with pytest.raises(pytest.skip.Exception, match=r"skipped: reference not installed .*MASK2FORMER_SDIST=.*make setup"):
        official_mask2former.reference_root()
    # CI can insist on it; an explicit but wrong location is an error too.
    monkeypatch.setenv(official_mask2former.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="GMMSEG_REQUIRE_REFERENCE=1"):
        official_mask2former.reference_root()
    monkeypatch.delenv(official_mask2former.REQUIRE_ENV)
    monkeypatch.setenv(official_mask2former.REFERENCE_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(pytest.fail.Exception, match="holds no mask2former"):
        official_mask2former.reference_root()
