"""The call queue: calls waiting for a worker, their cancellation while they wait, and the cache of
the functions they call (pickled once while calls of them are outstanding).

A call's arguments stay as the caller gave them until a worker takes the call; they are pickled then
(as ``ProcessPoolExecutor`` pickles at its call queue), so pending calls cost no pickled copy, and a
lost call is pickled again for its retry. ``CallQueue`` shares its owner's lock (the dispatcher's):
methods named ``*_locked`` expect it held, the others take it.
"""

from __future__ import annotations

import collections
import logging
import pickle
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from sheepdog_executor import pickling
from sheepdog_executor.callfuture import CallFuture
from sheepdog_executor.functions import FunctionCache
from sheepdog_executor.handout import MAX_BYTES_PER_REPLY
from sheepdog_executor.remote.protocol import Result, WireItem
from sheepdog_executor.resources import Resources
from sheepdog_executor.results import Outcome, set_exception
from sheepdog_executor.stats import Stats

log = logging.getLogger("sheepdog_executor")
#: WorkItem.state: waiting for a worker, held by one (or lost, being diagnosed), resolved.
QUEUED, HELD, ENDED = 0, 1, 2
NO_KWARGS: dict[str, Any] = {}


class WorkItem:
    """One call (a map's chunk is a call of ``run_chunk``) waiting for, or held by, a worker."""

    __slots__ = ("id", "future", "fn_key", "args", "kwargs", "batch", "attempt", "worker",
                 "losses", "undelivered", "state", "queue", "history", "head_start", "bound")  # fmt: skip

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
        #: Hand-outs that use up no retry: replies that never reached the worker, calls a retiring
        #: worker handed back unrun, runs its task's time ran out under (``diagnosis``).
        self.undelivered = 0
        self.state = QUEUED
        #: Seconds between its worker's first request for calls and this call's latest hand-out:
        #: a call handed out late in its task may be killed by the task's time limit, not by its
        #: own length.
        self.head_start = 0.0
        #: The queue it waits in (its resource set's), and goes back to when it is run again.
        self.queue: CallQueue | None = None
        #: The resource sets it was killed in over a limit, first to last (escalation.py).
        self.history: tuple[Resources, ...] = ()
        #: Why escalation could not raise it further, when the site's limit stopped it
        #: ("partition short allows at most time=0:01:00").
        self.bound = ""

    def arguments(self) -> tuple[Any, dict[str, Any] | None]:
        """What the worker's ``call`` unpickles for this item: ``(args, kwargs)``."""
        return (self.args, self.kwargs)


class Books:
    """What the queues of one executor share: calls added whose Future is not resolved yet, and
    the functions they call."""

    __slots__ = ("unresolved", "functions", "next_id")

    def __init__(self) -> None:
        self.unresolved = 0
        self.functions = FunctionCache()
        self.next_id = 1


class CallQueue:
    """The calls waiting for a worker, in order; a cancelled one leaves the books at once and its
    entry is skipped when reached."""

    def __init__(
        self, lock: threading.Lock, books: Books, stats: Stats, on_change: Callable[[], None]
    ) -> None:
        self._lock = lock
        #: Called (outside the lock) when a cancelled call left the books.
        self._on_change = on_change
        self.books = books
        self.functions = books.functions
        self.stats = stats
        self._pending: deque[WorkItem] = deque()
        self._stale = 0  # entries of _pending whose call was cancelled (skipped when reached)
        #: What its calls need (its resource set).
        self.needs = Resources()

    def waiting(self) -> int:
        """Calls waiting for a worker (call with the lock held, or for an estimate)."""
        return len(self._pending) - self._stale

    # -- the user's side ------------------------------------------------------------------------
    def function_key(self, fn: Callable[..., Any]) -> tuple[str, bytes]:
        """(key, pickle) of ``fn``: pickled once while calls of it are outstanding."""
        known = self.functions.known(fn)
        if known is not None:
            return known
        key, blob = pickling.dump_function(fn)
        with self._lock:
            self.functions.remember(fn, key, blob)
        return key, blob

    def add_locked(
        self,
        fn: Callable[..., Any],
        key: str,
        blob: bytes,
        arguments: Sequence[tuple[Any, dict[str, Any] | None]],
        futures: Sequence[Future[Any]],
        batch: int,
    ) -> None:
        """Queue calls of ``fn``: (args, kwargs) and a Future each."""
        count = len(futures)
        self.functions.use(fn, key, blob, count)
        first = self.books.next_id
        self.books.next_id += count
        pending = self._pending
        for i, (args, kwargs) in enumerate(arguments):
            future = futures[i]
            item = WorkItem(first + i, future, key, args, kwargs, batch)
            item.queue = self
            if type(future) is CallFuture:
                future._on_cancel = self.forget_cancelled
                future._item = item
            pending.append(item)
        self.books.unresolved += count

    def forget_cancelled(self, item: WorkItem) -> None:
        """A queued call's Future was cancelled: it leaves the books now (unless it was taken
        meanwhile, or is already accounted for)."""
        with self._lock:
            if item.state != QUEUED:
                return
            item.state = ENDED
            item.future._item = None  # type: ignore[attr-defined]
            self.functions.release(item.fn_key)
            self._stale += 1
            self.books.unresolved -= 1
            if self._stale == len(self._pending):
                self._pending.clear()
                self._stale = 0
        self.stats.ended(item.batch, "cancelled", was_running=False)
        self._on_change()

    # -- the workers' side ----------------------------------------------------------------------
    def take_locked(
        self,
        want: int,
        worker: str,
        host: str,
        held: dict[int, WorkItem],
        failed: list[Outcome],
        head_start: float = 0.0,
    ) -> list[WireItem]:
        """Up to ``want`` calls for ``worker`` (into ``held``), as sent (``protocol.Item``'s fields),
        their arguments pickled now; a call whose arguments do not pickle goes to ``failed``.
        ``head_start``: how late in the worker's task they start."""
        batch: list[WireItem] = []
        taken: list[WorkItem] = []
        size = 0
        pending = self._pending
        while pending and len(batch) < want and size < MAX_BYTES_PER_REPLY:
            item = pending.popleft()
            if item.state != QUEUED:  # cancelled while queued
                self._stale -= 1
                continue
            if item.attempt == 0 and not item.future.set_running_or_notify_cancel():
                item.state = ENDED  # cancelled just now: its own cancel() finds it taken
                self.functions.release(item.fn_key)
                self.books.unresolved -= 1
                self.stats.ended(item.batch, "cancelled", was_running=False)
                continue
            item.future._item = None  # type: ignore[attr-defined]  # no cycle once it left the queue
            try:
                payload = dumps_arguments(item)
            except Exception as exc:  # noqa: BLE001 - the call's own error, as ProcessPoolExecutor's
                item.state = ENDED
                self.functions.release(item.fn_key)
                self.stats.started(item.batch, host)
                failed.append((item, exc))
                continue
            item.attempt += 1
            item.worker = worker
            item.state = HELD
            item.head_start = head_start
            held[item.id] = item
            batch.append((item.id, item.attempt, item.fn_key, payload))  # a plain tuple: it is pickled
            taken.append(item)
            size += len(payload)
        for batch_id, count in collections.Counter(item.batch for item in taken).items():
            self.stats.started(batch_id, host, count)
        return batch

    def requeue_locked(self, items: Sequence[WorkItem]) -> None:
        """Put calls back at the front of the queue, in this order (a lost or undelivered call)."""
        for item in reversed(items):
            item.worker = None
            item.state = QUEUED
            self._pending.appendleft(item)
            self.stats.requeued(item.batch)

    # -- taking calls out -----------------------------------------------------------------------
    def take_all_locked(self) -> list[WorkItem]:
        """Every call still waiting, out of the queue (its state left to the caller)."""
        items = [item for item in self._pending if item.state == QUEUED]
        self._pending.clear()
        self._stale = 0
        return items

    def cancel_unstarted(self) -> list[WorkItem]:
        """Take out every call no worker has taken yet, ended (a lost call queued for its retry is
        running, as far as its Future is concerned: it stays); the caller cancels their Futures and
        takes them off ``books.unresolved``."""
        with self._lock:
            items = [item for item in self._pending if item.state == QUEUED and item.attempt == 0]
            for item in items:
                item.state = ENDED
                item.future._item = None  # type: ignore[attr-defined]
                self.functions.release(item.fn_key)
            kept = [item for item in self._pending if item.state == QUEUED and item.attempt > 0]
            self._pending = deque(kept)
            self._stale = 0
        return items


class CallBook:
    """Every unresolved call of an executor: a queue per resource set (``Resources()``: the
    executor's own), the books they share, and the ending of calls (failed, cancelled). Shares its
    owner's lock; Futures are resolved outside it."""

    def __init__(
        self, lock: threading.Lock, stats: Stats, on_change: Callable[[], None], needs: Resources
    ) -> None:
        self._lock = lock
        self.stats = stats
        self.books = Books()
        self._on_change = on_change
        self.queues: dict[Resources, CallQueue] = {}
        #: The executor's own resource set.
        self.default = self.queue(needs)

    def queue(self, needs: Resources) -> CallQueue:
        """The queue of the calls that need ``needs`` (made on first use)."""
        queue = self.queues.get(needs)
        if queue is None:
            queue = self.queues[needs] = CallQueue(self._lock, self.books, self.stats, self._on_change)
            queue.needs = needs
        return queue

    def by_label(self, label: str) -> CallQueue:
        """The queue of the resource set a task's ``SHEEPDOG_RESOURCE_SET`` names (the executor's
        own for a name it does not know)."""
        for needs, queue in list(self.queues.items()):
            if needs.label() == label:
                return queue
        return self.default

    def waiting(self) -> int:
        """Calls waiting for a worker, in every queue (with the lock held)."""
        return sum(queue.waiting() for queue in self.queues.values())

    def take_waiting(self, needs: Resources | None = None) -> list[WorkItem]:
        """Take every call still waiting for a worker (of the set ``needs`` only, if given) out of
        its queue; only ``end`` or a requeue ends it now."""
        with self._lock:
            if needs is None:
                items = self.take_all_locked()
            else:
                items = self.queue(needs).take_all_locked()
            for item in items:
                item.state = HELD
                item.future._item = None  # type: ignore[attr-defined]
        return items

    def take_all_locked(self) -> list[WorkItem]:
        return [item for queue in self.queues.values() for item in queue.take_all_locked()]

    def requeue_locked(self, items: Sequence[WorkItem]) -> None:
        """Put calls back at the front of their queues, in this order (a lost or undelivered call)."""
        groups: dict[int, tuple[CallQueue, list[WorkItem]]] = {}
        for item in items:
            queue = item.queue or self.default
            groups.setdefault(id(queue), (queue, []))[1].append(item)
        for queue, queued in groups.values():
            queue.requeue_locked(queued)

    def requeue_undelivered_locked(self, items: Sequence[WorkItem], worker_id: str, retiring: bool) -> None:
        """Queue again the calls a worker's reply never brought it (lost with its connection), or
        that a retiring worker hands back unrun: neither uses up a retry."""
        for item in items:
            item.undelivered += 1
            if retiring:
                log.debug("call %d handed back by retiring worker %s; queued again", item.id, worker_id)
            else:
                log.warning("call %d never reached worker %s; queued again", item.id, worker_id)
        self.requeue_locked(items)

    def end_kept(
        self, items: list[WorkItem], kept: list[tuple[WorkItem, bytes]]
    ) -> tuple[list[Outcome], list[WorkItem]]:
        """Of a lost worker's calls, end those whose pickled values a sweep kept
        (``Sweep.recover``): (their outcomes, as results of their worker, for the results thread;
        the other calls)."""
        with self._lock:
            for item, _ in kept:
                item.state = ENDED
        done = {item.id for item, _ in kept}
        outcomes: list[Outcome] = [(i, Result(i.id, i.attempt, True, data, "")) for i, data in kept]
        return outcomes, [item for item in items if item.id not in done]

    def retry_locked(self, items: Sequence[WorkItem], retries: int) -> tuple[list[WorkItem], list[WorkItem]]:
        """Queue again the lost calls run at most ``retries`` times (-1: none, the executor is
        closing); return (queued again, out of retries)."""
        retried: list[WorkItem] = []
        failed: list[WorkItem] = []
        for item in items:
            (retried if item.attempt - item.undelivered <= retries else failed).append(item)
        for item in retried:
            log.warning("call %d lost (%s); running it again", item.id, ", ".join(item.losses))
        self.requeue_locked(retried)
        return retried, failed

    def move(self, items: Sequence[WorkItem], needs: Resources) -> None:
        """Queue these calls (lost, held by nobody) again, at the front of the queue of ``needs``."""
        with self._lock:
            queue = self.queue(needs)
            for item in items:
                item.queue = queue
            queue.requeue_locked(items)

    def end(self, items: Sequence[WorkItem], error: BaseException, outcome: str = "failed") -> None:
        """Resolve these calls (taken out of the queues and off the workers) with ``error``, each in
        its own try; they count as ``outcome`` ("failed", or "cancelled": stopped on purpose)."""
        with self._lock:
            items = [item for item in items if item.state != ENDED]
            for item in items:
                item.state = ENDED
                self.books.functions.release(item.fn_key)
        end_with(items, error, outcome, self.stats)
        with self._lock:
            self.books.unresolved -= len(items)
        self._on_change()

    def cancel_unstarted(self, reason: str) -> None:
        """Cancel every call no worker has taken yet (a lost call queued for its retry is running,
        as far as its Future is concerned: it stays); ``reason`` is their CancelledError's message."""
        items = [item for queue in list(self.queues.values()) for item in queue.cancel_unstarted()]
        cancel(items, reason, self.stats)
        with self._lock:
            self.books.unresolved -= len(items)
        self._on_change()

    def resolved(self, count: int, released: collections.Counter[str]) -> None:
        """The results thread resolved ``count`` calls, of these functions: off the books."""
        with self._lock:
            self.books.unresolved -= count
            for key, uses in released.items():
                self.books.functions.release(key, uses)


def end_with(items: Sequence[WorkItem], error: BaseException, outcome: str, stats: Stats) -> None:
    """Resolve these calls (off the books already) with ``error``, each in its own try; they count
    as ``outcome`` ("failed", or "cancelled": stopped on purpose, no error to list)."""
    text = f"{type(error).__name__}: {error}"
    for item in items:
        try:
            if item.future.running() or item.future.set_running_or_notify_cancel():
                failed = text if outcome == "failed" else None
                stats.ended(item.batch, outcome, error=failed, was_running=item.attempt > 0)
                set_exception(item.future, error)
            else:
                stats.ended(item.batch, "cancelled", was_running=False)
        except Exception:  # noqa: BLE001 - the others must still end
            log.exception("failing call %d", item.id)


def cancel(items: Sequence[WorkItem], reason: str, stats: Stats) -> None:
    """Cancel the Futures of these calls (never started, off the queue); ``reason`` is their
    CancelledError's message."""
    for item in items:
        if type(item.future) is CallFuture:
            item.future.cancel_because(reason)
        else:
            item.future.cancel()
    stats.ended_many([(item.batch, "cancelled", 0.0, None, False) for item in items])


_SCALARS = (int, float, str, bytes, bool, type(None))


def dumps_arguments(item: WorkItem) -> bytes:
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
