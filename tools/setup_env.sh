#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
#
# Idempotent: a second run only checks that everything imports and exits.
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
MF2_NAME="maskformer2-0.1"
MF2_SHA256="d934e3378e86cc326129eeda18ca1097cf32d9c248dc8e957a14899d9241602a"
MF2_TARBALL="$VENV/reference/$MF2_NAME.tar.gz"
MF2_DIR="$VENV/reference/$MF2_NAME"

sha256_is() {  # FILE HASH
    [[ -f "$1" && "$(sha256sum "$1" | cut -d' ' -f1)" == "$2" ]]
}

mask2former_reference_ok() {
    sha256_is "$MF2_TARBALL" "$MF2_SHA256" && [[ -f "$MF2_DIR/mask2former/maskformer_model.py" \
        && "$(cat "$MF2_DIR/.sdist-sha256" 2>/dev/null)" == "$MF2_SHA256" ]]
}

fetch_mask2former_reference() {
    local py="$VENV/bin/python" work url
    if mask2former_reference_ok; then
        echo "[setup] reference $MF2_NAME present (sha256 verified)"
        return 0
    fi
    mkdir -p "$VENV/reference"
    work="$(mktemp -d "$VENV/reference/.fetch.XXXXXX")"
    if ! sha256_is "$MF2_TARBALL" "$MF2_SHA256"; then
        if [[ -n "${MASK2FORMER_SDIST:-}" ]]; then
            cp "$MASK2FORMER_SDIST" "$work/$MF2_NAME.tar.gz"
        else
            # pip logs the index link it picked before it gives up on the metadata.
            url="$("$py" -m pip download -vv --disable-pip-version-check --no-deps --no-binary :all: \
                    --no-build-isolation -d "$work/pip" "maskformer2==0.1" 2>&1 \
                | sed -n 's/^ *Found link \([^ #]*\/maskformer2-0\.1\.tar\.gz\).*/\1/p' | head -n 1 || true)"
            if [[ -z "$url" ]]; then
                rm -rf "$work"
                echo "[setup] ERROR: pip found no link to $MF2_NAME.tar.gz on the package index; the parity" \
                     "tests need it. Fetch it by hand and rerun with MASK2FORMER_SDIST=/path/to/it." >&2
                return 1
            fi
            echo "[setup] fetching $MF2_NAME.tar.gz (official Mask2Former sources, test reference only)"
            if ! "$py" -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
                    "$url" "$work/$MF2_NAME.tar.gz"; then
                rm -rf "$work"
                echo "[setup] ERROR: could not download $url; rerun with MASK2FORMER_SDIST=/path/to/it." >&2
                return 1
            fi
        fi
        if ! sha256_is "$work/$MF2_NAME.tar.gz" "$MF2_SHA256"; then
            rm -rf "$work"
            echo "[setup] ERROR: $MF2_NAME.tar.gz does not have the expected sha256 $MF2_SHA256" >&2
            return 1
        fi
        mv -f "$work/$MF2_NAME.tar.gz" "$MF2_TARBALL"
    fi
    mkdir -p "$work/x"
    tar --no-same-owner -xzf "$MF2_TARBALL" -C "$work/x"
    echo "$MF2_SHA256" > "$work/x/$MF2_NAME/.sdist-sha256"
    rm -rf "$MF2_DIR"
    mv "$work/x/$MF2_NAME" "$MF2_DIR"
    rm -rf "$work"
    echo "[setup] unpacked the reference sources in $MF2_DIR"
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(fingerprint)" ]] \
    && "$VENV/bin/python" -c "import torch, detectron2, gmmseg_d2" 2>/dev/null; then
    fetch_mask2former_reference
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

if "$PY" -c "import detectron2" 2>/dev/null; then
    echo "[setup] detectron2 already importable: keeping it"
else
    bash "$ROOT/tools/install_detectron2.sh" "$PY"
fi

"${PIP[@]}" -q --no-deps --no-build-isolation -e "$ROOT"
"$PY" -c "import torch, detectron2, gmmseg_d2; print('[setup] torch', torch.__version__, '| detectron2', detectron2.__version__)"
fetch_mask2former_reference
fingerprint > "$STAMP"
