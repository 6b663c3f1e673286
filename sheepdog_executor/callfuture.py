"""The executor's Future: a ``concurrent.futures.Future`` that costs a third of the memory.

A plain Future builds a ``threading.Condition`` (a lock and five bound methods) and two lists when it
is made: about 1.6 KB, 160 MB for 100,000 pending calls. Most Futures of a big ``map`` or of many
``submit`` calls are never waited on one by one, so this one builds them only when something needs
them (a waiter, a done-callback, ``wait``/``as_completed``); until then its state changes under one
module-wide lock. Everything else is ``Future``'s own code, so the semantics stay CPython's.

It also tells the dispatcher when it is cancelled, so the call leaves the queue at once (no worker,
and no job, is ever needed just to skip it); a Future cancelled by a shutdown says so in its
``CancelledError``. ``result()`` raises any exception the call raised, even one whose ``__bool__`` or
``__len__`` says False (the stdlib's Future of Python 3.10-3.12 returned None for it: gh-132063).
"""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures._base import (  # the state names Future itself uses (stable since 3.2)
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from typing import Any

_LOCK = threading.Lock()  # guards state changes of every CallFuture that has no condition yet
_DONE = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)
_LAZY = {"_condition": threading.Condition, "_waiters": list, "_done_callbacks": list}


class CallFuture(Future[Any]):
    """A Future whose condition and lists are made on first use."""

    _result: Any = None
    _exception: BaseException | None = None
    #: Told (with the queued call) when a call still waiting for a worker is cancelled.
    _on_cancel: Any = None
    _item: Any = None
    #: What the call wrote on the node (set by the dispatcher when there is any).
    remote_stdout = ""
    remote_stderr = ""
    remote_output = ""
    #: Why it was cancelled, when not by its own ``cancel()`` (the message of its CancelledError).
    cancel_reason = ""

    def __init__(self) -> None:  # Future.__init__ would build the condition now
        self._state = PENDING

    def __getattr__(self, name: str) -> Any:
        factory = _LAZY.get(name)
        if factory is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        with _LOCK:
            return self.__dict__.setdefault(name, factory())

    def _lazy(self) -> bool:
        """True while no condition exists (call with ``_LOCK`` held): then nobody waits."""
        return "_condition" not in self.__dict__

    # -- reads: the state is one attribute, and FINISHED never changes again ----------------
    def done(self) -> bool:
        return self._state in _DONE

    def running(self) -> bool:
        return self._state == RUNNING

    def cancelled(self) -> bool:
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)

    def result(self, timeout: float | None = None) -> Any:
        if self._state != FINISHED:
            self._wait(timeout)
        if self._exception is not None:  # `is not None`, never truthiness (gh-132063)
            try:
                raise self._exception
            finally:
                self = None  # type: ignore[assignment]  # no cycle through the traceback (as Future)
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state != FINISHED:
            self._wait(timeout)
        return self._exception

    def _wait(self, timeout: float | None) -> None:
        """Return once FINISHED; raise CancelledError (with the reason) or TimeoutError."""
        with self._condition:
            if self._state not in _DONE:
                self._condition.wait(timeout)
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                raise CancelledError(self.cancel_reason)
            if self._state != FINISHED:
                raise FuturesTimeout()

    # -- changes ------------------------------------------------------------------------------
    def cancel(self) -> bool:
        with _LOCK:
            lazy = self._lazy()
            if lazy:
                state = self._state
                if state == PENDING:
                    self._state = CANCELLED
        if not lazy:
            with self._condition:
                state = self._state
                if state == PENDING:
                    self._state = CANCELLED
                    self._condition.notify_all()
            if state == PENDING:
                self._invoke_callbacks()
        if state == PENDING and self._item is not None:
            self._on_cancel(self._item)
        return state in (PENDING, CANCELLED, CANCELLED_AND_NOTIFIED)

    def cancel_because(self, reason: str) -> bool:
        """``cancel()``, with the message its CancelledError carries (a shutdown says which)."""
        if self._state == PENDING:
            self.cancel_reason = reason
        return self.cancel()

    def set_running_or_notify_cancel(self) -> bool:
        with _LOCK:
            if self._lazy() and self._state in (PENDING, CANCELLED):
                running = self._state == PENDING
                self._state = RUNNING if running else CANCELLED_AND_NOTIFIED
                return running
        return super().set_running_or_notify_cancel()

    def set_result(self, result: Any) -> None:
        with _LOCK:
            lazy = self._lazy()
            if lazy and self._state not in _DONE:
                self._result = result
                self._state = FINISHED
                return
        if lazy:
            raise InvalidStateError(f"{self._state}: {object.__repr__(self)}")
        super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        with _LOCK:
            lazy = self._lazy()
            if lazy and self._state not in _DONE:
                self._exception = exception
                self._state = FINISHED
                return
        if lazy:
            raise InvalidStateError(f"{self._state}: {object.__repr__(self)}")
        super().set_exception(exception)


__all__ = ["CallFuture", "CancelledError"]
