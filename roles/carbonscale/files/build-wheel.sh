#!/usr/bin/env bash
# Build the carbonscale wheel from a checkout into OUTDIR, reproducibly: the
# same sources give the same bytes, so copying it to nodes is idempotent.
# Built from a scratch copy so concurrent builds never share setuptools' build/.
set -euo pipefail
src="$1" out="$2" python="$3"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cp -r "$src/pyproject.toml" "$src/README.md" "$src/src" "$scratch/"
find "$scratch" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p "$out"
SOURCE_DATE_EPOCH=315532800 "$python" -m pip wheel -q --no-deps --no-build-isolation \
  -w "$scratch/dist" "$scratch" 2>&1 | grep -v 'is ignored' >&2 || true
wheel=$(ls "$scratch"/dist/carbonscale-*.whl)
cp "$wheel" "$out/"
basename "$wheel"
