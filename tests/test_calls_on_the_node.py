"""What a call finds on the node, on each real scheduler: its working directory on the shared
filesystem, and numerical libraries limited to the cores its task was granted."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from support import Cluster

from sheepdog_executor import ClusterExecutor
from sheepdog_executor.jobscript import THREAD_VARIABLES

pytestmark = pytest.mark.cluster


def thread_settings() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in ("SHEEPDOG_CPUS", *THREAD_VARIABLES)}


def two_cores(cluster: Cluster) -> dict[str, Any]:
    """Options that grant each task two cores, in the scheduler's own words."""
    if cluster.scheduler == "gridengine":
        return {"parallel_environment": "smp", "slots": 2}
    return {"cpus_per_task": 2}


def test_numerical_libraries_get_the_tasks_cores(
    cluster: Cluster, make_any_executor: Callable[..., ClusterExecutor]
) -> None:
    one = make_any_executor(max_workers=1).submit(thread_settings)
    two = make_any_executor(max_workers=1, **two_cores(cluster)).submit(thread_settings)
    own = make_any_executor(max_workers=1, setup=["export OMP_NUM_THREADS=3"]).submit(thread_settings)
    assert set(one.result(timeout=180).values()) == {"1"}, one.result()
    assert set(two.result(timeout=180).values()) == {"2"}, two.result()
    # a set-up line has the last word
    assert own.result(timeout=180) == {**one.result(), "OMP_NUM_THREADS": "3"}


def write_here(name: str) -> str:
    with open(name, "w") as handle:
        handle.write("written on the node")
    return os.getcwd()


def test_calls_run_in_the_working_directory_on_the_shared_filesystem(
    cluster: Cluster, make_any_executor: Callable[..., ClusterExecutor]
) -> None:
    home = cluster.ssh("pwd").stdout.strip()
    name = f"sd-written-{uuid.uuid4().hex[:8]}.txt"
    elsewhere = f"{home}/sd-wd-{uuid.uuid4().hex[:8]}"
    assert cluster.ssh(f"mkdir {elsewhere}").returncode == 0
    try:
        assert make_any_executor(max_workers=1).submit(write_here, name).result(timeout=180) == home
        assert cluster.ssh(f"cat {home}/{name}").stdout == "written on the node"  # seen on the head node
        there = make_any_executor(max_workers=1, working_directory=elsewhere)
        assert there.submit(write_here, name).result(timeout=180) == elsewhere
        assert cluster.ssh(f"cat {elsewhere}/{name}").stdout == "written on the node"
    finally:
        cluster.ssh(f"rm -rf {home}/{name} {elsewhere}")


def memory_limit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_AS)[0]


def test_calls_with_different_needs_go_to_executors_open_at_once(
    make_executor: Callable[..., ClusterExecutor],
) -> None:
    """The README's two executors with other resources, used together: each call runs under its
    own executor's limit (Grid Engine enforces h_vmem as an address-space limit), in its own job."""
    small = make_executor(max_workers=2, resources={"h_vmem": "1G"})
    big = make_executor(max_workers=1, resources={"h_vmem": "2G"})
    smalls = [small.submit(memory_limit) for _ in range(3)]
    bigs = [big.submit(memory_limit) for _ in range(2)]
    assert {f.result(timeout=180) for f in smalls} == {1024**3}
    assert {f.result(timeout=180) for f in bigs} == {2 * 1024**3}
    assert not set(small.job_ids) & set(big.job_ids)
