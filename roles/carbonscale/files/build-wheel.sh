#!/usr/bin/env bash
# Build the carbonscale wheel from a checkout into OUTDIR, reproducibly: the
# same sources give the same bytes, so copying it to nodes is idempotent.
# Built from a scratch copy so concurrent builds never share setuptools' build/.
# A wheel already built from the same sources (and python) is reused: every
# playbook run asks for one, and a test run converges many times.
set -euo pipefail
src="$1" out="$2" python="$3"
key=$(
  cd "$src"
  find pyproject.toml README.md src -type f ! -path '*/__pycache__/*' -print0 | sort -z |
    xargs -0 sha256sum
  "$python" -c 'import sys; print(sys.version)'
)
key=$(sha256sum <<<"$key" | cut -c1-16)
stamp="$out/.built-from-$key"
if [ -f "$stamp" ] && [ -f "$out/$(cat "$stamp")" ]; then
  cat "$stamp"
  exit 0
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cp -r "$src/pyproject.toml" "$src/README.md" "$src/src" "$scratch/"
find "$scratch" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p "$out"
SOURCE_DATE_EPOCH=315532800 "$python" -m pip wheel -q --no-deps --no-build-isolation \
  -w "$scratch/dist" "$scratch" 2>&1 | grep -v 'is ignored' >&2 || true
wheel=$(ls "$scratch"/dist/carbonscale-*.whl)
name=$(basename "$wheel")
# Renamed into place: a concurrent build never sees half a wheel.
cp "$wheel" "$out/.$name.$$" && mv -f "$out/.$name.$$" "$out/$name"
echo "$name" >"$out/.stamp.$$" && mv -f "$out/.stamp.$$" "$stamp"
echo "$name"
