"""No orphan jobs: Ctrl-C, an exception in the with body, interpreter exit and garbage collection
all remove the executor's queued and running jobs from the real cell."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import Cluster, read_line, spawn

pytestmark = pytest.mark.cluster

CHILD = Path(__file__).with_name("child_map.py")


def start_child(mode: str, cluster: Cluster) -> tuple[subprocess.Popen[str], list[str]]:
    child = spawn(
        [sys.executable, str(CHILD), mode, cluster.alias, cluster.scheduler],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    jobs = json.loads(read_line(child, 180, "the child's job ids"))["jobs"]
    assert jobs and cluster.jobs(set(jobs)), "the child's tasks should be on the cell"
    assert child.stdin is not None
    child.stdin.write("go\n")  # now the child goes on (and removes them)
    child.stdin.flush()
    return child, jobs


def wait_gone(cluster: Cluster, jobs: list[str], within: float) -> float:
    start = time.monotonic()
    while cluster.jobs(set(jobs)):
        assert time.monotonic() - start < within, f"jobs {jobs} still on the cell after {within} s"
        time.sleep(0.5)
    return time.monotonic() - start


@pytest.mark.parametrize("mode", ["ctrl-c", "raise", "exit"])
def test_child_leaves_no_jobs(cluster: Cluster, mode: str) -> None:
    child, jobs = start_child(mode, cluster)
    if mode == "ctrl-c":
        child.send_signal(signal.SIGINT)
    try:
        out, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    if mode == "ctrl-c":
        assert "KeyboardInterrupt" in stderr
    if mode == "raise":
        assert "boom in the with body" in stderr
    if mode == "exit":  # as ProcessPoolExecutor: the calls outstanding at exit finish first
        assert child.returncode == 0 and out.split().count("done") == 6, (out, stderr)
    # the child removed its jobs before it exited
    assert not cluster.jobs(set(jobs))


def test_garbage_collected_executor_removes_its_jobs(cluster: Cluster) -> None:
    child, jobs = start_child("gc", cluster)
    try:
        assert json.loads(read_line(child, 60, "the child's word that it collected")) == {"collected": True}
        wait_gone(cluster, jobs, within=30)
        assert child.poll() is None  # removed by the finalizer, not by the process ending
    finally:
        child.kill()
        child.wait()
