#!/usr/bin/env bash
# Create .venv with the package installed editable and the pinned tools
# (ansible from PyPI: Galaxy is not needed, the collections we use ship in it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "carbonscale needs Python >= 3.11 on the controller (\$PYTHON=$PYTHON)." >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv || {
    echo "could not create .venv: install python3-venv (apt-get install python3-venv)" >&2
    exit 1
  }
fi
.venv/bin/pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v 'is ignored' || true
# carbon's setup.py installs into /opt/graphite unless told otherwise.
GRAPHITE_NO_PREFIX=1 .venv/bin/pip install -q -e '.[dev]' 2>&1 | grep -v 'is ignored' || true
.venv/bin/python -c 'import carbonscale, ansible, molecule, carbon.hashing' || {
  echo "the .venv install is incomplete; rerun with: .venv/bin/pip install -e '.[dev]'" >&2
  exit 1
}
touch .venv/.installed
