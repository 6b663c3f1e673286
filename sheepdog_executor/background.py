"""Steps that run at the same time as others: each on a thread of its own, its outcome a Future.

The executor's set-up runs its independent SSH steps this way (paramiko multiplexes channels over one
connection), then takes their results in the order a one-after-the-other set-up would, so the first
error raised is the one the user would have met first.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


def in_background(fn: Callable[[], T], name: str) -> Future[T]:
    """Start ``fn()`` on a daemon thread named ``name``; its result or exception as a Future.

    Daemonic: a step is an SSH command or a local start-up with a timeout of its own, and whoever
    started it waits for it (``settle``) before undoing what it may have made."""
    future: Future[T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever takes the result
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def settle(futures: Iterable[Future[Any]], timeout: float | None = None) -> None:
    """Wait until these steps have ended, whatever their outcome (nothing of theirs is raised)."""
    concurrent.futures.wait(list(futures), timeout=timeout)
