"""The calls in flight: the queue of pending calls, which worker holds which, results to Futures.

Four threads meet here: the user's (``add``), the endpoint's (``hello``/``exchange``/``heartbeat``),
the job manager's (``take_lost``, ``fail_items``) and the results thread, which alone unpickles
results and resolves Futures (as CPython's executor manager thread does), so that a user's
done-callback never stalls the endpoint and its heartbeats. One lock guards the state (the call
queue's too, ``calls.py``); Futures are resolved outside it, each in its own ``try``, so that
nothing can strand one. A result counts only when it comes from the worker and attempt that hold the
call, so a late or replayed result never resolves a Future twice.
"""

from __future__ import annotations

import logging
import pickle
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from sheepdog_executor.away import Heard
from sheepdog_executor.calls import NO_KWARGS, CallBook, WorkItem, dumps_arguments
from sheepdog_executor.clock import awake_or_asleep
from sheepdog_executor.errors import BrokenClusterExecutor
from sheepdog_executor.handout import HandOut
from sheepdog_executor.remote.protocol import Error, Result
from sheepdog_executor.resources import Resources
from sheepdog_executor.results import Outcome, Results
from sheepdog_executor.stats import Stats
from sheepdog_executor.workers import Worker, WorkerRegistry, WorkerSeen, python_mismatch

log = logging.getLogger("sheepdog_executor")
__all__ = ["NO_KWARGS", "Dispatcher", "Liveness", "WorkItem"]


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
    #: Whether the endpoint could hear them lately, and its pauses (this process suspended).
    heard: Heard = Heard(None, 0, 0.0)


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
        needs: Resources | None = None,
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
        #: The workers that said hello; its tables (read them under the lock).
        self.registry = WorkerRegistry()
        self.workers: dict[str, Worker] = self.registry.workers
        self.tasks_seen: set[tuple[str, int]] = self.registry.tasks_seen
        self.stats = Stats()
        #: The unresolved calls: queues by resource set, the books they share.
        self.calls = CallBook(self._lock, self.stats, lambda: self.on_change(), needs or Resources())
        self._books = self.calls.books
        self.queue = self.calls.default
        self.broken: BaseException | None = None
        self.stopping = False
        #: The results thread: it alone unpickles results and resolves Futures.
        self.results = Results(
            self.stats, self.calls.resolved, self.break_, lambda: self.on_change(), echo_output
        )
        #: Called (from any thread) when there is new work or the state changed; set by the owner.
        self.on_change: Callable[[], None] = lambda: None
        self.on_work: Callable[[], None] = lambda: None
        #: Runs calls killed over a limit ("mem", "time") again with more; returns those it cannot.
        self.escalate: Callable[[list[WorkItem], str], list[WorkItem]] | None = None
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
    def add(
        self,
        fn: Callable[..., Any],
        arguments: Sequence[tuple[Any, dict[str, Any] | None]],
        futures: Sequence[Future[Any]],
        batch: int = 0,
        label: str = "",
        needs: Resources | None = None,
    ) -> None:
        """Queue calls of ``fn`` as part of ``batch``: (args, kwargs) and a Future each; the
        arguments are pickled only when a worker takes the call. ``needs``: the calls' resource
        set (None: the executor's own)."""
        key, blob = self.queue.function_key(fn)
        with self._lock:
            if self.broken is not None:
                raise BrokenClusterExecutor(str(self.broken)) from self.broken
            queue = self.queue if needs is None else self.calls.queue(needs)
            was_short = queue.waiting() == 0 or self._books.unresolved < self.max_workers
            queue.add_locked(fn, key, blob, arguments, futures, batch)
        self.stats.queued(batch, label or f"batch {batch}", len(futures))
        if was_short:  # otherwise the workers are busy and the job manager already has enough to do
            self.on_work()
            self.on_change()

    def function_blob(self, key: str) -> bytes:
        """The pickle of a function whose calls are on the books (a detached sweep ships it)."""
        with self._lock:
            return self._books.functions.blob(key)

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
            pending = self.calls.waiting()
            return pending, self._books.unresolved - pending

    def outstanding(self) -> int:
        return self._books.unresolved

    def liveness(self, needs: Resources | None = None) -> Liveness:
        """A snapshot of the workers and counts, for the job manager (which reads no table here);
        with ``needs``, of that resource set's calls and workers only (when there are others)."""
        heard = self.registry.hearing.snapshot()  # before the workers: a pause is counted first
        with self._lock:
            if needs is None or len(self.calls.queues) == 1:
                workers, seen = self.registry.seen()
                pending = self.calls.waiting()
                held = self._books.unresolved - pending
                return Liveness(workers, seen, pending, held, self.heartbeat, heard)
            queue = self.calls.queue(needs)
            workers, seen = self.registry.seen(lambda worker: (worker.queue or self.queue) is queue)
            held = sum(len(self.registry.workers[w.id].items) for w in workers)
            return Liveness(workers, seen, queue.waiting(), held, self.heartbeat, heard)

    @property
    def _items(self) -> dict[int, WorkItem]:
        """The calls workers hold, by id (for tests that act as a worker)."""
        with self._lock:
            return self.registry.held()

    # -- the endpoint's side ----------------------------------------------------------------
    def hello(self, message: dict[str, Any]) -> dict[str, Any]:
        job, task = str(message.get("job")), int(message.get("task", 0))
        with self._lock:
            self.registry.tasks_seen.add((job, task))
        error = python_mismatch(message, self._python)
        if error is not None:
            self.fail_pending(error)
            return {"error": str(error)}
        worker = Worker.of(message, self.calls.by_label(str(message.get("resources", ""))))
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
        retire: bool = False,
    ) -> dict[str, Any] | None:
        """Take a worker's results; return its next calls, ``{"stop": True}``, or None to wait.
        ``request`` numbers the worker's ``/work`` requests (a retry keeps its number); None for a
        long-polling request asking again. A worker that ``retire``s (its task's time or memory
        would run out under its next call: ``remote/budget.py``) hands back the calls it did not
        run, and stops."""
        try:
            return self._exchange(worker_id, results, fatal, request, retire)
        except Exception as exc:  # a bug here must fail the futures loudly, never strand them
            log.exception("dispatcher failed")
            self.break_(BrokenClusterExecutor(f"internal error in the dispatcher: {exc!r}"))
            return {"stop": True}

    def _exchange(
        self, worker_id: str, results: list[Result], fatal: bytes | None, request: int | None, retire: bool
    ) -> dict[str, Any] | None:
        with self._lock:
            worker = self.registry.heard_from(worker_id)
            if worker is None:
                return {"stop": True}
            replayed = worker.replay(request, dumps_arguments)
            if replayed is not None:
                return replayed
            delivered, undelivered = worker.take_results(results, self.hand_out.observe)
            self.calls.requeue_undelivered_locked(undelivered, worker_id, retire)
            if undelivered:
                self.on_work()
        if delivered:
            self.results.put(delivered)  # one hand-over per exchange: the results thread resolves
        if fatal is not None:
            self._initializer_failed(fatal)
            return {"stop": True}
        failed: list[Outcome] = []
        try:
            with self._lock:
                if self.stopping or self.broken is not None or retire:
                    return self._stop(worker)
                queue = worker.queue or self.queue  # as many calls as ``hand_out`` says
                want = self.hand_out.share(
                    queue.waiting(), len(self.registry.workers), self._books.unresolved
                )
                batch = worker.take_from(queue, want, failed)
                if batch:
                    return worker.reply(batch, self._books.functions.blob)
                if worker.idle_for(awake_or_asleep()) >= self.idle_timeout:
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

    def _initializer_failed(self, fatal: bytes) -> None:
        tb = Error(*pickle.loads(fatal)).traceback
        self.break_(BrokenClusterExecutor(f"the initializer failed on a worker, so no call can run:\n{tb}"))

    # -- the job manager's side ------------------------------------------------------------
    def take_lost(self, worker_id: str) -> list[WorkItem]:
        """Forget a dead worker; return the calls it held (unresolved, held by nobody)."""
        with self._lock:
            items = self.registry.take_lost(worker_id)
        if items is None:
            return []
        self.on_lost(worker_id)
        if self.recover is not None and items and (kept := self.recover(worker_id, items)):
            outcomes, items = self.calls.end_kept(items, kept)
            self.results.put(outcomes)  # resolved as results of their worker
            log.info("%d call(s) of a lost worker were kept in the sweep's store: not run again", len(kept))
        self.on_change()
        return items

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
        return self.calls.take_waiting()

    def retry_or_split(self, items: list[WorkItem]) -> tuple[list[WorkItem], list[WorkItem]]:
        """Queue again the lost calls that have retries left; return (retried, out of retries)."""
        with self._lock:
            closing = self.stopping or self.broken is not None
            retried, failed = self.calls.retry_locked(items, -1 if closing else self.retries)
        if retried:
            self.on_work()
            self.on_change()
        return retried, failed

    def fail_items(self, items: list[WorkItem], error: BaseException, outcome: str = "failed") -> None:
        """Resolve these calls (taken out with ``take_*``) with ``error`` (``CallBook.end``)."""
        self.calls.end(items, error, outcome)

    def fail_pending(self, error: BaseException) -> None:
        """Fail every call still waiting for a worker (one clear error, never a hang)."""
        self.fail_items(self.take_pending(), error)

    def fail_all(self, error: BaseException) -> None:
        """Fail every unresolved call, held by a worker or not (results already in the results
        thread's hands are resolved by it)."""
        with self._lock:
            items = self.calls.take_all_locked() + self.registry.take_all_items()
        self.fail_items(items, error)

    def cancel_pending(self, reason: str = "") -> None:
        """Cancel every call no worker has taken yet (``CallBook.cancel_unstarted``)."""
        self.calls.cancel_unstarted(reason)

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
