#!/usr/bin/env bash
# Offline fallback install of detectron2's Python sources, without its C++ ops.
#
# Detectron2's authors do not publish it on PyPI. The `sal-detectron2==0.7.2`
# wheel carries upstream's Python sources (late 2024) but mislabels its tags
# and ships a `_C` extension built for another torch. We repack it as a pure
# Python wheel without `_C`; nothing in gmmseg_d2 needs `detectron2._C`.
# Users with a GPU toolchain should rather build detectron2 from source
# (see README.md), which this script never overrides.
set -euo pipefail
PY="${1:-python}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.10 --implementation cp --platform linux_x86_64 \
    -d "$WORK/dl" "sal-detectron2==0.7.2"
WHL="$(ls "$WORK"/dl/*.whl)"
"$PY" -m wheel unpack -d "$WORK/unpacked" "$WHL"
PKG="$(ls -d "$WORK"/unpacked/*/)"
rm -f "$PKG"/detectron2/_C*.so
DIST="$(ls -d "$PKG"/*.dist-info)"
sed -i '/detectron2\/_C.*\.so/d' "$DIST/RECORD"
sed -i -e 's/^Tag: .*/Tag: py3-none-any/' -e 's/^Root-Is-Purelib: .*/Root-Is-Purelib: true/' "$DIST/WHEEL"
# Its declared requirements (numpy<2, black, ...) are not its run-time needs;
# those are in requirements.txt and installed beforehand.
mkdir -p "$WORK/repacked"
"$PY" -m wheel pack -d "$WORK/repacked" "$PKG"
"$PY" -m pip install -q --disable-pip-version-check --no-deps "$WORK"/repacked/*.whl
echo "[setup] installed detectron2 (pure Python, no _C) from sal-detectron2==0.7.2"
