"""The submit/map path: no stranded Future, Futures resolved off the endpoint's thread, no result kept
alive by map, arguments pickled when a worker takes them, ``buffersize``, and correctness at scale."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import wait_until

from sheepdog_executor import GridEngineExecutor, LocalExecutor, results


class MyObject:
    def my_method(self) -> None:
        pass


def make_dummy_object(_: Any) -> MyObject:
    return MyObject()


def slow(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def plus_one(x: int) -> int:
    return x + 1


class FalsyError(Exception):
    """An exception that says False (gh-132063: the stdlib Future of 3.10-3.12 returned None)."""

    def __bool__(self) -> bool:
        return False


class EmptyError(Exception):
    def __len__(self) -> int:
        return 0


def raise_falsy(kind: type[Exception]) -> None:
    raise kind("raised all the same")


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("this argument cannot be pickled")


@pytest.fixture
def local() -> Iterator[Callable[..., LocalExecutor]]:
    made: list[LocalExecutor] = []

    def build(**options: Any) -> LocalExecutor:
        options.setdefault("max_workers", 1)
        options.setdefault("progress", False)
        made.append(LocalExecutor(**options))
        return made[-1]

    yield build
    for executor in made:
        executor.shutdown(wait=True, cancel_futures=True)


@pytest.mark.pythons  # CallFuture builds on Future's internals: checked on every Python
def test_a_result_that_fails_to_resolve_strands_no_other_future(
    local: Callable[..., LocalExecutor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 9.6: the results of one worker's reply are resolved each in its own try."""
    real = results._resolve
    seen = itertools.count(1)

    def flaky(*args: Any) -> Any:
        if next(seen) == 2:  # the first result of the second, many-call reply
            raise RuntimeError("injected failure while resolving")
        return real(*args)

    monkeypatch.setattr(results, "_resolve", flaky)
    executor = local()
    futures = [executor.submit(abs, -i) for i in range(20)]
    _, not_done = cf.wait(futures, timeout=60)
    assert not not_done, f"{len(not_done)} of 20 futures never ended"


@pytest.mark.pythons
@pytest.mark.parametrize("kind", [FalsyError, EmptyError])
def test_an_exception_that_says_false_is_raised_by_result(kind: type[Exception]) -> None:
    """Issue 17.9: result() raises the call's exception whatever its __bool__/__len__ says, when
    resolved before result() and while result() waits."""
    from sheepdog_executor.callfuture import CallFuture

    before = CallFuture()
    before.set_exception(kind("before"))
    with pytest.raises(kind, match="before"):
        before.result()
    waited = CallFuture()
    threading.Timer(0.2, waited.set_exception, [kind("while waiting")]).start()
    with pytest.raises(kind, match="while waiting"):
        waited.result(timeout=30)
    assert isinstance(waited.exception(timeout=0), kind)


@pytest.mark.pythons
def test_a_falsy_exception_of_a_call_reaches_result(local: Callable[..., LocalExecutor]) -> None:
    future = local().submit(raise_falsy, FalsyError)
    with pytest.raises(FalsyError, match="raised all the same"):
        future.result(timeout=60)


@pytest.mark.pythons
@pytest.mark.parametrize("progress", [False, True])
def test_map_keeps_no_reference_to_a_yielded_result(
    local: Callable[..., LocalExecutor], progress: bool
) -> None:
    """Issue 9.8: CPython's test_free_reference (Lib/test/test_concurrent_futures/executor.py)."""
    executor = local(max_workers=2, progress=progress)
    for obj in executor.map(make_dummy_object, range(10)):
        wr = weakref.ref(obj)
        del obj
        gc.collect()
        assert wr() is None


@pytest.mark.pythons
def test_arguments_are_pickled_when_a_worker_takes_the_call(local: Callable[..., LocalExecutor]) -> None:
    """Issue 9.4: no pickled copy is made at submit; an argument that cannot be pickled fails its
    own call (as with ProcessPoolExecutor), the others run."""
    executor = local()
    bad = executor.submit(len, Unpicklable())
    good = executor.submit(abs, -3)
    with pytest.raises(TypeError, match="cannot be pickled"):
        bad.result(timeout=60)
    assert good.result(timeout=60) == 3


@pytest.mark.pythons
def test_buffersize_bounds_the_calls_submitted_ahead(local: Callable[..., LocalExecutor]) -> None:
    """Issue 13: map(..., buffersize=N) over an endless iterator submits at most N calls ahead."""
    executor = local(max_workers=2)
    results = executor.map(plus_one, itertools.count(), buffersize=10)
    assert [next(results) for _ in range(200)] == list(range(1, 201))
    submitted = sum(batch["total"] for batch in executor.status()["batches"])
    assert submitted <= 200 + 10
    results.close()  # abandoned: the calls submitted ahead are cancelled
    executor.shutdown(wait=True)
    with pytest.raises(ValueError, match="buffersize"):
        executor.map(plus_one, [1], buffersize=0)


@pytest.mark.pythons
def test_buffersize_with_chunks_and_a_finite_iterable(local: Callable[..., LocalExecutor]) -> None:
    executor = local(max_workers=2)
    assert list(executor.map(plus_one, range(1000), chunksize=7, buffersize=3)) == list(range(1, 1001))


@pytest.mark.cluster
def test_a_blocking_done_callback_loses_no_worker(make_executor: Callable[..., GridEngineExecutor]) -> None:
    """Issue 9.7: done-callbacks run on the results thread, so one that blocks for twice the
    heartbeat timeout delays no heartbeat: the worker running another call is not lost."""
    executor = make_executor(max_workers=2, heartbeat=0.5, heartbeat_timeout=4.0, poll_interval=0.5)
    long_call = executor.submit(slow, 12.0, "survived")
    wait_until(long_call.running, 60, "the long call to start")
    blocking = threading.Event()
    quick = executor.submit(slow, 1.0, "quick")
    quick.add_done_callback(lambda _: (blocking.set(), time.sleep(8.0)))
    assert long_call.result(timeout=120) == "survived"
    assert blocking.is_set() and quick.result() == "quick"


@pytest.mark.cluster
def test_a_100k_map_is_complete_and_in_order(make_executor: Callable[..., GridEngineExecutor]) -> None:
    """Issue 13: correctness at scale, chunksize=1."""
    executor = make_executor(progress=False)
    assert list(executor.map(plus_one, range(100_000))) == list(range(1, 100_001))
