"""What happened to each batch of calls, for the status page and progress bars.

A batch is one ``map`` call, or the ``submit`` calls that arrive close together. The dispatcher
reports each step of each call here; ``snapshot`` gives a JSON-able picture of it all.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

#: How many recent errors the snapshot keeps (over all batches).
RECENT_ERRORS = 20


@dataclass
class BatchStats:
    """Counters of one batch; ``queued`` and ``running`` are current, the others cumulative."""

    id: int
    label: str
    created: float = field(default_factory=time.time)
    total: int = 0
    queued: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    retried: int = 0
    seconds_total: float = 0.0
    seconds_max: float = 0.0
    hosts: Counter[str] = field(default_factory=Counter)
    finished: float | None = None

    def as_dict(self) -> dict[str, Any]:
        runs = self.done + self.failed
        return {
            "id": self.id,
            "label": self.label,
            "created": self.created,
            "finished": self.finished,
            "total": self.total,
            "queued": self.queued,
            "running": self.running,
            "done": self.done,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "retried": self.retried,
            "mean_seconds": self.seconds_total / runs if runs else None,
            "max_seconds": self.seconds_max,
            "hosts": dict(self.hosts),
        }


class Tally:
    """Calls of one batch that ran and ended, added up before they reach ``Stats`` at once."""

    __slots__ = ("done", "failed", "seconds_total", "seconds_max", "errors")

    def __init__(self) -> None:
        self.done = self.failed = 0
        self.seconds_total = self.seconds_max = 0.0
        self.errors: list[str] = []

    def add(self, seconds: float, error: str | None) -> None:
        if error is None:
            self.done += 1
        else:
            self.failed += 1
            self.errors.append(error)
        self.seconds_total += seconds
        if seconds > self.seconds_max:
            self.seconds_max = seconds


class Stats:
    """Thread-safe counters per batch and the last errors."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: dict[int, BatchStats] = {}
        self._errors: deque[dict[str, Any]] = deque(maxlen=RECENT_ERRORS)

    def _batch(self, batch: int) -> BatchStats:
        stats = self._batches.get(batch)
        if stats is None:
            stats = self._batches[batch] = BatchStats(batch, f"batch {batch}")
        return stats

    def queued(self, batch: int, label: str, count: int) -> None:
        with self._lock:
            stats = self._batch(batch)
            stats.label = label
            stats.total += count
            stats.queued += count
            stats.finished = None

    def started(self, batch: int, host: str, count: int = 1) -> None:
        with self._lock:
            stats = self._batch(batch)
            stats.queued -= count
            stats.running += count
            stats.hosts[host] += count

    def requeued(self, batch: int) -> None:
        with self._lock:
            stats = self._batch(batch)
            stats.running -= 1
            stats.queued += 1
            stats.retried += 1

    def ended(
        self,
        batch: int,
        outcome: str,
        seconds: float = 0.0,
        error: str | None = None,
        was_running: bool = True,
    ) -> None:
        """``outcome`` is "done", "failed" or "cancelled"."""
        self.ended_many([(batch, outcome, seconds, error, was_running)])

    def ended_many(self, ends: list[tuple[int, str, float, str | None, bool]]) -> None:
        """Several ``ended`` at once: (batch, outcome, seconds, error, was_running) each."""
        with self._lock:
            for batch, outcome, seconds, error, was_running in ends:
                stats = self._batch(batch)
                if was_running:
                    stats.running -= 1
                else:
                    stats.queued -= 1
                setattr(stats, outcome, getattr(stats, outcome) + 1)
                stats.seconds_total += seconds
                if seconds > stats.seconds_max:
                    stats.seconds_max = seconds
                if error:
                    self._errors.append({"batch": batch, "time": time.time(), "error": error[-2000:]})
                if stats.queued == 0 and stats.running == 0:
                    stats.finished = time.time()

    def ended_tallies(self, tallies: dict[int, Tally]) -> None:
        """Calls that ran and ended, added up per batch (the results thread's one update per reply)."""
        with self._lock:
            for batch, tally in tallies.items():
                stats = self._batch(batch)
                stats.running -= tally.done + tally.failed
                stats.done += tally.done
                stats.failed += tally.failed
                stats.seconds_total += tally.seconds_total
                stats.seconds_max = max(stats.seconds_max, tally.seconds_max)
                now = time.time()
                for error in tally.errors[-RECENT_ERRORS:]:
                    self._errors.append({"batch": batch, "time": now, "error": error[-2000:]})
                if stats.queued == 0 and stats.running == 0:
                    stats.finished = now

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "batches": [b.as_dict() for b in self._batches.values()],
                "errors": list(self._errors),
            }
