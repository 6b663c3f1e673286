"""The calls in flight: the queue of pending calls, which worker holds which, results to Futures.

Four threads meet here: the user's (``add``), the endpoint's (``hello``/``exchange``/``heartbeat``),
the job manager's (``take_lost``, ``fail_items``) and the results thread, which alone unpickles
results and resolves Futures (as CPython's executor manager thread does), so that a user's
done-callback never stalls the endpoint and its heartbeats. One lock guards the state; Futures are
resolved outside it, each in its own ``try``, so that nothing can strand one.

A call's arguments stay as the caller gave them until a worker takes the call; they are pickled then
(as ``ProcessPoolExecutor`` pickles at its call queue), so pending calls cost no pickled copy, and a
lost call is pickled again for its retry. A result counts only when it comes from the worker and
attempt that hold the call, so a late or replayed result never resolves a Future twice.
"""

from __future__ import annotations

import collections
import logging
import pickle
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from sheepdog_executor import pickling
from sheepdog_executor.callfuture import CallFuture
from sheepdog_executor.clock import awake_or_asleep
from sheepdog_executor.errors import (
    BrokenClusterExecutor,
    PythonVersionMismatch,
)
from sheepdog_executor.functions import FunctionCache
from sheepdog_executor.handout import MAX_BYTES_PER_REPLY, HandOut
from sheepdog_executor.remote.protocol import Error, Item, Result
from sheepdog_executor.results import Outcome, Results, set_exception
from sheepdog_executor.stats import Stats
from sheepdog_executor.workers import Worker, WorkerRegistry, WorkerSeen

log = logging.getLogger("sheepdog_executor")

#: WorkItem.state: waiting for a worker, held by one (or lost, being diagnosed), resolved.
QUEUED, HELD, ENDED = 0, 1, 2
NO_KWARGS: dict[str, Any] = {}


class WorkItem:
    """One call (a map's chunk is a call of ``run_chunk``) waiting for, or held by, a worker."""

    __slots__ = ("id", "future", "fn_key", "args", "kwargs", "batch", "attempt", "worker",
                 "losses", "undelivered", "state")  # fmt: skip

    def __init__(
        self,
        id: int,
        future: Future[Any],
        fn_key: str,
        args: Any,
        kwargs: dict[str, Any] | None = None,
        batch: int = 0,
    ) -> None:
        self.id = id
        self.future = future
        self.fn_key = fn_key
        self.args = args
        self.kwargs = kwargs
        self.batch = batch
        self.attempt = 0
        self.worker: str | None = None
        self.losses: tuple[str, ...] = ()  # the workers lost while holding it (rare: no list per call)
        #: Hand-outs whose reply never reached the worker: not runs, so they use up no retry.
        self.undelivered = 0
        self.state = QUEUED

    def arguments(self) -> tuple[Any, dict[str, Any] | None]:
        """What the worker's ``call`` unpickles for this item: ``(args, kwargs)``."""
        return (self.args, self.kwargs)


@dataclass(frozen=True)
class Liveness:
    """What the job manager judges workers and jobs by: the dispatcher's view at one moment."""

    workers: tuple[WorkerSeen, ...]
    #: (job, task) of every task whose worker ever said hello.
    tasks_seen: frozenset[tuple[str, int]]
    #: Calls waiting for a worker, and calls taken by workers and not resolved yet.
    pending: int
    held: int
    #: The workers' heartbeat interval.
    heartbeat: float


class Dispatcher:
    """Hands pending calls to workers and turns their results into resolved Futures."""

    def __init__(
        self,
        *,
        retries: int = 0,
        idle_timeout: float = 5.0,
        heartbeat: float = 5.0,
        initializer: bytes | None = None,
        python: tuple[int, int] | None = None,
        echo_output: bool = False,
        max_workers: int = 1,
        disconnect_tolerance: float = 600.0,
    ) -> None:
        self.retries = retries
        self.disconnect_tolerance = disconnect_tolerance
        self.max_workers = max_workers
        #: How many calls go out in one reply.
        self.hand_out = HandOut(max_workers)
        self.idle_timeout = idle_timeout
        self.heartbeat = heartbeat
        self._initializer = initializer
        self._python = python
        self._lock = threading.Lock()
        self._next_id = 1
        self._pending: deque[WorkItem] = deque()
        self._stale = 0  # entries of _pending whose call was cancelled (skipped when reached)
        self._unresolved = 0  # calls added whose Future is not resolved yet
        self._functions = FunctionCache()
        #: The workers that said hello.
        self.registry = WorkerRegistry()
        self.stats = Stats()
        self.broken: BaseException | None = None
        self.stopping = False
        #: The results thread: it alone unpickles results and resolves Futures.
        self.results = Results(self.stats, self._resolved, self.break_, lambda: self.on_change(), echo_output)
        #: Called (from any thread) when there is new work or the state changed; set by the owner.
        self.on_change: Callable[[], None] = lambda: None
        self.on_work: Callable[[], None] = lambda: None
        #: Called with a worker's id when it is declared lost (its partial results are freed).
        self.on_lost: Callable[[str], None] = lambda worker_id: None
        #: With a sweep (``sweep=``): of the calls a lost worker held, those it kept in the store
        #: before it went, with their pickled values (``Sweep.recover``); they are not lost.
        self.recover: Callable[[str, list[WorkItem]], list[tuple[WorkItem, bytes]]] | None = None

    # -- life ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the results thread."""
        self.results.start()

    def close(self) -> None:
        """Resolve what the results thread still holds, then end it."""
        self.results.close()

    # -- the user's side --------------------------------------------------------------------
    def function_key(self, fn: Callable[..., Any]) -> tuple[str, bytes]:
        """(key, pickle) of ``fn``: pickled once while calls of it are outstanding."""
        known = self._functions.known(fn)
        if known is not None:
            return known
        key, blob = pickling.dump_function(fn)
        with self._lock:
            self._functions.remember(fn, key, blob)
        return key, blob

    def add(
        self,
        fn: Callable[..., Any],
        arguments: Sequence[tuple[Any, dict[str, Any] | None]],
        futures: Sequence[Future[Any]],
        batch: int = 0,
        label: str = "",
    ) -> None:
        """Queue calls of ``fn`` as part of ``batch``: (args, kwargs) and a Future each; the
        arguments are pickled only when a worker takes the call."""
        key, blob = self.function_key(fn)
        count = len(futures)
        with self._lock:
            if self.broken is not None:
                raise BrokenClusterExecutor(str(self.broken)) from self.broken
            was_short = len(self._pending) - self._stale == 0 or self._unresolved < self.max_workers
            self._functions.use(fn, key, blob, count)
            first = self._next_id
            self._next_id += count
            pending = self._pending
            for i, (args, kwargs) in enumerate(arguments):
                future = futures[i]
                item = WorkItem(first + i, future, key, args, kwargs, batch)
                if type(future) is CallFuture:
                    future._on_cancel = self._forget_cancelled
                    future._item = item
                pending.append(item)
            self._unresolved += count
        self.stats.queued(batch, label or f"batch {batch}", count)
        if was_short:  # otherwise the workers are busy and the job manager already has enough to do
            self.on_work()
            self.on_change()

    def function_blob(self, key: str) -> bytes:
        """The pickle of a function whose calls are on the books (a detached sweep ships it)."""
        with self._lock:
            return self._functions.blob(key)

    def snapshot(self) -> dict[str, Any]:
        """Batches, recent errors and live workers, JSON-able (for the status page and progress)."""
        with self._lock:
            workers = self.registry.rows(awake_or_asleep())
        return {
            **self.stats.snapshot(),
            "workers": workers,
            "broken": str(self.broken) if self.broken else None,
        }

    def counts(self) -> tuple[int, int]:
        """(calls waiting for a worker, calls taken by workers and not resolved yet)."""
        with self._lock:
            pending = len(self._pending) - self._stale
            return pending, self._unresolved - pending

    def outstanding(self) -> int:
        return self._unresolved

    def liveness(self) -> Liveness:
        """A snapshot of the workers and counts, for the job manager (which reads no table here)."""
        with self._lock:
            workers, seen = self.registry.seen()
            pending = len(self._pending) - self._stale
            return Liveness(workers, seen, pending, self._unresolved - pending, self.heartbeat)

    @property
    def workers(self) -> dict[str, Worker]:
        """The registered workers by id (the registry's table: read under the lock)."""
        return self.registry.workers

    @property
    def tasks_seen(self) -> set[tuple[str, int]]:
        return self.registry.tasks_seen

    @property
    def _items(self) -> dict[int, WorkItem]:
        """The calls workers hold, by id (for tests that act as a worker)."""
        with self._lock:
            return self.registry.held()

    # -- the endpoint's side ----------------------------------------------------------------
    def hello(self, message: dict[str, Any]) -> dict[str, Any]:
        python = tuple(message.get("python", ()))[:2]
        job, task = str(message.get("job")), int(message.get("task", 0))
        with self._lock:
            self.registry.tasks_seen.add((job, task))
        if self._python is not None and python != self._python:
            error = PythonVersionMismatch(
                f"the workers run Python {'.'.join(map(str, message.get('python', ())))} on "
                f"{message.get('host')} but this client runs Python {'.'.join(map(str, self._python))}; "
                "pickled functions only travel between the same minor version: set python= (or "
                "setup=) so the nodes use a matching interpreter",
                job_id=job,
                task_id=task,
            )
            self.fail_pending(error)
            return {"error": str(error)}
        worker = Worker(str(message["worker"]), job, task, str(message.get("host", "?")), awake_or_asleep())
        worker.route = str(message.get("route", ""))[:40]
        with self._lock:
            if self.stopping:
                return {"error": "the executor is shutting down"}
            self.registry.workers[worker.id] = worker
        log.debug("worker %s on %s said hello (route %s)", worker.id, worker.host, worker.route)
        self.on_change()
        return {
            "initializer": self._initializer,
            "heartbeat": self.heartbeat,
            "disconnect_tolerance": self.disconnect_tolerance,
        }

    def heartbeat_from(self, worker_id: str) -> bool:
        with self._lock:
            return self.registry.heard_from(worker_id) is not None

    def exchange(
        self,
        worker_id: str,
        results: list[Result],
        fatal: bytes | None = None,
        request: int | None = None,
    ) -> dict[str, Any] | None:
        """Take a worker's results; return its next calls, ``{"stop": True}``, or None to wait.
        ``request`` numbers the worker's ``/work`` requests (a retry keeps its number); None for a
        long-polling request asking again."""
        try:
            return self._exchange(worker_id, results, fatal, request)
        except Exception as exc:  # a bug here must fail the futures loudly, never strand them
            log.exception("dispatcher failed")
            self.break_(BrokenClusterExecutor(f"internal error in the dispatcher: {exc!r}"))
            return {"stop": True}

    def _exchange(
        self, worker_id: str, results: list[Result], fatal: bytes | None, request: int | None
    ) -> dict[str, Any] | None:
        delivered: list[Outcome] = []
        with self._lock:
            worker = self.registry.heard_from(worker_id)
            if worker is None:
                return {"stop": True}
            if request is not None:
                # copies of a request arrive late when the client was away (suspended, offline):
                # the worker sent it again on another connection, or has moved on since
                if request < worker.request:
                    return {"items": []}  # nobody reads this answer: the worker left that connection
                if request == worker.request and worker.answer is not None:
                    return worker.answer  # the worker did not get it: the same calls again
                worker.request, worker.answer = request, None
            held = worker.items
            for result in results:
                item = held.get(result.item)
                if item is None or item.attempt != result.attempt:
                    continue  # late, duplicate or replayed
                del held[result.item]
                item.state = ENDED
                worker.calls_done += 1
                self.hand_out.observe(result.seconds)
                delivered.append((item, result))
            # A worker asks for work only once it has run everything it was given: calls it still
            # holds never reached it (the reply was lost with its connection). Queue them again.
            for item_id in sorted(held, reverse=True):
                item = held[item_id]
                item.worker = None
                item.state = QUEUED
                item.undelivered += 1
                self._pending.appendleft(item)
                self.stats.requeued(item.batch)
                log.warning("call %d never reached worker %s; queued again", item.id, worker_id)
            if held:
                held.clear()
                self.on_work()
        if delivered:
            self.results.put(delivered)  # one hand-over per exchange: the results thread resolves
        if fatal is not None:
            self._initializer_failed(fatal)
            return {"stop": True}
        failed: list[Outcome] = []
        try:
            with self._lock:
                if self.stopping or self.broken is not None:
                    return self._stop(worker)
                batch = self._take(worker, failed)
                if batch:
                    worker.idle_since = None
                    keys = {item.fn_key for item in batch} - worker.functions_sent
                    functions = {key: self._functions.blob(key) for key in keys}
                    worker.functions_sent.update(functions)
                    worker.answer = {"items": [item.wire() for item in batch], "functions": functions}
                    return worker.answer
                now = awake_or_asleep()
                if worker.idle_since is None:
                    worker.idle_since = now
                if now - worker.idle_since >= self.idle_timeout:
                    return self._stop(worker)
                return None
        finally:
            if failed:
                self.results.put(failed)

    def _stop(self, worker: Worker) -> dict[str, Any] | None:
        if worker.items:
            return None  # it still owes results; let it deliver them first
        self.registry.workers.pop(worker.id, None)
        self.on_change()
        return {"stop": True}

    def _forget_cancelled(self, item: WorkItem) -> None:
        """A queued call's Future was cancelled: it leaves the books now (its queue entry is
        skipped when reached)."""
        with self._lock:
            if item.state != QUEUED:
                return  # taken meanwhile, or already accounted for
            item.state = ENDED
            item.future._item = None  # type: ignore[attr-defined]
            self._functions.release(item.fn_key)
            self._stale += 1
            self._unresolved -= 1
            if self._stale == len(self._pending):
                self._pending.clear()
                self._stale = 0
        self.stats.ended(item.batch, "cancelled", was_running=False)
        self.on_change()

    def _take(self, worker: Worker, failed: list[Outcome]) -> list[Item]:
        """The calls of the next reply (as many as ``hand_out`` says), their arguments pickled now;
        a call whose arguments do not pickle goes to ``failed``."""
        want = self.hand_out.share(
            len(self._pending) - self._stale, len(self.registry.workers), self._unresolved
        )
        batch: list[Item] = []
        taken: list[WorkItem] = []
        size = 0
        pending, held = self._pending, worker.items
        while pending and len(batch) < want and size < MAX_BYTES_PER_REPLY:
            item = pending.popleft()
            if item.state != QUEUED:  # cancelled while queued
                self._stale -= 1
                continue
            if item.attempt == 0 and not item.future.set_running_or_notify_cancel():
                item.state = ENDED  # cancelled just now: its own cancel() finds it taken
                self._functions.release(item.fn_key)
                self._unresolved -= 1
                self.stats.ended(item.batch, "cancelled", was_running=False)
                continue
            item.future._item = None  # type: ignore[attr-defined]  # no cycle once it left the queue
            try:
                payload = _dumps_arguments(item)
            except Exception as exc:  # noqa: BLE001 - the call's own error, as ProcessPoolExecutor's
                item.state = ENDED
                self._functions.release(item.fn_key)
                self.stats.started(item.batch, worker.host)
                failed.append((item, exc))
                continue
            item.attempt += 1
            item.worker = worker.id
            item.state = HELD
            held[item.id] = item
            batch.append(Item(item.id, item.attempt, item.fn_key, payload))
            taken.append(item)
            size += len(payload)
        for batch_id, count in collections.Counter(item.batch for item in taken).items():
            self.stats.started(batch_id, worker.host, count)
        return batch

    def _initializer_failed(self, fatal: bytes) -> None:
        tb = Error(*pickle.loads(fatal)).traceback
        self.break_(BrokenClusterExecutor(f"the initializer failed on a worker, so no call can run:\n{tb}"))

    def _resolved(self, count: int, released: collections.Counter[str]) -> None:
        """The results thread resolved ``count`` calls, of these functions: off the books."""
        with self._lock:
            self._unresolved -= count
            for key, uses in released.items():
                self._functions.release(key, uses)

    # -- the job manager's side ------------------------------------------------------------
    def take_lost(self, worker_id: str) -> list[WorkItem]:
        """Forget a dead worker; return the calls it held (unresolved, held by nobody)."""
        with self._lock:
            worker = self.registry.workers.pop(worker_id, None)
            if worker is None:
                return []
            items = [worker.items[i] for i in sorted(worker.items)]
            worker.items.clear()
            for item in items:
                item.worker = None
                item.losses += (f"{worker.job}.{worker.task}",)
        self.on_lost(worker_id)
        if self.recover is not None and items:
            items = self._resolve_kept(items, self.recover(worker_id, items))
        self.on_change()
        return items

    def _resolve_kept(self, items: list[WorkItem], kept: list[tuple[WorkItem, bytes]]) -> list[WorkItem]:
        """Resolve the lost calls whose values a sweep kept (as results of their worker); return
        the others."""
        if not kept:
            return items
        with self._lock:
            for item, _ in kept:
                item.state = ENDED
        done = {item.id for item, _ in kept}
        self.results.put([(item, Result(item.id, item.attempt, True, data, "")) for item, data in kept])
        log.info("%d call(s) of a lost worker were kept in the sweep's store: not run again", len(kept))
        return [item for item in items if item.id not in done]

    def take_batch(self, batch: int) -> list[tuple[Worker, list[WorkItem]]]:
        """Forget the workers that hold calls of ``batch`` and of nothing else; return each with
        those calls (unresolved, held by nobody): an interrupted map stops them where they run.
        A worker that also holds calls of another batch is left to finish them."""
        with self._lock:
            taken = self.registry.take_holding_only(batch)
        if taken:
            self.on_change()
        return taken

    def take_pending(self) -> list[WorkItem]:
        """Take every call still waiting for a worker out of the queue."""
        with self._lock:
            items = [item for item in self._pending if item.state == QUEUED]
            for item in items:
                item.state = HELD  # off the queue: only fail_items or retry_or_split ends it now
                item.future._item = None  # type: ignore[attr-defined]
            self._pending.clear()
            self._stale = 0
        return items

    def retry_or_split(self, items: list[WorkItem]) -> tuple[list[WorkItem], list[WorkItem]]:
        """Queue again the lost calls that have retries left; return (retried, out of retries)."""
        retried, failed = [], []
        with self._lock:
            for item in items:
                if (
                    item.attempt - item.undelivered <= self.retries
                    and not self.stopping
                    and self.broken is None
                ):
                    retried.append(item)
                else:
                    failed.append(item)
            for item in reversed(retried):
                log.warning("call %d lost (%s); running it again", item.id, ", ".join(item.losses))
                item.state = QUEUED
                self._pending.appendleft(item)
                self.stats.requeued(item.batch)
        if retried:
            self.on_work()
            self.on_change()
        return retried, failed

    def fail_items(self, items: list[WorkItem], error: BaseException, outcome: str = "failed") -> None:
        """Resolve these calls (taken out with ``take_*``) with ``error``, each in its own try; they
        count as ``outcome`` ("failed", or "cancelled": stopped on purpose, no error to list)."""
        with self._lock:
            items = [item for item in items if item.state != ENDED]
            for item in items:
                item.state = ENDED
                self._functions.release(item.fn_key)
        text = f"{type(error).__name__}: {error}"
        for item in items:
            try:
                if item.future.running() or item.future.set_running_or_notify_cancel():
                    failed = text if outcome == "failed" else None
                    self.stats.ended(item.batch, outcome, error=failed, was_running=item.attempt > 0)
                    set_exception(item.future, error)
                else:
                    self.stats.ended(item.batch, "cancelled", was_running=False)
            except Exception:  # noqa: BLE001 - the others must still end
                log.exception("failing call %d", item.id)
        with self._lock:
            self._unresolved -= len(items)
        self.on_change()

    def fail_pending(self, error: BaseException) -> None:
        """Fail every call still waiting for a worker (one clear error, never a hang)."""
        self.fail_items(self.take_pending(), error)

    def fail_all(self, error: BaseException) -> None:
        """Fail every unresolved call, held by a worker or not (results already in the results
        thread's hands are resolved by it)."""
        with self._lock:
            items = [item for item in self._pending if item.state == QUEUED]
            self._pending.clear()
            self._stale = 0
            for worker in self.registry.workers.values():
                items.extend(worker.items.values())
                worker.items.clear()
        self.fail_items(items, error)

    def cancel_pending(self, reason: str = "") -> None:
        """Cancel every call no worker has taken yet (a lost call queued for its retry is running,
        as far as its Future is concerned: it stays); ``reason`` is their CancelledError's message."""
        with self._lock:
            items = [item for item in self._pending if item.state == QUEUED and item.attempt == 0]
            for item in items:
                item.state = ENDED
                item.future._item = None  # type: ignore[attr-defined]
                self._functions.release(item.fn_key)
            kept = [item for item in self._pending if item.state == QUEUED and item.attempt > 0]
            self._pending = deque(kept)
            self._stale = 0
        for item in items:
            if type(item.future) is CallFuture:
                item.future.cancel_because(reason)
            else:
                item.future.cancel()
        self.stats.ended_many([(item.batch, "cancelled", 0.0, None, False) for item in items])
        with self._lock:
            self._unresolved -= len(items)
        self.on_change()

    def break_(self, error: BaseException) -> None:
        with self._lock:
            if self.broken is None:
                self.broken = error
        self.fail_all(error)

    def stop(self) -> None:
        """From now on idle workers are told to stop at once."""
        with self._lock:
            self.stopping = True
        self.on_work()


_SCALARS = (int, float, str, bytes, bool, type(None))


def _dumps_arguments(item: WorkItem) -> bytes:
    """Pickle a call's arguments; a call of a few scalars (most of a big map's) takes the C
    pickler directly, everything else ``pickling.dumps``."""
    args = item.args
    if not item.kwargs and type(args) is tuple and len(args) <= 8:
        for arg in args:
            if type(arg) not in _SCALARS:
                break
        else:
            return pickle.dumps((args, NO_KWARGS), protocol=pickling.PICKLE_PROTOCOL)
    return pickling.dumps(item.arguments())
