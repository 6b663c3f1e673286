"""Faults injected on the real cell: every future ends with the right outcome within a bound, and
nothing of ours stays queued."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from support import CELL_ALIAS, Cluster, our_jobs, own_sshd_config, ssh, wait_until

from sheepdog_executor import ClusterExecutor, GridEngineExecutor, WorkerLost
from sheepdog_executor.testing import internals

pytestmark = pytest.mark.cluster


def slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def die_once(marker: str) -> tuple[str, int]:
    """Kill its own process the first time (as the OOM killer would); succeed when run again."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return os.environ.get("SHEEPDOG_TASK_ID", "?"), os.getpid()


def running_worker(executor: ClusterExecutor, future: Future[Any]) -> tuple[str, int]:
    """(job, task) of the worker running ``future``'s call, once it runs."""
    wait_until(future.running, 60, "the call to start")
    wait_until(
        lambda: any(w["holding"] for w in executor.status()["workers"]), 30, "a worker to hold the call"
    )
    worker = next(w for w in executor.status()["workers"] if w["holding"])
    return worker["job"], worker["task"]


def test_worker_killed_with_sigkill_fails_with_accounting(
    cluster: Cluster,
    make_any_executor: Callable[..., ClusterExecutor],
) -> None:
    executor = make_any_executor(max_workers=1)
    future = executor.submit(slow, 300)
    job, task = running_worker(executor, future)
    ssh(f"pkill -9 -f {executor.session_dir}/bundle.zip")
    started = time.monotonic()
    error = future.exception(timeout=60)
    assert isinstance(error, WorkerLost)
    assert error.job_id == job and error.task_id == task
    assert f"{cluster.executor.scheduler_class.name} job {job}, task {task}" in str(error)
    key, start = cluster.killed
    assert error.accounting.get(key, "").startswith(start)
    assert time.monotonic() - started < 45


def test_task_deleted_by_someone_else(
    cluster: Cluster, make_any_executor: Callable[..., ClusterExecutor]
) -> None:
    executor = make_any_executor(max_workers=1)
    future = executor.submit(slow, 300)
    job, task = running_worker(executor, future)
    cluster.ssh(cluster.delete_task.format(job=job, task=task))
    error = future.exception(timeout=60)
    assert isinstance(error, WorkerLost) and error.job_id == job
    key, start = cluster.deleted
    assert error.accounting.get(key, "").startswith(start), error.accounting


def test_task_over_its_walltime(make_executor: Callable[..., GridEngineExecutor]) -> None:
    executor = make_executor(max_workers=1, resources={"h_rt": "0:0:5"}, retries=1)
    future = executor.submit(slow, 300)
    error = future.exception(timeout=90)
    assert isinstance(error, WorkerLost)
    assert error.accounting.get("exit_status", "").startswith("137")
    assert error.accounting.get("failed", "").startswith("37")  # qmaster enforced h_rt, ...
    assert "Grid Engine killed its task over its time limit (h_rt=0:0:5: ru_wallclock " in str(error)
    assert executor.job_ids == [error.job_id]  # retries=1 does not run it again: the same limit would kill it


def test_retries_run_a_lost_call_again_in_a_new_task(
    make_any_executor: Callable[..., ClusterExecutor],
) -> None:
    executor = make_any_executor(max_workers=2, retries=1)
    marker = f"{executor.session_dir}/died-once"
    task, pid = executor.submit(die_once, marker).result(timeout=90)
    assert ssh(f"test -e {marker} && echo yes").stdout.strip() == "yes"  # the first run did die
    assert pid > 0 and task.isdigit()


def test_no_retry_when_the_call_itself_raised(make_any_executor: Callable[..., ClusterExecutor]) -> None:
    executor = make_any_executor(max_workers=1, retries=3)
    calls = executor.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        calls.result(timeout=60)
    assert internals(executor).tasks_seen  # ran once, on the cell
    assert len(executor.job_ids) == 1


def test_hung_worker_is_declared_lost_and_its_call_retried(
    make_executor: Callable[..., GridEngineExecutor],
) -> None:
    executor = make_executor(max_workers=2, retries=1, heartbeat=1.0, heartbeat_timeout=6.0)
    future = executor.submit(slow, 8)
    job, task = running_worker(executor, future)
    ssh(f"pkill -STOP -f {executor.session_dir}/bundle.zip")  # the node freezes: no heartbeats
    started = time.monotonic()
    assert future.result(timeout=90) == 8  # run again by a new task
    assert time.monotonic() - started < 60
    # the frozen task was removed from the cell
    wait_until(
        lambda: str(task) not in str(our_jobs({job}).get(job, [])) or job not in our_jobs({job}),
        30,
        "the frozen task to be removed",
    )


@pytest.fixture
def second_sshd() -> Iterator[Callable[[], None]]:
    """An sshd of our own on 127.0.0.1:2223 that the test may kill and restart."""
    path, pidfile = own_sshd_config(2223)

    def start() -> None:
        subprocess.run(["/usr/sbin/sshd", "-f", str(path)], check=True)
        wait_until(
            lambda: subprocess.run(["ssh", "-p", "2223", CELL_ALIAS, "true"]).returncode == 0,
            10,
            "sshd on 2223",
        )

    def kill() -> None:
        pid = int(pidfile.read_text())
        subprocess.run(["pkill", "-9", "-P", str(pid)])  # its connections
        os.kill(pid, signal.SIGKILL)
        pidfile.unlink(missing_ok=True)

    def restart() -> None:
        kill()
        time.sleep(3)
        start()

    start()
    yield restart
    if pidfile.exists():
        kill()


def test_sshd_restarted_mid_map(cell: str, second_sshd: Callable[[], None]) -> None:
    with GridEngineExecutor(host=cell, port=2223, max_workers=4, poll_interval=0.3) as executor:
        results = executor.map(slow, [0.5] * 40)
        wait_until(lambda: executor.job_ids, 30, "the job")
        second_sshd()  # connection cut, sshd down 3 s, back up
        assert list(results) == [0.5] * 40
        assert len(executor.job_ids) == 1  # nothing submitted twice
        job_ids = executor.job_ids
    assert not our_jobs(set(job_ids))
