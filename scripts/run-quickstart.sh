#!/usr/bin/env bash
# Everything on a fresh Debian 12 machine, as root: the test cell, the package, the quickstart on it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-cell.sh
python3 -m pip install -q -e . 2>&1 | { grep -v -e '^WARNING' -e 'pip as the .root. user' || true; }  # fails if pip fails
python3 examples/quickstart.py "$@"
