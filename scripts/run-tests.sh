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
# The cells share two cores with everything else on the machine: a failed test runs once more, and
# pytest's summary counts every rerun, so a flaky test still shows.
# With arguments, one pytest over them; without, the whole suite as two lanes at once
# (scripts/run_lanes.py: cell tests mostly wait, so two pytest processes take far less time than one).
if [ $# -gt 0 ]; then
  python3 -m pytest --reruns 1 --reruns-delay 5 --durations=15 "$@"
  exit 0
fi
status=0
python3 scripts/run_lanes.py -- --reruns 1 --reruns-delay 5 --durations=10 || status=$?

# The other supported Pythons: the tests marked `pythons` (the unit tests and a short cell subset)
# with a client of that version and the same version on the nodes (scripts/test-cell.sh copies it
# to /opt/sheepdog-pythons), both versions at once. They run even when a lane failed, so one run
# shows everything. SHEEPDOG_TEST_PYTHONS="" skips them. Each client venv is kept in
# /var/cache/sheepdog-test-clients and refreshed.
pids=()
for version in ${SHEEPDOG_TEST_PYTHONS-3.10 3.13}; do
  node_python=/opt/sheepdog-pythons/$version/bin/python$version
  [ -x "$node_python" ] || { echo "$node_python is missing: run scripts/test-cell.sh" >&2; exit 1; }
  venv=/var/cache/sheepdog-test-clients/$version
  if [ ! -x "$venv/bin/python" ]; then
    client=$(ls -d /root/.pyenv/versions/"$version".* 2>/dev/null | sort -V | tail -1)
    [ -n "$client" ] || { echo "Python $version not found in /root/.pyenv/versions (pyenv install $version)" >&2; exit 1; }
    "$client/bin/python$version" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 \
    | { grep -v -e '^WARNING' -e 'pip as the .root. user' || true; }
  echo "== Python $version: tests marked pythons, nodes on $node_python"
  ( PYTHONPATH="$PWD" SHEEPDOG_TEST_NODE_PYTHON="$node_python" timeout 1200 "$venv/bin/python" -m pytest -q \
      -p no:cacheprovider --reruns 1 --reruns-delay 5 -m pythons 2>&1 | sed -u "s/^/[py$version] /" ) &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
