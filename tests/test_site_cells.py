"""Site limits on the real cells: with a cap of 2 on the user's jobs (Grid Engine's max_u_jobs on the
multi-host cell, a Slurm QOS's MaxSubmitJobsPerUser made for the test), a sweep of 10 batches
finishes with at most 2 of its jobs (tasks, on Slurm) in the scheduler's listing at any time; the
executor says what it waits for. Each cap is set for the test alone and removed in its teardown."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from support import executor_factory, require_up, ssh_to

from sheepdog_executor import ClusterExecutor, GridEngineExecutor, SlurmExecutor

MULTI = "fear-multi"
MULTI_STATE = Path("/var/lib/sheepdog-test-cell/multi")
MULTI_ENV = ["SGE_ROOT=/var/lib/gridengine", "SGE_CELL=multi", "SGE_QMASTER_PORT=6454", "SGE_EXECD_PORT=6455"]
TEST_USER = os.environ.get("SHEEPDOG_TEST_USER", "sdtest")
CAP = 2
BATCHES = 10


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


class Watch:
    """Polls a listing of the test's own jobs while the sweep runs: the most seen at once."""

    def __init__(self, count: Callable[[], int]) -> None:
        self.count, self.most, self.polls = count, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.3):
            self.most = max(self.most, self.count())
            self.polls += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def sweep(
    executor: ClusterExecutor, watch: Watch, while_waiting: Callable[[], None] | None = None
) -> list[str]:
    """10 batches of one 3 s call, 0.3 s apart (each would get a job of its own without the cap);
    returns what status() said it waited for. ``while_waiting`` is called once, when it first does."""
    futures: list[Future[Any]] = []
    waited: list[str] = []
    for _ in range(BATCHES):
        futures.append(executor.submit(nap, 3.0))
        time.sleep(0.3)
        waited.append(executor.status().get("site_limits", {}).get("waiting", ""))
        if waited[-1] and while_waiting is not None:
            while_waiting()
            while_waiting = None
    deadline = time.monotonic() + 180
    for future in futures:
        assert future.result(timeout=max(1.0, deadline - time.monotonic())) == 3.0
        waited.append(executor.status().get("site_limits", {}).get("waiting", ""))
    watch.stop()
    return [w for w in waited if w]


# -- Grid Engine: max_u_jobs on the multi-host cell (a cell of its own: fear is never touched) ------
def _multi_qconf(*args: str, env: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    head = (MULTI_STATE / "mh-head.holder").read_text().strip()
    command = ["nsenter", "-t", head, "-n", "-u", "-m", "--", "env", *MULTI_ENV, *env, "qconf", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)


def _set_max_u_jobs(value: str, editor: Path) -> None:
    _multi_qconf("-mconf", "global", env=(f"EDITOR={editor}", f"SHEEPDOG_MAX_U_JOBS={value}"))


def _may_configure_the_multi_cell() -> None:
    """The multi-host cell is up, and this process may change its configuration (root)."""
    require_up(
        MULTI, "qstat -f", lambda out: "all.q@" in out, "multi-host cell", "scripts/test-cell.sh --multi-host"
    )
    if os.geteuid() != 0:
        pytest.skip("needs root to change the multi-host cell's configuration")


@pytest.fixture
def max_u_jobs() -> Iterator[None]:
    """max_u_jobs 2 on the multi-host cell for this test, its value before restored after."""
    _may_configure_the_multi_cell()
    before = next(
        line.split()[1]
        for line in _multi_qconf("-sconf", "global").stdout.splitlines()
        if line.startswith("max_u_jobs")
    )
    # qconf -mconf runs $EDITOR on the configuration; /var/tmp is the same on every host (/tmp is not)
    editor = Path(f"/var/tmp/sheepdog-test-max-u-jobs-{uuid.uuid4().hex[:8]}.sh")
    editor.write_text('#!/bin/sh\nsed -i "s/^max_u_jobs .*/max_u_jobs $SHEEPDOG_MAX_U_JOBS/" "$1"\n')
    editor.chmod(0o755)
    try:
        _set_max_u_jobs(str(CAP), editor)
        yield
    finally:
        _set_max_u_jobs(before, editor)
        editor.unlink()


@pytest.mark.multihost
def test_grid_engine_max_u_jobs_is_never_exceeded_and_the_sweep_finishes(
    max_u_jobs: None, chromium: Callable[..., str]
) -> None:
    name = f"cap-{uuid.uuid4().hex[:6]}"
    pages: list[str] = []

    def ours() -> int:
        out = ssh_to(MULTI, f"qstat -u {TEST_USER}").stdout
        return len({line.split()[0] for line in out.splitlines()[2:] if line.split()[2:3] == [name]})

    made = executor_factory(GridEngineExecutor, MULTI, job_name=name, max_workers=BATCHES)
    make = next(made)
    try:
        executor = make()
        watch = Watch(ours)
        url = executor.status_url or ""
        waited = sweep(executor, watch, lambda: pages.append(chromium(url, "--dump-dom")))
        assert watch.polls >= 5 and watch.most <= CAP, watch.most
        status = executor.status()
        assert "max_u_jobs 2" in status["site_limits"]["limits"], status["site_limits"]
        assert "waiting for room: max_u_jobs 2" in waited, waited
        # the status page says so too, in its banner
        banner = re.search(r'<div class="banner" id="waiting"([^>]*)>([^<]*)</div>', pages[0])
        assert banner is not None and "hidden" not in banner.group(1), pages[0][:3000]
        said = r"Calls are waiting for room: max_u_jobs 2 \(site limits: (.+, )?max_u_jobs 2\)"
        assert re.fullmatch(said, banner.group(2)), banner.group(2)
        assert status["scheduler_commands"]["total"] > 0
    finally:
        next(made, None)


# -- Slurm: a QOS of the test's own with MaxSubmitJobsPerUser=2 -------------------------------------
def _sacctmgr(*args: str) -> None:
    subprocess.run(["sacctmgr", "-i", *args], capture_output=True, text=True, timeout=60, check=True)


@pytest.fixture
def capped_qos(slurm_cell: str) -> Iterator[str]:
    """A QOS with MaxSubmitJobsPerUser=2 that the test user may use, removed after the test."""
    if os.geteuid() != 0 or subprocess.run(["which", "sacctmgr"], capture_output=True).returncode:
        pytest.skip("needs root and sacctmgr on this machine (the Slurm cell's slurmdbd)")
    qos = f"sdcap{uuid.uuid4().hex[:6]}"
    _sacctmgr("add", "qos", qos, f"MaxSubmitJobsPerUser={CAP}")
    try:
        _sacctmgr("modify", "user", TEST_USER, "set", f"qos+={qos}")
        yield qos
    finally:
        subprocess.run(
            ["sacctmgr", "-i", "modify", "user", TEST_USER, "set", f"qos-={qos}"], capture_output=True
        )
        subprocess.run(["sacctmgr", "-i", "delete", "qos", qos], capture_output=True)


@pytest.mark.cluster
def test_slurm_max_submit_jobs_of_the_qos_is_never_exceeded_and_the_sweep_finishes(
    slurm_cell: str, capped_qos: str
) -> None:
    """The cell does not enforce the QOS's limits (AccountingStorageEnforce is not set): whatever is
    listed at once is the executor's own restraint."""
    name = f"cap-{uuid.uuid4().hex[:6]}"

    def ours() -> int:
        out = ssh_to(slurm_cell, f'squeue -h -r -u "$(id -un)" -n {name} -o %i').stdout
        return len(out.split())

    made = executor_factory(SlurmExecutor, slurm_cell, job_name=name, max_workers=BATCHES, qos=capped_qos)
    make = next(made)
    try:
        executor = make()
        watch = Watch(ours)
        waited = sweep(executor, watch)
        assert watch.polls >= 5 and watch.most <= CAP, watch.most
        status = executor.status()
        assert f"MaxSubmitPU of QOS {capped_qos} 2" in status["site_limits"]["limits"], status["site_limits"]
        assert f"waiting for room: MaxSubmitPU of QOS {capped_qos} 2" in waited, waited
    finally:
        next(made, None)


# -- Grid Engine: a queue's own h_rt, when the job asks for none ------------------------------------
QUEUE_H_RT = 20
#: 5 s calls on 2 workers: 30 s of calls for each, more than the queue's 20 s.
CALLS = 12


def counted_nap(i: int, marks: str) -> int:
    """A 5 s call that leaves a file per run in ``marks`` (the home directory every host shares)."""
    import os
    import time

    time.sleep(5)
    with open(os.path.join(marks, f"{i}.{os.getpid()}.{time.time_ns()}"), "w"):
        pass
    return i


@pytest.fixture
def short_queue() -> Iterator[None]:
    """all.q of the multi-host cell with an h_rt of 20 s for this test, its value before restored."""
    _may_configure_the_multi_cell()
    queue = _multi_qconf("-sq", "all.q").stdout.splitlines()
    before = next(line.split()[1] for line in queue if line.startswith("h_rt"))
    _multi_qconf("-mattr", "queue", "h_rt", f"0:0:{QUEUE_H_RT}", "all.q")
    try:
        yield
    finally:
        _multi_qconf("-mattr", "queue", "h_rt", before, "all.q")


@pytest.mark.multihost
def test_a_queues_own_time_limit_bounds_its_tasks_and_no_call_is_killed_under_it(short_queue: None) -> None:
    """No h_rt asked, but the queue has one (20 s): each worker knows it from the queue it landed in,
    takes no 5 s call that would not end before it, and retires; a fresh task runs the rest. Before,
    a worker's fourth call was killed with its task at 20 s and failed ("killed over a limit")."""
    name = f"qrt-{uuid.uuid4().hex[:6]}"
    marks = ssh_to(MULTI, f"mkdir -p ~/.cache/sheepdog-tests/{name} && cd $_ && pwd").stdout.strip()
    made = executor_factory(GridEngineExecutor, MULTI, job_name=name, max_workers=2)
    make = next(made)
    try:
        executor = make()
        results = executor.map(counted_nap, range(CALLS), [marks] * CALLS, timeout=240)
        assert list(results) == list(range(CALLS))
        runs = sorted(int(mark.split(".")[0]) for mark in ssh_to(MULTI, f"ls {marks}").stdout.split())
        assert runs == list(range(CALLS)), runs  # each ran once: none killed under the queue's limit
        assert len(executor.job_ids) >= 2  # the workers retired before 20 s: fresh tasks took the rest
    finally:
        next(made, None)
        ssh_to(MULTI, f"rm -rf {marks}")
