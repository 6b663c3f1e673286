#!/usr/bin/env bash
# The unit tier: every test that needs no cell (not marked cluster or multihost) and is not slow (real
# pip builds, over 5 s each: scripts/run-tests.sh runs those), in about a minute,
# on any machine with the package's test dependencies: no ssh alias, scheduler or network beyond
# loopback. A test that asks for a cell fails here (SHEEPDOG_TEST_NO_CELL=1) instead of skipping.
# The cell tier, with everything: scripts/run-tests.sh. Most of the tier's time is calls that sleep
# or wait for local workers, so 4 processes (pytest-xdist) halve it even on 2 cores;
# SHEEPDOG_TEST_PROCESSES=0 runs it in this one.
set -euo pipefail
cd "$(dirname "$0")/.."
SHEEPDOG_TEST_NO_CELL=1 exec python3 -m pytest -m "not cluster and not multihost and not slow" -q -p no:cacheprovider \
  -n "${SHEEPDOG_TEST_PROCESSES:-4}" --durations=10 "$@"
