"""An executor nobody references any more does not cancel work someone still waits on: it behaves
as ``shutdown(wait=False)`` (the calls finish, then its jobs and session directory are removed), as
``ProcessPoolExecutor`` does; and at interpreter exit its calls finish first (test_lifecycle)."""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest
from conftest import NODE_PYTHON, Cluster, wait_until

from sheepdog_executor import ClusterExecutor, LocalExecutor
from sheepdog_executor.executor import Session


def launch(make: Callable[[], ClusterExecutor]) -> tuple[Session, list[Future[int]]]:
    """The issue's pattern: the executor is dropped when this returns (its session is kept only to
    check afterwards that nothing is left)."""
    executor = make()
    return executor._session, [executor.submit(pow, 2, i) for i in range(5)]


def check_twenty_launches(make: Callable[[], ClusterExecutor], gone: Callable[[list[str]], bool]) -> set[str]:
    """20 launches, then every result is right and every session directory removed; returns the
    ids of the jobs they submitted."""
    launched = [launch(make) for _ in range(20)]
    for _, futures in launched:
        assert [f.result(timeout=180) for f in futures] == [1, 2, 4, 8, 16]
    sessions = [session for session, _ in launched]
    wait_until(lambda: gone([s.session_dir for s in sessions]), 120, "the session directories removed")
    assert all(not session.jobs.jobs for session in sessions), "every job removed (and seen gone)"
    return {job for session in sessions for job in session.jobs.submitted_jobs}


def test_an_unreferenced_local_executor_finishes_its_calls() -> None:
    def make() -> ClusterExecutor:
        return LocalExecutor(max_workers=1, progress=False)

    check_twenty_launches(make, lambda dirs: not any(os.path.exists(d) for d in dirs))


@pytest.mark.cluster
def test_an_unreferenced_executor_finishes_its_calls(cluster: Cluster) -> None:
    options: dict[str, Any] = {
        "max_workers": 1,
        "poll_interval": 0.5,
        "python": NODE_PYTHON,
        "progress": False,
    }

    def make() -> ClusterExecutor:
        return cluster.executor(host=cluster.alias, **options)

    def gone(dirs: list[str]) -> bool:
        listing = cluster.ssh("ls -d " + " ".join(shlex.quote(d) for d in dirs) + " 2>/dev/null")
        return listing.stdout.strip() == ""

    jobs = check_twenty_launches(make, gone)
    assert jobs and not cluster.jobs(jobs), "every job removed"
