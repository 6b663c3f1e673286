"""How many calls a worker gets in one reply: guided self-scheduling."""

from __future__ import annotations

import math

#: Upper bound on the calls and bytes handed to a worker in one reply.
MAX_ITEMS_PER_REPLY = 2000
MAX_BYTES_PER_REPLY = 16 * 1024 * 1024
#: About this much work (by the calls' average duration) goes out in one reply.
REPLY_SECONDS = 0.25


class HandOut:
    """A share of the pending calls for each of the workers expected, shrinking as the queue drains,
    and never more than about ``REPLY_SECONDS`` of work. Until a call's duration is known, one call:
    long calls then spread over all workers."""

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max_workers
        #: Moving average of a call's run time on the workers; None until the first result.
        self.call_seconds: float | None = None

    def observe(self, seconds: float) -> None:
        """A call ran for ``seconds`` on its worker."""
        average = self.call_seconds
        self.call_seconds = seconds if average is None else 0.8 * average + 0.2 * seconds

    def share(self, pending: int, workers: int, unresolved: int) -> int:
        """How many of the ``pending`` calls the next reply carries (at least one)."""
        expected = max(workers, min(self.max_workers, unresolved))
        share = math.ceil(pending / (2 * expected))
        seconds = self.call_seconds
        by_time = 1 if seconds is None else int(REPLY_SECONDS / max(seconds, 1e-6))
        return max(1, min(MAX_ITEMS_PER_REPLY, share, by_time))
