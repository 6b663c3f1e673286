"""A call that fails keeps its story: a crash of its worker (segfault, abort, os._exit) is a
``WorkerLost`` naming the signal, with what the call printed and the crashing thread's traceback;
an exception the client cannot rebuild keeps its type's name, message and traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
from support import Cluster

from sheepdog_executor import ClusterExecutor, LocalExecutor, RemoteCallError, RemoteTraceback, WorkerLost
from sheepdog_executor.jobscript import JobOptions
from sheepdog_executor.scheduler import GridEngineOptions, GridEngineScheduler, SlurmScheduler
from sheepdog_executor.shell import LocalShell


def segfault_at_step_4() -> None:
    import ctypes

    for step in range(1, 4):
        print(f"step {step} reached")
    ctypes.string_at(0)


def abort_after_a_warning() -> None:
    import os

    print("about to abort", file=sys.stderr)
    os.abort()


def leave_with_status_3() -> None:
    import os

    os._exit(3)


def check_crash_stories(executor: ClusterExecutor) -> None:
    segfault = executor.submit(segfault_at_step_4)
    aborted = executor.submit(abort_after_a_warning)
    error = segfault.exception(timeout=120)
    assert isinstance(error, WorkerLost), error
    text = str(error)
    assert "killed by signal SIGSEGV" in text.splitlines()[0], text
    assert "step 3 reached" in text  # what the call printed up to the crash
    assert "in segfault_at_step_4" in text  # faulthandler's traceback of the crashing thread
    error = aborted.exception(timeout=120)
    assert isinstance(error, WorkerLost), error
    assert "killed by signal SIGABRT" in str(error).splitlines()[0], str(error)
    assert "about to abort" in str(error) and "in abort_after_a_warning" in str(error)


@pytest.mark.cluster
def test_a_crashing_call_keeps_its_story(make_any_executor: Callable[..., ClusterExecutor]) -> None:
    # no core file left in the home directory by the test (the cell's Grid Engine allows them)
    check_crash_stories(make_any_executor(max_workers=2, setup=["ulimit -c 0"]))


def test_a_crashing_call_keeps_its_story_locally() -> None:
    # a worker heard from within 3 heartbeats is believed alive: 1 s ones make the loss seen in ~3 s
    with LocalExecutor(max_workers=2, progress=False, heartbeat=1.0) as executor:
        check_crash_stories(executor)
        error = executor.submit(leave_with_status_3).exception(timeout=120)
        assert isinstance(error, WorkerLost) and "its process exited with status 3" in str(error)


def fill_then_abort() -> None:
    """Allocate until an allocation fails, then abort, as a native library does (under h_vmem)."""
    import os
    import time

    held = []
    try:
        while True:
            held.append(b"x" * (8 * 2**20))
    except MemoryError:
        pass
    time.sleep(3)  # long enough for the scheduler to sample the memory use
    os.abort()


def fill(megabytes: int) -> int:
    """Hold more memory than asked for, until the scheduler kills the task (Slurm's OverMemoryKill)."""
    import time

    held = [b"x" * 2**20 for _ in range(megabytes)]
    time.sleep(120)
    return len(held)


@pytest.mark.cluster
def test_a_crash_at_the_memory_limit_names_the_likely_cause(
    cluster: Cluster, make_any_executor: Callable[..., ClusterExecutor]
) -> None:
    if cluster.scheduler == "gridengine":
        executor = make_any_executor(max_workers=1, resources={"h_vmem": "400M"}, setup=["ulimit -c 0"])
        future = executor.submit(fill_then_abort)
        cause = "came close to its limit (h_vmem=400M), the likely cause: raise h_vmem in resources="
    else:
        executor = make_any_executor(max_workers=1, mem="200M")
        future = executor.submit(fill, 400)
        # signal 9 with MaxRSS at ReqMem (no cgroups here): a kill over its memory, said first
        cause = "Slurm killed its task over its memory (mem=200M: MaxRSS "
    error = future.exception(timeout=150)
    assert isinstance(error, WorkerLost) and cause in str(error).splitlines()[0], str(error)
    if cluster.scheduler == "slurm":
        assert "reached ReqMem 200M); ask for more mem=" in str(error).splitlines()[0], str(error)


def test_exit_signal_and_memory_hint_from_the_accounting() -> None:
    options = JobOptions()
    grid = GridEngineScheduler(LocalShell(), options, site=GridEngineOptions(resources={"h_vmem": "1G"}))
    assert grid.exit_signal({"exit_status": "139"}) == 11 and grid.exit_signal({"exit_status": "1"}) is None
    assert "h_vmem=1G" in grid.memory_hint({"maxvmem": "1020.5MB"})
    assert grid.memory_hint({"maxvmem": "200.0MB"}) == ""
    slurm = SlurmScheduler(LocalShell(), options)
    assert slurm.exit_signal({"ExitCode": "0:9"}) == 9 and slurm.exit_signal({"ExitCode": "134:0"}) == 6
    assert "ReqMem 500M" in slurm.memory_hint({"MaxRSS": "600M", "ReqMem": "500M"})
    assert slurm.memory_hint({"MaxRSS": "100M", "ReqMem": "500M"}) == ""


def fit_that_diverges() -> None:
    class DivergedError(Exception):
        def __init__(self, step: int, loss: float) -> None:  # two arguments: unpickling fails
            super().__init__(f"diverged at step {step}")
            self.loss = loss

    for step in range(10):
        if step == 7:
            raise DivergedError(step, float("nan"))


def check_unrebuildable_exception(executor: ClusterExecutor) -> None:
    future = executor.submit(fit_that_diverges)
    with pytest.raises(RemoteCallError) as caught:
        future.result(timeout=120)
    assert str(caught.value) == "DivergedError: diverged at step 7"
    cause = caught.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in fit_that_diverges" in cause.tb and "raise DivergedError(step" in cause.tb


@pytest.mark.cluster
def test_an_exception_that_cannot_be_rebuilt_keeps_its_message(
    make_any_executor: Callable[..., ClusterExecutor],
) -> None:
    check_unrebuildable_exception(make_any_executor(max_workers=1))


def test_an_exception_that_cannot_be_rebuilt_keeps_its_message_locally() -> None:
    with LocalExecutor(max_workers=1, progress=False) as executor:
        check_unrebuildable_exception(executor)
