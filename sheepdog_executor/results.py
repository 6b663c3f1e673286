"""The results thread: it alone unpickles the workers' results and resolves the Futures (as CPython's
executor manager thread does), so that a user's done-callback never stalls the endpoint and its
heartbeats. Each Future is resolved in its own ``try``: nothing can strand one.
"""

from __future__ import annotations

import collections
import logging
import pickle
import queue
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from sheepdog_executor.callfuture import CallFuture
from sheepdog_executor.errors import BrokenClusterExecutor, RemoteCallError
from sheepdog_executor.escalation import tried
from sheepdog_executor.remote.compat import add_note
from sheepdog_executor.remote.protocol import Error, Result
from sheepdog_executor.stats import Stats, Tally
from sheepdog_executor.tracebacks import fit_advice, rebuild_error

if TYPE_CHECKING:
    from sheepdog_executor.dispatch import WorkItem

log = logging.getLogger("sheepdog_executor")

#: A call that ended: its worker's result, or the error it failed with here.
Outcome = tuple["WorkItem", Result | BaseException]


class Results:
    """Resolves handed-over outcomes on a thread of its own, then reports them off the books."""

    def __init__(
        self,
        stats: Stats,
        resolved: Callable[[int, collections.Counter[str]], None],
        break_: Callable[[BaseException], None],
        changed: Callable[[], None],
        echo_output: bool = False,
    ) -> None:
        self.stats = stats
        #: Called first with how many calls are resolved now, and which functions they used.
        self._resolved = resolved
        self._break = break_
        self._echo_output = echo_output
        #: Whether the nodes run this client's packages (``environment="sync"``): for the advice.
        self.environment_synced = False
        #: Called after each hand-over was resolved.
        self._changed = changed
        #: Runs calls that raised MemoryError (under an address-space limit, e.g. Grid Engine's
        #: h_vmem) again with more memory (escalation.py); returns those it cannot. None: off.
        self.escalate_memory: Callable[[list[WorkItem]], list[WorkItem]] | None = None
        self._outcomes: queue.SimpleQueue[list[Outcome] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="sheepdog-results", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, outcomes: list[Outcome]) -> None:
        """Hand these over (one hand-over per exchange)."""
        self._outcomes.put(outcomes)

    def close(self) -> None:
        """Resolve what is still handed over, then end the thread (joined, unless this is that
        thread: a done-callback that shuts the executor down)."""
        if self._thread.is_alive():
            self._outcomes.put(None)
            if threading.current_thread() is not self._thread:
                self._thread.join()

    def _loop(self) -> None:
        while True:
            outcomes = self._outcomes.get()
            if outcomes is None:
                return
            self.resolve(outcomes)
            del outcomes  # nothing here keeps a result alive while waiting for the next

    def resolve(self, outcomes: list[Outcome]) -> None:
        """Resolve each Future in its own ``try``: one that fails cannot strand the others; the
        failure breaks the executor (which fails every call still on the books) and fails it too."""
        notes: dict[int, str] = {}
        if self.escalate_memory is not None:
            outcomes = self._escalated(outcomes, self.escalate_memory, notes)
        # off the books first: a done-callback may wait until nothing is outstanding
        released = collections.Counter(
            item.fn_key for item, o in outcomes if not isinstance(o, BaseException)
        )
        self._resolved(len(outcomes), released)
        tally: dict[int, Tally] = {}
        for item, outcome in outcomes:
            seconds = 0.0
            try:
                if isinstance(outcome, BaseException):  # e.g. its arguments did not pickle
                    set_exception(item.future, outcome)
                    error: str | None = f"{type(outcome).__name__}: {outcome}"
                else:
                    seconds = outcome.seconds
                    error = _resolve(
                        item.future,
                        outcome,
                        self._echo_output,
                        self.environment_synced,
                        notes.get(item.id, ""),
                    )
            except BaseException as exc:  # noqa: BLE001 - a bug must break the executor, not hang it
                log.exception("resolving a call failed")
                broken = BrokenClusterExecutor(f"internal error while resolving a result: {exc!r}")
                set_exception(item.future, broken)
                error = str(broken)
                self._break(broken)
            counts = tally.get(item.batch)
            if counts is None:
                counts = tally[item.batch] = Tally()
            counts.add(seconds, error)
        self.stats.ended_tallies(tally)
        self._changed()

    @staticmethod
    def _escalated(
        outcomes: list[Outcome], escalate: Callable[[list[WorkItem]], list[WorkItem]], notes: dict[int, str]
    ) -> list[Outcome]:
        """The outcomes left once the calls that raised MemoryError went to a set with more memory;
        ``notes`` gets what was tried for those that could not (by call id)."""
        short = [item for item, outcome in outcomes if _memory_error(outcome)]
        if not short:
            return outcomes
        left = escalate(short)
        for item in left:
            said = (
                [tried((*item.history, item.queue.needs), "mem", "out of")]
                if item.history and item.queue
                else []
            )
            if said or item.bound:
                notes[item.id] = "sheepdog: " + "; ".join(said + ([item.bound] if item.bound else []))
        moved = {id(item) for item in short} - {id(item) for item in left}
        return [(item, outcome) for item, outcome in outcomes if id(item) not in moved]


def _memory_error(outcome: Result | BaseException) -> bool:
    """Whether a worker's result is a MemoryError the call raised (its error's type, read from
    the outer pickle: a tuple of bytes and strings)."""
    if isinstance(outcome, BaseException) or outcome.ok:
        return False
    try:
        return Error(*pickle.loads(outcome.data)).type_name == "MemoryError"
    except Exception:  # noqa: BLE001 - not ours to judge: resolved as it is
        return False


def set_exception(future: Future[Any], error: BaseException) -> None:
    if not future.done():
        try:
            future.set_exception(error)
        except Exception:  # resolved meanwhile by another thread
            pass


def _resolve(
    future: Future[Any], result: Result, echo: bool, synced: bool = False, note: str = ""
) -> str | None:
    """Resolve a Future from a worker's result; return the error's text when the call failed."""
    stdout, stderr = result.stdout, result.stderr
    if stdout or stderr or type(future) is not CallFuture:  # a CallFuture's are "" by default
        future.remote_stdout = stdout  # type: ignore[attr-defined]
        future.remote_stderr = stderr  # type: ignore[attr-defined]
        future.remote_output = stdout + stderr  # type: ignore[attr-defined]
    if echo:
        for text, stream in ((stdout, sys.stdout), (stderr, sys.stderr)):
            if text:
                print(text, end="" if text.endswith("\n") else "\n", file=stream)
    try:
        loaded = pickle.loads(result.data)
    except Exception as load_error:  # noqa: BLE001 - e.g. a module missing on the client
        message = f"the result could not be unpickled here: {load_error!r}"
        set_exception(future, RemoteCallError(message))
        return message
    if result.ok:
        if not future.done():
            future.set_result(loaded)
        return None
    error = rebuild_error(Error(*loaded))
    fit_advice(error, synced)
    if note:
        add_note(error, note)
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        if text:
            add_note(error, f"{name} of the call on the node:\n{text.rstrip()}")
    set_exception(future, error)
    return str(error.__cause__)
