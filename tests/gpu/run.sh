#!/usr/bin/env bash
# The prepared GPU check: images/s and MFU of the Ray-free training loop on one GPU (tests/gpu/check.py says what
# it measures). Sized for under 8 minutes on one H200 or H100; no Ray, no network.
#
#   tests/gpu/fetch_wheels.sh        # here, with PyPI: the wheels of tests/gpu/wheels.txt into tests/gpu/wheels/
#   tests/gpu/run.sh [check.py options, e.g. --out result.json]        # there: installs them into a temp folder
#   tests/gpu/run.sh --cpu-smoke     # tiny models, 2 steps, on the CPU, with the Python that runs it (make test)
#
# The GPU machine has torch, torchvision, timm, numpy, pillow, pyyaml, safetensors and fsspec; the rest of what the
# Ray-free loop imports, and the GPU decoder, come as wheels (WHEELS=DIR overrides tests/gpu/wheels).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
py="${PYTHON:-python3}"

if [[ "${1:-}" == "--cpu-smoke" ]]; then
  PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "$py" "$here/check.py" "$@"
fi

wheels="${WHEELS:-$here/wheels}"
missing=()
while read -r line; do
  name="${line%%#*}"; name="${name// /}"
  [[ -z "$name" ]] && continue
  file_prefix="$(echo "${name%%==*}" | tr '-' '_')-${name##*==}"
  compgen -G "$wheels/${file_prefix}-*.whl" >/dev/null || missing+=("$name")
done < "$here/wheels.txt"
if (( ${#missing[@]} )); then
  echo "error: $wheels lacks the wheels of: ${missing[*]} (run tests/gpu/fetch_wheels.sh where PyPI is reachable)" >&2
  exit 2
fi
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
PYTHONPATH="$repo:$site" PYTHONUNBUFFERED=1 "$py" "$here/check.py" "$@"
