#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
#
# Idempotent: a second run only checks that everything imports and exits.
# `bash tools/setup_env.sh --reference-only` (re)tries only the optional,
# test-only references (the official Mask2Former sources and MMSegmentation
# 0.22.1; see install_test_references below).
# Detectron2 is honoured if it already imports; otherwise it is installed from
# the offline fallback wheel (see tools/install_detectron2.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON_BIN:-python3.11}"
STAMP="$VENV/.gmmseg_d2_setup_stamp"

# The stamp records the content of the files that define the environment, so
# editing them triggers a refresh and nothing else does.
fingerprint() {
    cat "$ROOT/tools/setup_env.sh" "$ROOT/tools/install_detectron2.sh" \
        "$ROOT/requirements.txt" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1
}

# The official Mask2Former sources, as the tests' reference for checkpoint and
# output parity (tests/official_mask2former.py): the PyPI sdist maskformer2==0.1
# (facebookresearch/Mask2Former's modeling code), unpacked inside the venv, so
# nothing of it is vendored and gmmseg_d2 never imports it. pip refuses to
# install or even download it (it declares direct-URL dependencies), so pip
# only locates the file on the configured index; we fetch it and check its
# hash. Offline: MASK2FORMER_SDIST=/path/to/maskformer2-0.1.tar.gz.
#
# Test-only and optional: when it cannot be had (no network, no
# MASK2FORMER_SDIST), setup still succeeds, says what it skipped and how to
# get it later, and the parity tests skip. The stamp below never records it:
# every run checks it (a sha256 of a 110 kB file when present) and retries
# the fetch when it is missing, so a later `make setup` with network fills
# it in. SKIP_TEST_REFERENCES=1 skips the attempt (no network calls at all).
MF2_NAME="maskformer2-0.1"
MF2_SHA256="d934e3378e86cc326129eeda18ca1097cf32d9c248dc8e957a14899d9241602a"
MF2_TARBALL="$VENV/reference/$MF2_NAME.tar.gz"
MF2_DIR="$VENV/reference/$MF2_NAME"
# Bounds on the network attempt, so that an offline run fails in seconds
# instead of pip's default 5 retries x 15 s (or PIP_DEFAULT_TIMEOUT) per request.
REFERENCE_NET_TIMEOUT_S="${REFERENCE_NET_TIMEOUT_S:-20}"

sha256_is() {  # FILE HASH
    [[ -f "$1" && "$(sha256sum "$1" | cut -d' ' -f1)" == "$2" ]]
}

mask2former_reference_ok() {
    sha256_is "$MF2_TARBALL" "$MF2_SHA256" && [[ -f "$MF2_DIR/mask2former/maskformer_model.py" \
        && "$(cat "$MF2_DIR/.sdist-sha256" 2>/dev/null)" == "$MF2_SHA256" ]]
}

# Why the last fetch_mask2former_reference failed (for the skip message).
REFERENCE_PROBLEM=""

# Returns 0 with the reference in place, 1 (REFERENCE_PROBLEM set, nothing
# half-written left behind) otherwise. Every step checks its own status: the
# function runs in an `if` context, where `set -e` does not apply.
fetch_mask2former_reference() {
    local py work url
    py="$VENV/bin/python"
    [[ -x "$py" ]] || py="$PYTHON_BIN"
    if mask2former_reference_ok; then
        echo "[setup] reference $MF2_NAME present (sha256 verified)"
        return 0
    fi
    mkdir -p "$VENV/reference" && work="$(mktemp -d "$VENV/reference/.fetch.XXXXXX")" || {
        REFERENCE_PROBLEM="cannot create a work folder in $VENV/reference"; return 1; }
    if ! sha256_is "$MF2_TARBALL" "$MF2_SHA256"; then
        if [[ -n "${MASK2FORMER_SDIST:-}" ]]; then
            if ! cp "$MASK2FORMER_SDIST" "$work/$MF2_NAME.tar.gz" 2>/dev/null; then
                rm -rf "$work"
                REFERENCE_PROBLEM="MASK2FORMER_SDIST='$MASK2FORMER_SDIST' is not a readable file"
                return 1
            fi
        else
            # pip logs the index link it picked before it gives up on the metadata.
            url="$("$py" -m pip download -vv --disable-pip-version-check --no-deps --no-binary :all: \
                    --no-build-isolation --retries 1 --timeout "$REFERENCE_NET_TIMEOUT_S" \
                    -d "$work/pip" "maskformer2==0.1" 2>&1 \
                | sed -n 's/^ *Found link \([^ #]*\/maskformer2-0\.1\.tar\.gz\).*/\1/p' | head -n 1 || true)"
            if [[ -z "$url" ]]; then
                rm -rf "$work"
                REFERENCE_PROBLEM="pip found no link to $MF2_NAME.tar.gz on the configured package index (offline?)"
                return 1
            fi
            echo "[setup] fetching $MF2_NAME.tar.gz (official Mask2Former sources, test reference only)"
            if ! "$py" -c 'import shutil, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[3])) as r, open(sys.argv[2], "wb") as f:
    shutil.copyfileobj(r, f)' "$url" "$work/$MF2_NAME.tar.gz" "$REFERENCE_NET_TIMEOUT_S" 2>/dev/null; then
                rm -rf "$work"
                REFERENCE_PROBLEM="could not download $url"
                return 1
            fi
        fi
        if ! sha256_is "$work/$MF2_NAME.tar.gz" "$MF2_SHA256"; then
            rm -rf "$work"
            REFERENCE_PROBLEM="the $MF2_NAME.tar.gz obtained does not have the expected sha256 $MF2_SHA256"
            return 1
        fi
        mv -f "$work/$MF2_NAME.tar.gz" "$MF2_TARBALL" || {
            rm -rf "$work"; REFERENCE_PROBLEM="cannot write $MF2_TARBALL"; return 1; }
    fi
    if ! { mkdir -p "$work/x" && tar --no-same-owner -xzf "$MF2_TARBALL" -C "$work/x" \
            && echo "$MF2_SHA256" > "$work/x/$MF2_NAME/.sdist-sha256" \
            && rm -rf "$MF2_DIR" && mv "$work/x/$MF2_NAME" "$MF2_DIR"; }; then
        rm -rf "$work"
        REFERENCE_PROBLEM="cannot unpack $MF2_TARBALL into $MF2_DIR"
        return 1
    fi
    rm -rf "$work"
    echo "[setup] unpacked the reference sources in $MF2_DIR"
}

# MMSegmentation 0.22.1's MiT backbone and SegFormer head, as the tests'
# reference for the MiT/SegFormer ports (tests/official_mmseg.py): pip installs
# the pinned, hash-checked files below with --no-deps into their own folder,
# $VENV/reference/mmseg-0.22.1, which only that loader puts on sys.path; the
# venv's site-packages is never touched. Only what mmseg's mit.py and
# segformer_head.py import and the venv lacks: mmcv (pure Python, built from
# its sdist without the compiled ops), addict and yapf (both imported by
# mmcv.utils.config). numpy, torch, yaml, cv2, PIL, packaging come from the venv.
# mmcv's setup.py imports pkg_resources, which the venv's setuptools (84.x)
# no longer ships, so --no-build-isolation fails: its wheel is built in pip's
# isolated build environment instead, with setuptools pinned to 80.9.0, a
# release that still ships pkg_resources (no torch there: no ops either way).
# Offline: MMSEG_REFERENCE_WHEELHOUSE=/folder holding the four files pinned
# below plus setuptools-80.9.0-py3-none-any.whl (pip installs from it alone).
#
# Optional like the Mask2Former sources: skipped with a message when it cannot
# be had, retried on the next run, SKIP_TEST_REFERENCES=1 makes no attempt. A
# stamp in the folder records the pins, so a later run only checks files.
MMSEG_NAME="mmseg-0.22.1"
MMSEG_DIR="$VENV/reference/$MMSEG_NAME"
MMSEG_STAMP="$MMSEG_DIR/.reference-stamp"
MMSEG_REQUIREMENTS="mmcv==1.7.2 --hash=sha256:2116a1609f9d3f59824074774366fd8b9410437bc95a24d535669b35d55352be
mmsegmentation==0.22.1 --hash=sha256:d4c94e9f8304880f49c0d552d147c72e1a354ba382aa1ed84bf669faefba2197
addict==2.4.0 --hash=sha256:249bb56bbfd3cdc2a004ea0ff4c2b6ddc84d53bc2194761636eb314d5cfa5dfc
yapf==0.32.0 --hash=sha256:8fea849025584e486fd06d6ba2bed717f396080fd3cc236ba10cb97c4c51cf32"
MMSEG_BUILD_CONSTRAINT="setuptools==80.9.0"
# What the folder may hold: pip --target also writes the wheels' stray
# top-level packages (mmsegmentation ships its own `tests`, which would shadow
# ours; yapf ships `yapftests`) and console scripts; those are dropped.
MMSEG_KEEP=(mmcv mmcv-1.7.2.dist-info mmseg mmsegmentation-0.22.1.dist-info
            addict addict-2.4.0.dist-info yapf yapf-0.32.0.dist-info)

mmseg_stamp_text() {
    printf '%s\n%s\n' "$MMSEG_REQUIREMENTS" "$MMSEG_BUILD_CONSTRAINT" | sha256sum | cut -d' ' -f1
}

mmseg_reference_ok() {
    [[ -f "$MMSEG_DIR/mmseg/models/backbones/mit.py" && -f "$MMSEG_DIR/mmseg/models/decode_heads/segformer_head.py" \
        && -f "$MMSEG_DIR/mmcv/__init__.py" && -f "$MMSEG_DIR/addict/__init__.py" && -f "$MMSEG_DIR/yapf/__init__.py" \
        && "$(cat "$MMSEG_STAMP" 2>/dev/null)" == "$(mmseg_stamp_text)" ]]
}

# Returns 0 with the reference in place, 1 (REFERENCE_PROBLEM set, nothing
# half-written left behind: pip installs into a work folder that is moved
# into place only when complete) otherwise.
install_mmseg_reference() {
    local py work entry log t0 source_opts=() constraint_opts=() env_vars=(MMCV_WITH_OPS=0)
    if mmseg_reference_ok; then
        echo "[setup] reference $MMSEG_NAME present (stamp verified)"
        return 0
    fi
    # The folder is built for the venv's interpreter (pip compiles its
    # bytecode, the tests import it): without the venv there is nothing to build for.
    py="$VENV/bin/python"
    if [[ ! -x "$py" ]]; then
        REFERENCE_PROBLEM="no interpreter at $py to install it for (create the venv first: make setup)"
        return 1
    fi
    if [[ -n "${MMSEG_REFERENCE_WHEELHOUSE:-}" ]]; then
        if [[ ! -d "$MMSEG_REFERENCE_WHEELHOUSE" ]]; then
            REFERENCE_PROBLEM="MMSEG_REFERENCE_WHEELHOUSE='$MMSEG_REFERENCE_WHEELHOUSE' is not a folder"
            return 1
        fi
        source_opts=(--no-index --find-links "$MMSEG_REFERENCE_WHEELHOUSE")
    fi
    mkdir -p "$VENV/reference" && work="$(mktemp -d "$VENV/reference/.install.XXXXXX")" || {
        REFERENCE_PROBLEM="cannot create a work folder in $VENV/reference"; return 1; }
    printf '%s\n' "$MMSEG_REQUIREMENTS" > "$work/requirements.txt" \
        && printf '%s\n' "$MMSEG_BUILD_CONSTRAINT" > "$work/build-constraints.txt" || {
        rm -rf "$work"; REFERENCE_PROBLEM="cannot write to $work"; return 1; }
    # pip < 25.3 has no --build-constraint; it applied PIP_CONSTRAINT to build
    # environments instead (and its build environment also wants `wheel`).
    if "$py" -m pip install --help 2>/dev/null | grep -q -- "--build-constraint"; then
        constraint_opts=(--build-constraint "$work/build-constraints.txt")
    else
        env_vars+=(PIP_CONSTRAINT="$work/build-constraints.txt")
    fi
    log="$work/pip.log"
    t0=$SECONDS
    echo "[setup] installing $MMSEG_NAME (mmcv 1.7.2 without ops, mmsegmentation 0.22.1; test reference only) into $MMSEG_DIR"
    if ! env "${env_vars[@]}" "$py" -m pip install --disable-pip-version-check --no-cache-dir --no-deps --require-hashes \
            --no-warn-script-location --retries 1 --timeout "$REFERENCE_NET_TIMEOUT_S" \
            "${source_opts[@]}" "${constraint_opts[@]}" --target "$work/target" \
            -r "$work/requirements.txt" > "$log" 2>&1; then
        REFERENCE_PROBLEM="pip could not install it, offline? (pip's last error: $(grep -E 'ERROR|^error' "$log" | tail -n 1 | sed 's/^ *//' | cut -c1-300))"
        rm -rf "$work"
        return 1
    fi
    if ! mkdir "$work/keep"; then
        rm -rf "$work"; REFERENCE_PROBLEM="cannot write to $work"; return 1
    fi
    for entry in "${MMSEG_KEEP[@]}"; do
        if ! mv "$work/target/$entry" "$work/keep/"; then
            rm -rf "$work"
            REFERENCE_PROBLEM="pip's install lacks $entry (see the pins in tools/setup_env.sh)"
            return 1
        fi
    done
    if ! { mmseg_stamp_text > "$work/keep/.reference-stamp" && rm -rf "$MMSEG_DIR" && mv "$work/keep" "$MMSEG_DIR"; }; then
        rm -rf "$work" "$MMSEG_DIR"
        REFERENCE_PROBLEM="cannot move the installed folder into $MMSEG_DIR"
        return 1
    fi
    rm -rf "$work"
    echo "[setup] installed $MMSEG_NAME in $MMSEG_DIR ($((SECONDS - t0)) s, $(du -sh "$MMSEG_DIR" | cut -f1))"
}

# The tests that read a reference, by loader module (they skip without it).
reference_tests() {  # LOADER_MODULE
    (cd "$ROOT" && grep -lE "from tests\.$1 import" tests/test_*.py 2>/dev/null | tr '\n' ' ')
}

# Every test-only reference, each optional: never fails the setup.
install_test_references() {
    local why
    if [[ "${SKIP_TEST_REFERENCES:-0}" == "1" ]] && ! mask2former_reference_ok; then
        why="SKIP_TEST_REFERENCES=1"
    elif fetch_mask2former_reference; then
        why=""
    else
        why="$REFERENCE_PROBLEM"
    fi
    if [[ -n "$why" ]]; then
        {
            echo "[setup] SKIPPED (test-only, optional): the official Mask2Former sources $MF2_NAME: $why."
            echo "[setup]   gmmseg_d2 itself never needs them; the official-parity tests in $(reference_tests official_mask2former)will skip."
            echo "[setup]   To install them later: rerun \`make setup\` with network access, or offline"
            echo "[setup]     MASK2FORMER_SDIST=/path/to/$MF2_NAME.tar.gz make setup"
            echo "[setup]   (only this step: bash tools/setup_env.sh --reference-only; sha256 $MF2_SHA256)"
        } >&2
    fi
    if [[ "${SKIP_TEST_REFERENCES:-0}" == "1" ]] && ! mmseg_reference_ok; then
        why="SKIP_TEST_REFERENCES=1"
    elif install_mmseg_reference; then
        why=""
    else
        why="$REFERENCE_PROBLEM"
    fi
    if [[ -n "$why" ]]; then
        {
            echo "[setup] SKIPPED (test-only, optional): the MMSegmentation reference $MMSEG_NAME (MiT, SegFormer head): $why."
            echo "[setup]   gmmseg_d2 itself never needs it; the MiT/SegFormer parity tests in $(reference_tests official_mmseg)will skip."
            echo "[setup]   To install it later: rerun \`make setup\` with network access (PyPI), or offline"
            echo "[setup]     MMSEG_REFERENCE_WHEELHOUSE=/folder make setup"
            echo "[setup]   with the folder holding mmcv-1.7.2.tar.gz, mmsegmentation-0.22.1-py3-none-any.whl,"
            echo "[setup]   addict-2.4.0-py3-none-any.whl, yapf-0.32.0-py2.py3-none-any.whl, setuptools-80.9.0-py3-none-any.whl"
            echo "[setup]   (only this step: bash tools/setup_env.sh --reference-only; pins and sha256s in tools/setup_env.sh)"
        } >&2
    fi
    return 0
}

case "${1:-}" in
    "") ;;
    --reference-only)
        install_test_references
        exit 0
        ;;
    -h|--help)
        echo "usage: bash tools/setup_env.sh [--reference-only]"
        echo "  (no option)       create or check $VENV, then the test-only references"
        echo "  --reference-only  only (re)try the test-only references in $VENV/reference"
        echo "                    ($MF2_NAME: official Mask2Former sources; $MMSEG_NAME: mmcv + mmsegmentation"
        echo "                    for the MiT/SegFormer parity tests)"
        echo "  env: VENV, PYTHON_BIN, MASK2FORMER_SDIST=/path/to/$MF2_NAME.tar.gz,"
        echo "       MMSEG_REFERENCE_WHEELHOUSE=/folder (offline $MMSEG_NAME), SKIP_TEST_REFERENCES=1,"
        echo "       REFERENCE_NET_TIMEOUT_S (default 20)"
        exit 0
        ;;
    *)
        echo "[setup] ERROR: unknown option '$1'; see bash tools/setup_env.sh --help" >&2
        exit 2
        ;;
esac

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(fingerprint)" ]] \
    && "$VENV/bin/python" -c "import torch, detectron2, gmmseg_d2" 2>/dev/null; then
    install_test_references
    echo "[setup] .venv is up to date"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[setup] creating $VENV with $PYTHON_BIN"
    "$PYTHON_BIN" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)

"${PIP[@]}" -q --upgrade pip wheel setuptools
# torch/torchvision first and pinned, so nothing later can pull another build.
"${PIP[@]}" -q "torch==2.14.1" "torchvision==0.29.1"
"${PIP[@]}" -q -r "$ROOT/requirements.txt"
# projects/GSS's VQ-VAE: OpenAI's dVAE modules (torch only at run time). Its
# metadata also pulls mypy, pytest, blobfile, torchvision for its own tests
# and URL loading, none of which its modules import; attrs and requests, which
# they do import, are in requirements.txt.
"${PIP[@]}" -q --no-deps "DALL-E==0.1"

if "$PY" -c "import detectron2" 2>/dev/null; then
    echo "[setup] detectron2 already importable: keeping it"
else
    bash "$ROOT/tools/install_detectron2.sh" "$PY"
fi

"${PIP[@]}" -q --no-deps --no-build-isolation -e "$ROOT"
"$PY" -c "import torch, detectron2, gmmseg_d2; print('[setup] torch', torch.__version__, '| detectron2', detectron2.__version__)"
# The stamp covers the environment only, never the optional references:
# install_test_references runs (and retries) on every call.
install_test_references
fingerprint > "$STAMP"
