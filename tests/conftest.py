"""Fixtures for the real test cells (scripts/test-cell.sh): the cells, executors on them, node
packages, Chromium. The helpers the tests import are in ``support.py``."""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator

import pytest
from support import (
    CELL_ALIAS,
    CELL_FIXTURES,
    NODE_PYTHON,
    SLURM_ALIAS,
    Cluster,
    cluster_of,
    executor_factory,
    our_jobs,
    require_up,
    ssh,
)

from sheepdog_executor import ClusterExecutor, GridEngineExecutor

#: Headless Chromium, for the tests that look at a page (scripts/run-tests.sh installs it).
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def cell() -> str:
    """The ssh alias of the test cell; skip (or fail in CI) when it is not up."""
    return require_up(
        CELL_ALIAS, "qstat -f", lambda out: "all.q@" in out, "test cell", "scripts/test-cell.sh"
    )


@pytest.fixture
def make_executor(cell: str) -> Iterator[Callable[..., GridEngineExecutor]]:
    """Factory for executors on the cell; each is shut down (and its jobs checked gone) after."""
    made = yield from executor_factory(GridEngineExecutor, cell, python=NODE_PYTHON)
    for executor in made:
        left = our_jobs(set(executor.job_ids))
        assert not left, f"jobs left on the cell after shutdown: {left}"


NODE_PACKAGES = [f"{name}=={importlib.metadata.version(name)}" for name in ("dask", "numpy")]


@pytest.fixture(scope="session")
def node_packages(cell: str) -> str:
    """A set-up line giving the workers dask and numpy, installed on the cell once (pip --target)."""
    python = "py{}.{}".format(*sys.version_info[:2])
    target = f"$HOME/.cache/sheepdog-tests/{python}-" + "-".join(p.replace("==", "") for p in NODE_PACKAGES)
    pinned = " ".join(shlex.quote(p) for p in NODE_PACKAGES)
    # into a fresh directory renamed into place, so concurrent test runs never see half an install
    script = textwrap.dedent(
        f"""
        set -e
        d="{target}"
        if [ ! -d "$d" ]; then
            mkdir -p "$(dirname "$d")"
            t=$(mktemp -d "$d.XXXXXX")
            python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \\
                --target "$t" {pinned} || {{ rm -rf "$t"; exit 1; }}
            mv -T "$t" "$d" 2>/dev/null || rm -rf "$t"
        fi
        PYTHONPATH="$d" python3 -c 'import dask.array, numpy'
        echo "$d"
        """
    )
    done = ssh(script, timeout=280)
    if done.returncode != 0:
        pytest.fail(f"could not install {NODE_PACKAGES} for the cell's python3:\n{done.stderr[-2000:]}")
    return f"export PYTHONPATH={shlex.quote(done.stdout.strip().splitlines()[-1])}"


@pytest.fixture(scope="session")
def slurm_cell() -> str:
    """The ssh alias of the Slurm test cluster; skip (or fail in CI) when it is not up."""
    return require_up(
        SLURM_ALIAS,
        "sinfo -h -o %t",
        lambda out: bool(out.strip()),
        "Slurm test cluster",
        "scripts/test-cell.sh --slurm",
    )


@pytest.fixture(params=["gridengine", "slurm"])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    """Each real scheduler in turn (tests that use it run on both)."""
    return cluster_of(request.param, request.getfixturevalue(CELL_FIXTURES[request.param]))


@pytest.fixture
def make_any_executor(cluster: Cluster) -> Iterator[Callable[..., ClusterExecutor]]:
    """``make_executor`` on each real scheduler in turn."""
    made = yield from executor_factory(cluster.executor, cluster.alias, python=NODE_PYTHON)
    for executor in made:
        left = cluster.jobs(set(executor.job_ids))
        assert not left, f"jobs left on {cluster.scheduler} after shutdown: {left}"


@pytest.fixture
def chromium() -> Callable[..., str]:
    """Run headless Chromium on a URL with a fresh profile: returns what it printed (``--dump-dom``)."""
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (scripts/run-tests.sh installs it)")
        pytest.skip("chromium is not installed: apt-get install chromium")

    def run(url: str, *args: str, budget_ms: int = 2500) -> str:
        with tempfile.TemporaryDirectory() as profile:
            done = subprocess.run(
                [
                    str(CHROMIUM),
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--hide-scrollbars",
                    f"--user-data-dir={profile}",
                    "--window-size=1200,900",
                    f"--virtual-time-budget={budget_ms}",
                    *args,
                    url,
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    return run
