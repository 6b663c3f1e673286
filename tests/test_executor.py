"""The executor end to end on the real cell: results, errors, sizes, concurrency, one job per map."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from support import our_jobs, ssh, wait_until

from sheepdog_executor import (
    ClusterExecutor,
    GridEngineExecutor,
    RemoteCallError,
    RemoteTraceback,
    WorkerLost,
    server,
)
from sheepdog_executor.testing import internals

pytestmark = pytest.mark.cluster


def square(x: int) -> int:
    return x * x


def power(base: int, exponent: int = 2, *, offset: int = 0) -> int:
    return base**exponent + offset


def divide(a: float, b: float) -> float:
    return a / b


def where_and_when(seconds: float) -> tuple[str, int, float, float]:
    start = time.time()
    time.sleep(seconds)
    return socket.gethostname(), os.getpid(), start, time.time()


@pytest.mark.pythons
def test_submit_and_map_of_1000_in_order(make_any_executor: Callable[..., ClusterExecutor]) -> None:
    executor = make_any_executor()
    assert executor.submit(square, 7).result(timeout=60) == 49
    assert list(executor.map(square, range(1000), timeout=120)) == [x * x for x in range(1000)]
    assert list(executor.map(power, range(50), range(50), chunksize=7)) == [x**x for x in range(50)]


def test_keyword_arguments(make_any_executor: Callable[..., ClusterExecutor]) -> None:
    executor = make_any_executor()
    assert executor.submit(power, 3, exponent=3, offset=1).result(timeout=60) == 28


@pytest.mark.pythons
def test_exception_carries_remote_traceback(make_any_executor: Callable[..., ClusterExecutor]) -> None:
    executor = make_any_executor()
    future = executor.submit(divide, 1, 0)
    with pytest.raises(ZeroDivisionError) as info:
        future.result(timeout=60)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in divide" in cause.tb and "return a / b" in cause.tb
    # a failing call inside a map raises on iteration, at its position
    results = executor.map(divide, [1, 2, 3], [1, 0, 1])
    assert next(results) == 1
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_closures_and_lambdas(make_any_executor: Callable[..., ClusterExecutor]) -> None:
    executor = make_any_executor()
    factor = 3

    def scaled(x: int) -> int:
        return x * factor

    assert executor.submit(lambda: "lambda").result(timeout=60) == "lambda"
    assert list(executor.map(scaled, range(5))) == [0, 3, 6, 9, 12]
    assert list(executor.map(lambda x, y: x - y, [5, 6], [1, 2])) == [4, 4]


def test_ten_megabyte_argument_and_result(make_any_executor: Callable[..., ClusterExecutor]) -> None:
    executor = make_any_executor()
    blob = os.urandom(10 * 1024 * 1024)
    assert executor.submit(len, blob).result(timeout=120) == len(blob)
    big = executor.submit(bytes, 10 * 1024 * 1024).result(timeout=120)
    assert big == bytes(10 * 1024 * 1024)


def test_results_larger_than_a_part_travel_in_parts(
    make_executor: Callable[..., GridEngineExecutor],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(server, "RESULT_PART_BYTES", 1024 * 1024)  # 64 MiB by default
    caplog.set_level(logging.DEBUG, logger="sheepdog_executor")
    executor = make_executor(max_workers=2)
    size = 5 * 1024 * 1024 + 3
    assert executor.submit(bytes, size).result(timeout=120) == bytes(size)
    parts = [r for r in caplog.records if "POST /part" in r.getMessage()]
    assert len(parts) == 6 and all(" 200 " in r.getMessage() for r in parts)
    # results that only together pass the part size: those that would pass it go in parts
    assert list(executor.map(bytes, [700_000] * 6, timeout=120)) == [bytes(700_000)] * 6


def test_a_result_larger_than_the_client_can_take_is_refused_before_it_is_allocated(
    make_executor: Callable[..., GridEngineExecutor],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(server, "RESULT_PART_BYTES", 1024 * 1024)
    monkeypatch.setattr(server, "available_memory", lambda: 3 * 1024 * 1024)  # as the client sees it
    caplog.set_level(logging.DEBUG, logger="sheepdog_executor")
    executor = make_executor(max_workers=1)
    with pytest.raises(
        RemoteCallError, match=r"result \(\d+ bytes pickled\) is larger than the client can take"
    ):
        executor.submit(bytes, 5 * 1024 * 1024).result(timeout=120)
    parts = internals(executor).endpoint.parts
    assert parts.held() == 0
    # the worker sent no more parts after the first was refused, and goes on with other calls
    assert len([r for r in caplog.records if "POST /part" in r.getMessage()]) == 1
    assert executor.submit(bytes, 2 * 1024 * 1024).result(timeout=120) == bytes(2 * 1024 * 1024)


def dies_after_one_part(size: int) -> bytes:
    """Returns ``size`` bytes, and its worker dies (SIGKILL) as it is about to send the second part."""
    import http.client
    import signal

    request = http.client.HTTPConnection.request
    sent: list[str] = []

    def counting(self: http.client.HTTPConnection, method: str, url: str, *args: Any, **kwargs: Any) -> None:
        if url == "/part":
            if sent:
                os.kill(os.getpid(), signal.SIGKILL)
            sent.append(url)
        request(self, method, url, *args, **kwargs)

    http.client.HTTPConnection.request = counting  # type: ignore[method-assign]
    return bytes(size)


def test_the_parts_of_a_lost_worker_are_freed(
    make_executor: Callable[..., GridEngineExecutor], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "RESULT_PART_BYTES", 1024 * 1024)
    executor = make_executor(max_workers=1)
    parts = internals(executor).endpoint.parts
    future = executor.submit(dies_after_one_part, 5 * 1024 * 1024)
    wait_until(lambda: parts.held() > 0 or future.done(), 120, "the first part")
    assert parts.held() > 5 * 1024 * 1024  # the whole result's buffer, for one part received
    with pytest.raises(WorkerLost):
        future.result(timeout=120)
    assert parts.held() == 0  # freed when the worker was declared lost, not an hour later


def test_a_result_over_one_gibibyte(make_executor: Callable[..., GridEngineExecutor]) -> None:
    executor = make_executor(max_workers=1)
    size = 1100 * 1024 * 1024
    result = executor.submit(bytes, size).result(timeout=240)
    assert len(result) == size and result.count(0) == size


def test_max_workers_is_respected_on_the_cell(make_executor: Callable[..., GridEngineExecutor]) -> None:
    executor = make_executor(max_workers=3)
    running_seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            states = our_jobs(set(executor.job_ids))
            running_seen.append(sum(s.count("r") for tasks in states.values() for s in tasks))
            stop.wait(0.3)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        spans = list(executor.map(where_and_when, [1.0] * 12, timeout=120))
    finally:
        stop.set()
        watcher.join()
    # concurrency from the calls' own clocks: never more than 3 at once, and more than 1
    events = sorted([(s, 1) for _, _, s, _ in spans] + [(e, -1) for _, _, _, e in spans])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    assert 2 <= peak <= 3
    assert len({pid for _, pid, _, _ in spans}) <= 3
    assert max(running_seen) <= 3


def test_one_map_is_one_array_job(make_executor: Callable[..., GridEngineExecutor]) -> None:
    name = f"sd-{uuid.uuid4().hex[:8]}"
    executor = make_executor(job_name=name, max_workers=4)
    assert len(list(executor.map(where_and_when, [0.2] * 40))) == 40
    assert len(executor.job_ids) == 1
    executor.shutdown()  # idle workers stop now, so their accounting records come sooner
    # the scheduler's own accounting, by job name: one job number, at most max_workers tasks
    deadline = time.monotonic() + 60
    while True:
        records = ssh(f"qacct -j {name} 2>/dev/null | grep -E '^(jobnumber|taskid) '").stdout.split("\n")
        jobs = {line.split()[1] for line in records if line.startswith("jobnumber")}
        tasks = {line.split()[1] for line in records if line.startswith("taskid")}
        if jobs or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert jobs == set(executor.job_ids)
    assert 1 <= len(tasks) <= 4


def test_submit_after_shutdown_raises(cell: str) -> None:
    before = set(threading.enumerate())  # threads of earlier tests' executors are not this one's
    executor = GridEngineExecutor(host=cell, max_workers=2, poll_interval=0.5)
    assert executor.submit(square, 2).result(timeout=60) == 4
    executor.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(square, 3)
    threads = [t.name for t in set(threading.enumerate()) - before if t.name.startswith("sheepdog")]
    assert threads == []
    assert not our_jobs(set(executor.job_ids))
    assert ssh(f"test -e {executor.session_dir} && echo left || echo gone").stdout.strip() == "gone"


def chatty(x: int) -> int:
    print(f"working on {x}")
    if x < 0:
        raise ValueError("negative")
    return x


@pytest.mark.pythons
def test_output_of_calls_is_captured(make_executor: Callable[..., GridEngineExecutor]) -> None:
    executor = make_executor()
    future = executor.submit(chatty, 3)
    assert future.result(timeout=60) == 3
    assert future.remote_output == "working on 3\n"  # type: ignore[attr-defined]
    with pytest.raises(ValueError) as info:
        executor.submit(chatty, -1).result(timeout=60)
    assert "working on -1" in "\n".join(info.value.__notes__)


def uses_tornado() -> str:
    import tornado  # installed on the client only

    return str(tornado.version)


@pytest.mark.pythons
def test_module_missing_on_the_nodes_is_named(make_executor: Callable[..., GridEngineExecutor]) -> None:
    import tornado.escape  # installed on the client only; the nodes' python3 has no tornado
    import tornado.util

    executor = make_executor(max_workers=1)
    interpreter = executor.submit(getattr, sys, "executable").result(timeout=60)
    in_function = executor.submit(tornado.escape.json_encode, [1])
    in_argument = executor.submit(len, tornado.util.ObjectDict(a=1))
    in_call = executor.submit(uses_tornado)
    for future, where in (
        (in_function, "the function could not be unpickled"),
        (in_argument, "an argument of the call could not be unpickled"),
        (in_call, "the call failed to import a module"),
    ):
        error = future.exception(timeout=60)
        assert isinstance(error, ModuleNotFoundError) and error.name == "tornado"
        notes = "\n".join(error.__notes__)
        assert f"sheepdog: {where}: module 'tornado' is not importable on the nodes" in notes
        assert f"host {socket.gethostname()}" in notes and f"at {interpreter}" in notes
        assert "python=" in notes and "setup=" in notes and 'environment="sync"' in notes
    assert executor.submit(square, 5).result(timeout=60) == 25  # the worker survives it


def interrupted(kind: str) -> None:
    print("about to stop")
    if kind == "KeyboardInterrupt":
        raise KeyboardInterrupt("stop here")
    raise SystemExit(3)


@pytest.mark.pythons
def test_base_exceptions_come_back_as_the_calls_own(
    make_any_executor: Callable[..., ClusterExecutor],
) -> None:
    executor = make_any_executor(max_workers=1, retries=2)
    interrupt = executor.submit(interrupted, "KeyboardInterrupt").exception(timeout=60)
    exit_ = executor.submit(interrupted, "SystemExit").exception(timeout=60)
    assert type(interrupt) is KeyboardInterrupt and interrupt.args == ("stop here",)
    assert isinstance(interrupt.__cause__, RemoteTraceback) and "in interrupted" in interrupt.__cause__.tb
    assert type(exit_) is SystemExit and exit_.code == 3
    assert executor.submit(square, 4).result(timeout=60) == 16
    assert len(executor.job_ids) == 1  # one worker ran all three: none was lost, none retried


def noisy(size: int) -> int:
    print("print()")
    os.write(1, b"os.write(1)\n")
    os.system("echo subprocess stdout; echo subprocess stderr >&2")
    sys.stderr.write("sys.stderr\n")
    os.write(1, b"x" * size)
    return size


@pytest.mark.pythons
def test_output_is_captured_at_the_file_descriptor_level(
    make_executor: Callable[..., GridEngineExecutor],
) -> None:
    executor = make_executor(max_workers=1)
    future = executor.submit(noisy, 0)
    assert future.result(timeout=60) == 0
    assert future.remote_stdout == "print()\nos.write(1)\nsubprocess stdout\n"  # type: ignore[attr-defined]
    assert future.remote_stderr == "subprocess stderr\nsys.stderr\n"  # type: ignore[attr-defined]
    assert future.remote_output == future.remote_stdout + future.remote_stderr  # type: ignore[attr-defined]
    big = executor.submit(noisy, 100_000)  # more than the 64 KiB kept of each stream
    assert big.result(timeout=60) == 100_000
    stdout = big.remote_stdout  # type: ignore[attr-defined]
    assert stdout.startswith("[... ") and stdout.endswith("\n" + "x" * 64 * 1024)


def test_debug_log_shows_every_command_sent_to_the_cluster(
    make_executor: Callable[..., GridEngineExecutor], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sheepdog_executor")
    executor = make_executor(max_workers=1)
    assert executor.submit(square, 4).result(timeout=60) == 16

    def commands() -> list[str]:
        messages = [r.getMessage() for r in caplog.records if r.name == "sheepdog_executor"]
        return [m for m in messages if "$ " in m]

    assert any("qsub -terse" in c for c in commands())
    deadline = time.monotonic() + 10  # the job's task lives on (idle) for a few polls
    while not any("qstat -xml" in c for c in commands()):
        assert time.monotonic() < deadline, commands()
        time.sleep(0.2)
