"""Fixtures for the real test cell (scripts/test-cell.sh): its ssh alias, executors, qstat."""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sheepdog_executor import GridEngineExecutor

CELL_ALIAS = os.environ.get("SHEEPDOG_TEST_HOST", "fear")


def ssh(command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command on the cell with OpenSSH (independent of the code under test)."""
    return subprocess.run(
        ["ssh", "-o", "BatchMode=yes", CELL_ALIAS, command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def our_jobs(job_ids: list[str] | set[str]) -> dict[str, list[str]]:
    """job id -> states (one per task row) of these jobs as qstat shows them now."""
    out = ssh("qstat -xml").stdout
    found: dict[str, list[str]] = {}
    for entry in ET.fromstring(out).iter("job_list"):
        job = entry.findtext("JB_job_number") or ""
        if job in job_ids:
            found.setdefault(job, []).append(entry.findtext("state") or "")
    return found


@pytest.fixture(scope="session")
def cell() -> str:
    """The ssh alias of the test cell; skip (or fail in CI) when it is not up."""
    try:
        done = ssh("qstat -f", timeout=30)
        up = done.returncode == 0 and "all.q@" in done.stdout
    except (OSError, subprocess.TimeoutExpired):
        up = False
    if not up:
        message = f"test cell '{CELL_ALIAS}' unreachable: run scripts/test-cell.sh as root"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return CELL_ALIAS


@pytest.fixture
def make_executor(cell: str) -> Iterator[Callable[..., GridEngineExecutor]]:
    """Factory for executors on the cell; each is shut down (and its jobs checked gone) after."""
    made: list[GridEngineExecutor] = []

    def make(**options: Any) -> GridEngineExecutor:
        options.setdefault("max_workers", 8)
        options.setdefault("poll_interval", 0.5)
        executor = GridEngineExecutor(host=cell, **options)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.shutdown(wait=True, cancel_futures=True)
        left = our_jobs(set(executor.job_ids))
        assert not left, f"jobs left on the cell after shutdown: {left}"
