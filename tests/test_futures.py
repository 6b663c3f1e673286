"""concurrent.futures semantics, the same as ProcessPoolExecutor's: cancel, shutdown variants,
wait/as_completed, timeouts, callbacks, running(), BrokenExecutor. Run against the local backend
and against the real cell."""

from __future__ import annotations

import concurrent.futures as cf
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import our_jobs, slurm_jobs

from sheepdog_executor import (
    BrokenGridEngineExecutor,
    ClusterExecutor,
    ExecutorShutDown,
    GridEngineExecutor,
    LocalExecutor,
    SlurmExecutor,
)


def slow(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value if value is not None else seconds


def set_ready(value: str) -> None:
    os.environ["SHEEPDOG_TEST_READY"] = value


def read_ready() -> str | None:
    return os.environ.get("SHEEPDOG_TEST_READY")


def failing_initializer() -> None:
    raise ValueError("no database here")


@pytest.fixture(
    params=[
        "local",
        pytest.param("cell", marks=pytest.mark.cluster),
        pytest.param("slurm", marks=pytest.mark.cluster),
    ]
)
def make(request: pytest.FixtureRequest) -> Iterator[Callable[..., ClusterExecutor]]:
    made: list[ClusterExecutor] = []

    def build(**options: Any) -> ClusterExecutor:
        options.setdefault("max_workers", 2)
        if request.param == "local":
            executor: ClusterExecutor = LocalExecutor(**options)
        elif request.param == "slurm":
            executor = SlurmExecutor(host=request.getfixturevalue("slurm_cell"), poll_interval=0.5, **options)
        else:
            cell = request.getfixturevalue("cell")
            executor = GridEngineExecutor(host=cell, poll_interval=0.5, **options)
        made.append(executor)
        return executor

    yield build
    for executor in made:
        executor.shutdown(wait=True, cancel_futures=True)
        if isinstance(executor, GridEngineExecutor):
            assert not our_jobs(set(executor.job_ids))
        if isinstance(executor, SlurmExecutor):
            assert not slurm_jobs(set(executor.job_ids))


def test_cancel_before_start_never_runs(make: Callable[..., ClusterExecutor]) -> None:
    executor = make(max_workers=1)
    first = executor.submit(slow, 1.5, "first")
    rest = [executor.submit(slow, 0.01, i) for i in range(6)]
    cancelled = [f for f in rest[2:] if f.cancel()]
    assert len(cancelled) == 4  # nothing but the first call can have started
    assert first.result(timeout=90) == "first"
    assert [f.result(timeout=60) for f in rest[:2]] == [0, 1]
    assert all(f.cancelled() for f in cancelled)
    snapshot = executor.status()
    assert snapshot["batches"][0]["done"] == 3 and snapshot["batches"][0]["cancelled"] == 4


def test_shutdown_cancel_futures(make: Callable[..., ClusterExecutor]) -> None:
    executor = make(max_workers=1)
    running = executor.submit(slow, 1.5, "ran")
    assert _wait_for(running.running, 90)
    pending = [executor.submit(slow, 0.01, i) for i in range(5)]
    executor.shutdown(wait=True, cancel_futures=True)
    assert running.result() == "ran"  # a running call finishes, as in ProcessPoolExecutor
    assert all(f.cancelled() for f in pending)
    with pytest.raises(cf.CancelledError, match=r"cancelled by shutdown\(cancel_futures=True\)"):
        pending[-1].result()


def test_abort_cancels_the_waiting_calls_and_fails_the_running_ones(
    make: Callable[..., ClusterExecutor],
) -> None:
    """The public abort (what the joblib backend uses): at once, no call left and the executor shut."""
    executor = make(max_workers=1)
    running = executor.submit(slow, 60, "never")
    assert _wait_for(running.running, 90)
    pending = [executor.submit(slow, 0.01, i) for i in range(3)]
    started = time.monotonic()
    executor.abort()
    assert time.monotonic() - started < 30  # not the 60 s call
    assert all(f.cancelled() for f in pending)
    with pytest.raises(ExecutorShutDown, match="its task was removed"):
        running.result(timeout=0)
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(slow, 0)


def test_shutdown_without_wait_returns_at_once(make: Callable[..., ClusterExecutor]) -> None:
    executor = make(max_workers=1)
    future = executor.submit(slow, 2, "later")
    assert _wait_for(future.running, 90)
    started = time.monotonic()
    executor.shutdown(wait=False)
    assert time.monotonic() - started < 0.5
    with pytest.raises(RuntimeError):
        executor.submit(slow, 0)
    assert future.result(timeout=60) == "later"  # cleaned up in the background, after the call


def test_wait_as_completed_timeouts_callbacks(make: Callable[..., ClusterExecutor]) -> None:
    executor = make(max_workers=2)
    fast, late = executor.submit(slow, 0.1, "fast"), executor.submit(slow, 3, "late")
    done, not_done = cf.wait([fast, late], timeout=90, return_when=cf.FIRST_COMPLETED)
    assert fast in done and late in not_done
    with pytest.raises(cf.TimeoutError):
        late.result(timeout=0.05)
    seen: list[cf.Future[Any]] = []
    late.add_done_callback(seen.append)
    assert [f.result() for f in cf.as_completed([late, fast], timeout=90)] == ["fast", "late"]
    assert seen == [late]
    fast.add_done_callback(seen.append)  # added after completion: called at once
    assert seen == [late, fast]
    with pytest.raises(cf.TimeoutError):
        list(executor.map(slow, [2, 2], timeout=0.5))


def test_running_is_true_while_the_call_runs(make: Callable[..., ClusterExecutor]) -> None:
    executor = make(max_workers=1)
    future = executor.submit(slow, 1.5)
    assert _wait_for(future.running, 90)
    assert not future.done() and not future.cancel()
    assert future.result(timeout=60) == 1.5 and not future.running()


def test_initializer_runs_and_its_failure_breaks_the_executor(make: Callable[..., ClusterExecutor]) -> None:
    ok = make(max_workers=1, initializer=set_ready, initargs=("yes",))
    assert ok.submit(read_ready).result(timeout=90) == "yes"
    executor = make(max_workers=1, initializer=failing_initializer)
    future = executor.submit(slow, 0)
    with pytest.raises(BrokenGridEngineExecutor, match="no database here"):
        future.result(timeout=90)
    with pytest.raises(BrokenGridEngineExecutor):
        executor.submit(slow, 0)


def _wait_for(predicate: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
