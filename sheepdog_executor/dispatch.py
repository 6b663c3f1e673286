"""The calls in flight: the queue of pending calls, which worker holds which, results to Futures.

Shared by three threads: the user's (``add``), the endpoint's (``hello``/``exchange``/``heartbeat``)
and the job manager's (``take_lost``, ``fail_items``). One lock guards the state; Futures are
resolved outside it. A result counts only when it comes from the worker and attempt that hold the
call, so a late or replayed result never resolves a Future twice.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import math
import pickle
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from sheepdog_executor.errors import (
    BrokenClusterExecutor,
    PythonVersionMismatch,
    RemoteCallError,
    RemoteTraceback,
)
from sheepdog_executor.remote.compat import add_note
from sheepdog_executor.stats import Stats
from sheepdog_executor.tracebacks import restore_source

log = logging.getLogger("sheepdog_executor")

#: Upper bound on the calls and bytes handed to a worker in one reply.
MAX_ITEMS_PER_REPLY = 2000
MAX_BYTES_PER_REPLY = 16 * 1024 * 1024
#: About this much work (by the calls' average duration) goes out in one reply.
REPLY_SECONDS = 0.25


class CallFuture(Future[Any]):
    """A Future that tells the dispatcher when it is cancelled, so the call leaves the queue at once
    (no worker, and no job, is ever needed just to skip it)."""

    _on_cancel: Callable[[], None] | None = None

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled and self._on_cancel is not None:
            self._on_cancel()
        return cancelled


@dataclass(eq=False)
class WorkItem:
    """One call (or one chunk of a map) waiting for, or held by, a worker."""

    id: int
    future: Future[Any]
    fn_key: str
    kind: str  # "call" or "chunk"
    payload: bytes
    batch: int = 0
    attempt: int = 0
    worker: str | None = None
    losses: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: Hand-outs whose reply never reached the worker: not runs, so they use up no retry.
    undelivered: int = 0


@dataclass(eq=False)
class Worker:
    """A worker that said hello: where it runs and what it holds."""

    id: str
    job: str
    task: int
    host: str
    last_seen: float
    items: set[int] = field(default_factory=set)
    functions_sent: set[str] = field(default_factory=set)
    idle_since: float | None = None
    calls_done: int = 0
    #: The route it reached this client by ("direct", "tunnel", ...).
    route: str = ""


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
        #: Moving average of a call's run time on the workers; None until the first result.
        self.call_seconds: float | None = None
        self.idle_timeout = idle_timeout
        self.heartbeat = heartbeat
        self._initializer = initializer
        self._python = python
        self._echo_output = echo_output
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: deque[WorkItem] = deque()
        self._stale = 0  # entries of _pending whose call was cancelled (skipped when reached)
        self._items: dict[int, WorkItem] = {}  # every call not yet resolved
        self._functions: dict[str, bytes] = {}
        self._function_users: dict[str, int] = {}
        self.workers: dict[str, Worker] = {}
        self.stats = Stats()
        self.tasks_seen: set[tuple[str, int]] = set()  # (job, task) that ever said hello
        self.broken: BaseException | None = None
        self.stopping = False
        #: Called (from any thread) when there is new work or the state changed; set by the owner.
        self.on_change: Callable[[], None] = lambda: None
        self.on_work: Callable[[], None] = lambda: None

    # -- the user's side --------------------------------------------------------------------
    def add(
        self,
        fn_key: str,
        fn_blob: bytes,
        calls: Iterable[tuple[str, bytes, Future[Any]]],
        batch: int = 0,
        label: str = "",
    ) -> None:
        """Queue calls of one function: (kind, pickled arguments, future) each, as part of ``batch``."""
        with self._lock:
            if self.broken is not None:
                raise BrokenClusterExecutor(str(self.broken)) from self.broken
            self._functions.setdefault(fn_key, fn_blob)
            count = 0
            for kind, payload, future in calls:
                item = WorkItem(next(self._ids), future, fn_key, kind, payload, batch)
                self._items[item.id] = item
                self._pending.append(item)
                if isinstance(future, CallFuture):
                    future._on_cancel = functools.partial(self._forget_cancelled, item)
                self._function_users[fn_key] = self._function_users.get(fn_key, 0) + 1
                count += 1
            self.stats.queued(batch, label or f"batch {batch}", count)
        self.on_work()
        self.on_change()

    def snapshot(self) -> dict[str, Any]:
        """Batches, recent errors and live workers, JSON-able (for the status page and progress)."""
        now = time.monotonic()
        with self._lock:
            workers = [
                {
                    "id": w.id,
                    "host": w.host,
                    "job": w.job,
                    "task": w.task,
                    "calls_done": w.calls_done,
                    "holding": len(w.items),
                    "seen_seconds_ago": round(now - w.last_seen, 1),
                    "route": w.route,
                }
                for w in self.workers.values()
            ]
        return {
            **self.stats.snapshot(),
            "workers": workers,
            "broken": str(self.broken) if self.broken else None,
        }

    def counts(self) -> tuple[int, int]:
        """(calls waiting for a worker, calls held by workers)."""
        with self._lock:
            pending = len(self._pending) - self._stale
            return pending, len(self._items) - pending

    def outstanding(self) -> int:
        with self._lock:
            return len(self._items)

    # -- the endpoint's side ----------------------------------------------------------------
    def hello(self, message: dict[str, Any]) -> dict[str, Any]:
        python = tuple(message.get("python", ()))[:2]
        job, task = str(message.get("job")), int(message.get("task", 0))
        with self._lock:
            self.tasks_seen.add((job, task))
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
        worker = Worker(str(message["worker"]), job, task, str(message.get("host", "?")), time.monotonic())
        worker.route = str(message.get("route", ""))[:40]
        with self._lock:
            if self.stopping:
                return {"error": "the executor is shutting down"}
            self.workers[worker.id] = worker
        log.debug("worker %s on %s said hello (route %s)", worker.id, worker.host, worker.route)
        self.on_change()
        return {
            "initializer": self._initializer,
            "heartbeat": self.heartbeat,
            "disconnect_tolerance": self.disconnect_tolerance,
        }

    def heartbeat_from(self, worker_id: str) -> bool:
        with self._lock:
            worker = self.workers.get(worker_id)
            if worker is not None:
                worker.last_seen = time.monotonic()
            return worker is not None

    def exchange(
        self, worker_id: str, results: list[tuple[Any, ...]], fatal: bytes | None = None
    ) -> dict[str, Any] | None:
        """Take a worker's results; return its next calls, ``{"stop": True}``, or None to wait."""
        try:
            return self._exchange(worker_id, results, fatal)
        except Exception as exc:  # a bug here must fail the futures loudly, never strand them
            log.exception("dispatcher failed")
            self.break_(BrokenClusterExecutor(f"internal error in the dispatcher: {exc!r}"))
            return {"stop": True}

    def _exchange(
        self, worker_id: str, results: list[tuple[Any, ...]], fatal: bytes | None
    ) -> dict[str, Any] | None:
        delivered = []
        with self._lock:
            worker = self.workers.get(worker_id)
            if worker is None:
                return {"stop": True}
            worker.last_seen = time.monotonic()
            for result in results:
                item_id, attempt = result[0], result[1]
                item = self._items.get(item_id)
                if item is None or item.worker != worker_id or item.attempt != attempt:
                    continue  # late, duplicate or replayed
                del self._items[item_id]
                worker.items.discard(item_id)
                worker.calls_done += 1
                self._release_function(item.fn_key)
                delivered.append((item, result))
            # A worker asks for work only once it has run everything it was given: calls it still
            # holds never reached it (the reply was lost with its connection). Queue them again.
            for item_id in sorted(worker.items, reverse=True):
                item = self._items[item_id]
                item.worker = None
                item.undelivered += 1
                self._pending.appendleft(item)
                self.stats.requeued(item.batch)
                log.warning("call %d never reached worker %s; queued again", item.id, worker_id)
            if worker.items:
                worker.items.clear()
                self.on_work()
        for item, result in delivered:
            self._observe(result[5])
            item.seconds = result[5]
        ends = []
        for item, result in delivered:
            ok, data, stdout = result[2], result[3], result[4]
            stderr = result[6] if len(result) > 6 and type(result[6]) is str else ""
            error_text = _resolve(item.future, ok, data, stdout, stderr, self._echo_output)
            ends.append((item.batch, "failed" if error_text else "done", item.seconds, error_text, True))
        self.stats.ended_many(ends)
        if fatal is not None:
            self._initializer_failed(fatal)
            return {"stop": True}
        if delivered:
            self.on_change()
        with self._lock:
            if self.stopping or self.broken is not None:
                return self._stop(worker)
            batch = self._take(worker)
            if batch:
                worker.idle_since = None
                functions = {
                    k: self._functions[k] for k in {i.fn_key for i in batch} if k not in worker.functions_sent
                }
                worker.functions_sent.update(functions)
                return {
                    "items": [(i.id, i.attempt, i.fn_key, i.kind, i.payload) for i in batch],
                    "functions": functions,
                }
            now = time.monotonic()
            if worker.idle_since is None:
                worker.idle_since = now
            if now - worker.idle_since >= self.idle_timeout:
                return self._stop(worker)
            return None

    def _stop(self, worker: Worker) -> dict[str, Any] | None:
        if worker.items:
            return None  # it still owes results; let it deliver them first
        self.workers.pop(worker.id, None)
        self.on_change()
        return {"stop": True}

    def _forget_cancelled(self, item: WorkItem) -> None:
        with self._lock:
            if self._items.get(item.id) is not item or item.worker is not None:
                return
            del self._items[item.id]
            self._release_function(item.fn_key)
            self._stale += 1
        self.stats.ended(item.batch, "cancelled", was_running=False)
        self.on_change()

    def _observe(self, seconds: float) -> None:
        average = self.call_seconds
        self.call_seconds = seconds if average is None else 0.8 * average + 0.2 * seconds

    def _take(self, worker: Worker) -> list[WorkItem]:
        """Guided self-scheduling: a share of the pending calls for each of the workers expected,
        shrinking as the queue drains, and never more than about REPLY_SECONDS of work. Until a
        call's duration is known, one call: long calls then spread over all workers."""
        expected = max(len(self.workers), min(self.max_workers, len(self._items)))
        share = math.ceil((len(self._pending) - self._stale) / (2 * expected))
        seconds = self.call_seconds
        by_time = 1 if seconds is None else int(REPLY_SECONDS / max(seconds, 1e-6))
        want = max(1, min(MAX_ITEMS_PER_REPLY, share, by_time))
        batch: list[WorkItem] = []
        size = 0
        while self._pending and len(batch) < want and (not batch or size < MAX_BYTES_PER_REPLY):
            item = self._pending.popleft()
            if self._items.get(item.id) is not item:  # cancelled while queued
                self._stale -= 1
                continue
            if item.attempt == 0 and not item.future.set_running_or_notify_cancel():
                del self._items[item.id]
                self._release_function(item.fn_key)
                self.stats.ended(item.batch, "cancelled", was_running=False)
                continue
            item.attempt += 1
            item.worker = worker.id
            worker.items.add(item.id)
            batch.append(item)
            size += len(item.payload)
        for batch_id, count in collections.Counter(item.batch for item in batch).items():
            self.stats.started(batch_id, worker.host, count)
        return batch

    def _release_function(self, key: str) -> None:
        self._function_users[key] -= 1
        if not self._function_users[key]:
            del self._function_users[key]
            self._functions.pop(key, None)

    def _initializer_failed(self, fatal: bytes) -> None:
        _, tb = pickle.loads(fatal)
        self.break_(BrokenClusterExecutor(f"the initializer failed on a worker, so no call can run:\n{tb}"))

    # -- the job manager's side ------------------------------------------------------------
    def take_lost(self, worker_id: str) -> list[WorkItem]:
        """Forget a dead worker; return the calls it held (unresolved, held by nobody)."""
        with self._lock:
            worker = self.workers.pop(worker_id, None)
            if worker is None:
                return []
            items = [self._items[i] for i in sorted(worker.items) if i in self._items]
            for item in items:
                item.worker = None
                item.losses.append(f"{worker.job}.{worker.task}")
        self.on_change()
        return items

    def take_pending(self) -> list[WorkItem]:
        """Take every call still waiting for a worker out of the queue."""
        with self._lock:
            items = [item for item in self._pending if self._items.get(item.id) is item]
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
                self._pending.appendleft(item)
                self.stats.requeued(item.batch)
        if retried:
            self.on_work()
            self.on_change()
        return retried, failed

    def fail_items(self, items: list[WorkItem], error: BaseException) -> None:
        """Resolve these calls (taken out with ``take_*``) with ``error``."""
        with self._lock:
            items = [item for item in items if self._items.pop(item.id, None) is not None]
            for item in items:
                self._release_function(item.fn_key)
        text = f"{type(error).__name__}: {error}"
        for item in items:
            if item.future.running() or item.future.set_running_or_notify_cancel():
                self.stats.ended(item.batch, "failed", error=text, was_running=item.attempt > 0)
                _set_exception(item.future, error)
            else:
                self.stats.ended(item.batch, "cancelled", was_running=False)
        self.on_change()

    def fail_pending(self, error: BaseException) -> None:
        """Fail every call still waiting for a worker (one clear error, never a hang)."""
        self.fail_items(self.take_pending(), error)

    def fail_all(self, error: BaseException) -> None:
        """Fail every unresolved call, held by a worker or not."""
        with self._lock:
            items = list(self._items.values())
            self._pending.clear()
            self._stale = 0
            for worker in self.workers.values():
                worker.items.clear()
        self.fail_items(items, error)

    def cancel_pending(self) -> None:
        """Cancel every call no worker has taken yet."""
        items = self.take_pending()
        with self._lock:
            for item in items:
                del self._items[item.id]
                self._release_function(item.fn_key)
        for item in items:
            item.future.cancel()
            self.stats.ended(item.batch, "cancelled", was_running=False)
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


def _set_exception(future: Future[Any], error: BaseException) -> None:
    if not future.done():
        try:
            future.set_exception(error)
        except Exception:  # resolved meanwhile by another thread
            pass


def _resolve(future: Future[Any], ok: bool, data: bytes, stdout: str, stderr: str, echo: bool) -> str | None:
    """Resolve a Future from a worker's result; return the error's text when the call failed."""
    future.remote_stdout = stdout  # type: ignore[attr-defined]
    future.remote_stderr = stderr  # type: ignore[attr-defined]
    future.remote_output = stdout + stderr  # type: ignore[attr-defined]
    if echo:
        for text, stream in ((stdout, sys.stdout), (stderr, sys.stderr)):
            if text:
                print(text, end="" if text.endswith("\n") else "\n", file=stream)
    try:
        loaded = pickle.loads(data)
    except Exception as load_error:  # noqa: BLE001 - e.g. a module missing on the client
        message = f"the result could not be unpickled here: {load_error!r}"
        _set_exception(future, RemoteCallError(message))
        return message
    if ok:
        if not future.done():
            future.set_result(loaded)
        return None
    error, tb = loaded
    if error is None:
        error = RemoteCallError(tb.strip().splitlines()[-1] if tb.strip() else "remote error")
    error.__cause__ = RemoteTraceback(restore_source(tb))
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        if text:
            add_note(error, f"{name} of the call on the node:\n{text.rstrip()}")
    _set_exception(future, error)
    return str(error.__cause__)
