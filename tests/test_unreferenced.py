"""An executor nobody references any more does not cancel work someone still waits on: it behaves
as ``shutdown(wait=False)`` (the calls finish, then its jobs and session directory are removed), as
``ProcessPoolExecutor`` does; and at interpreter exit its calls finish first (test_lifecycle)."""

from __future__ import annotations

import gc
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest
from support import NODE_PYTHON, Cluster

from sheepdog_executor import ClusterExecutor, LocalExecutor
from sheepdog_executor.testing import Internals, internals


def launch(make: Callable[[], ClusterExecutor]) -> tuple[Internals, list[Future[int]]]:
    """The issue's pattern: the executor is dropped when this returns (its session is kept only to
    check afterwards that nothing is left)."""
    executor = make()
    return internals(executor), [executor.submit(pow, 2, i) for i in range(5)]


def check_twenty_launches(
    make: Callable[[], ClusterExecutor], left: Callable[[list[str]], list[str]]
) -> tuple[list[Internals], set[str]]:
    """20 launches, then every result is right and every session directory removed (``left`` lists
    those still there); returns the sessions and the ids of the jobs they submitted."""
    gc.disable()  # dropped means gone at once, not at the next full collection (a cycle would wait)
    try:
        launched = [launch(make) for _ in range(20)]
    finally:
        gc.enable()
    for _, futures in launched:
        assert [f.result(timeout=180) for f in futures] == [1, 2, 4, 8, 16]
    sessions = [session for session, _ in launched]
    # 20 sessions close at once, each polling its scheduler while its jobs go: slow on a busy cell
    deadline = time.monotonic() + 300
    while remaining := left([s.session_dir for s in sessions]):
        assert time.monotonic() < deadline, f"session directories still there after 300 s: {remaining}"
        time.sleep(0.5)
    return sessions, {job for session in sessions for job in session.submitted_jobs}


def test_an_unreferenced_local_executor_finishes_its_calls() -> None:
    def make() -> ClusterExecutor:
        return LocalExecutor(max_workers=1, progress=False)

    sessions, jobs = check_twenty_launches(make, lambda dirs: [d for d in dirs if os.path.exists(d)])
    assert jobs and not any(s.scheduler.poll(s.submitted_jobs) for s in sessions), "a task runs"


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

    def left(dirs: list[str]) -> list[str]:
        return cluster.ssh("ls -d " + " ".join(shlex.quote(d) for d in dirs) + " 2>/dev/null").stdout.split()

    _, jobs = check_twenty_launches(make, left)
    assert jobs and not cluster.jobs(jobs), "every job removed"


AT_EXIT = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from sheepdog_executor import LocalExecutor
executor = LocalExecutor(max_workers=1, progress=False)
future = executor.submit(time.sleep, 120)
while not future.running():
    time.sleep(0.1)
print(executor.session_dir, flush=True)
"""


def test_ctrl_c_while_exit_waits_stops_the_calls_and_removes_everything() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", AT_EXIT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))},
    )
    try:
        assert child.stdout is not None and child.stderr is not None
        session_dir = child.stdout.readline().strip()
        assert "waiting at exit for 1 call(s)" in child.stderr.readline()  # the call keeps it alive
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    assert "interrupted at exit; unfinished calls stopped, their jobs removed" in stderr
    assert session_dir and not os.path.exists(session_dir)
