"""The commands an executor sends to the head node's scheduler, counted and kept under a ceiling
per minute: sites ask users to keep ``qstat``/``squeue`` and their kin rare."""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

#: Scheduler commands per minute without ``commands_per_minute=`` (a poll every 2 s is 30).
DEFAULT_COMMANDS_PER_MINUTE = 60.0
_WINDOW = 60.0


class CommandMeter:
    """At most ``per_minute`` commands in any 60 s: a command over it waits for the oldest of the
    last minute to leave the window. Removals (``urgent``) never wait, but count."""

    def __init__(
        self,
        per_minute: float = DEFAULT_COMMANDS_PER_MINUTE,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.per_minute = per_minute
        self._clock, self._sleep = clock, sleep
        self._recent: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()
        self.total = 0
        #: Seconds commands waited for the ceiling, in all.
        self.waited = 0.0
        self._here = threading.local()

    def take(self, urgent: bool = False) -> None:
        """Count a command about to be sent; first wait while the last minute is full (unless
        ``urgent``, or within ``urgent()`` on this thread)."""
        urgent = urgent or getattr(self._here, "urgent", False)
        while True:
            with self._lock:
                now = self._clock()
                self._forget(now)
                if urgent or len(self._recent) < self.per_minute:
                    self._recent.append(now)
                    self.total += 1
                    return
                wait = max(self._recent[0] + _WINDOW - now, 0.01)
                self.waited += wait
            self._here.waited = self.waited_here() + wait
            self._sleep(wait)

    def waited_here(self) -> float:
        """Seconds this thread's commands waited for the ceiling, in all (the job manager does
        not mistake them for a pause of this process)."""
        return float(getattr(self._here, "waited", 0.0))

    @contextlib.contextmanager
    def urgent(self) -> Iterator[None]:
        """This thread's commands meanwhile never wait (removing jobs, watching them leave)."""
        self._here.urgent = True
        try:
            yield
        finally:
            self._here.urgent = False

    def _forget(self, now: float) -> None:
        while self._recent and self._recent[0] <= now - _WINDOW:
            self._recent.popleft()

    def snapshot(self) -> dict[str, Any]:
        """For ``status()``: commands in all, in the last minute, the ceiling, seconds waited."""
        with self._lock:
            self._forget(self._clock())
            return {
                "total": self.total,
                "last_minute": len(self._recent),
                "per_minute_ceiling": self.per_minute,
                "waited_seconds": round(self.waited, 1),
            }
