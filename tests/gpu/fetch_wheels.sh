#!/usr/bin/env bash
# Download the wheels of tests/gpu/wheels.txt for the GPU machine (CPython 3.12, manylinux x86-64) into
# tests/gpu/wheels/ (git-ignored; never committed). Needs PyPI.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python3}"
dest="${WHEELS:-$here/wheels}"
mkdir -p "$dest"
grep -v '^\s*#' "$here/wheels.txt" | sed '/^\s*$/d' | while read -r req; do
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "$req"
done
du -sh "$dest"
