"""A map's calls and its results: the calls out of the iterables (chunked with ``chunksize``), the
results in order (cancelling the rest on a timeout, an error, an interrupt or abandonment), and the
progress bar over them."""

from __future__ import annotations

import collections
import functools
import itertools
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any, TypeVar

from sheepdog_executor.calls import NO_KWARGS

T = TypeVar("T")

#: With ``progress=None``, a map on a terminal shows a bar at once above this many calls, else once
#: it has lasted this many seconds.
AUTO_PROGRESS_CALLS = 100
AUTO_PROGRESS_SECONDS = 2.0


def check_map_arguments(chunksize: int, buffersize: int | None) -> None:
    """``Executor.map``'s checks of ``chunksize`` and ``buffersize`` (Python 3.14's errors)."""
    if chunksize < 1:
        raise ValueError("chunksize must be >= 1.")
    if buffersize is not None and not isinstance(buffersize, int):
        raise TypeError("buffersize must be an integer or None")
    if buffersize is not None and buffersize < 1:
        raise ValueError("buffersize must be None or > 0")


def map_calls(
    fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], chunksize: int
) -> tuple[Callable[..., Any], Iterator[tuple[Any, Any]]]:
    """What a map calls, and the (args, kwargs) of each call, taken lazily from ``iterables``:
    ``fn`` once per argument set, or with ``chunksize`` > 1, ``run_chunk`` once per chunk (as
    ProcessPoolExecutor's ``_process_chunk``)."""
    argument_sets = zip(*iterables)  # noqa: B905 - as Executor.map
    if chunksize == 1:
        return fn, ((args, NO_KWARGS) for args in argument_sets)
    chunks = iter(lambda: [(a, NO_KWARGS) for a in itertools.islice(argument_sets, chunksize)], [])
    from sheepdog_executor.remote.worker import run_chunk  # the worker's module: imported when needed

    return functools.partial(run_chunk, fn), (((chunk,), NO_KWARGS) for chunk in chunks)


def with_progress(results: Iterator[T], total: int | None, desc: str, shown: bool | None) -> Iterator[T]:
    """``results`` behind a progress bar on stderr, as the ``progress`` option (``shown``) says."""
    if shown is False:
        return results
    from sheepdog_executor.progress import progress

    auto = shown is None
    delay = AUTO_PROGRESS_SECONDS if auto and (total or 0) <= AUTO_PROGRESS_CALLS else 0.0
    return progress(results, total, desc, disable=None if auto else False, delay=delay)


def ordered_results(
    futures: list[Future[T]],
    end_time: float | None,
    refill: Callable[[], Future[T] | None] | None,
    interrupted: Callable[[], None] = lambda: None,
) -> Generator[T, None, None]:
    """Yield results in order; on timeout, error or abandonment cancel the rest (as CPython does);
    on a KeyboardInterrupt, also stop the running ones (``interrupted``): one that comes while it
    waits, or while a progress bar counts a result (which closes it meanwhile). Holds no
    reference to a result it yielded; with ``refill``, submits one more call before each result is
    awaited (``buffersize``)."""
    pending = collections.deque(futures)
    del futures
    try:
        while pending:
            if refill is not None and (more := refill()) is not None:
                pending.append(more)
                del more
            yield _result_or_cancel(pending.popleft(), end_time)
    except (KeyboardInterrupt, GeneratorExit) as stop:
        if _by_interrupt(stop):
            for future in pending:  # first: no queued call of the map can start after this
                future.cancel()
            interrupted()
        raise
    finally:
        for future in pending:
            future.cancel()


def _by_interrupt(stop: BaseException | None) -> bool:
    """A KeyboardInterrupt, or a generator closed while one propagates (through others closed)."""
    while isinstance(stop, GeneratorExit):
        stop = stop.__context__
    return isinstance(stop, KeyboardInterrupt)


def _result_or_cancel(future: Future[T], end_time: float | None) -> T:
    try:
        try:
            return future.result(None if end_time is None else max(end_time - time.monotonic(), 0))
        except (FuturesTimeout, KeyboardInterrupt):  # the call awaited, if it has not started yet
            future.cancel()
            raise
    finally:
        del future  # no reference to the result from this frame's traceback either


def flatten(chunks: Generator[list[T], None, None]) -> Iterator[T]:
    """The results of each chunk in order, each list emptied as it goes (no reference kept);
    closing it closes ``chunks`` at once (an interrupt's trace goes with it)."""
    try:
        for chunk in chunks:
            chunk.reverse()
            while chunk:
                yield chunk.pop()
    finally:
        chunks.close()
