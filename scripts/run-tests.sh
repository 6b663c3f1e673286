#!/usr/bin/env bash
# Everything on a fresh Debian 12 machine, as root: the test cell, the package, lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-cell.sh --multi-host --slurm
# headless Chromium for the status page test (tests/test_status_page.py)
command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
python3 -m pip install -q -e '.[test]' 2>&1 | { grep -v -e '^WARNING' -e 'pip as the .root. user' || true; }  # fails if pip fails
ruff check sheepdog_executor tests examples benchmarks
ruff format --check sheepdog_executor tests examples benchmarks
mypy sheepdog_executor
python3 -m pytest "$@"
