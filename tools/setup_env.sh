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

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(fingerprint)" ]] \
    && "$VENV/bin/python" -c "import torch, detectron2, gmmseg_d2" 2>/dev/null; then
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
fingerprint > "$STAMP"
