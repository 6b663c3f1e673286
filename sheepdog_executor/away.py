"""When this client was away from the cluster (offline, suspended): what the job manager counts so
that workers are not judged on a silence that was this side's."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sheepdog_executor.clock import awake_or_asleep

log = logging.getLogger("sheepdog_executor")

#: A gap this much longer than expected in the job manager's own loop means this process was
#: suspended (SIGSTOP, a laptop's sleep) or starved: workers are not judged on the silence it caused.
PAUSE_SECONDS = 15.0


class AwayClock:
    """When this client was last away from the cluster (offline or suspended), and for how long.

    Kept by the job manager's thread: it counts the time its SSH commands failed, and gaps in its
    own loop that only a suspended process (SIGSTOP, a sleeping laptop) shows.
    """

    def __init__(self, clock: Callable[[], float] = awake_or_asleep) -> None:
        self._clock = clock
        #: When the client was last back; workers' silence before that is not theirs.
        self.back_at = 0.0
        #: How long the last absence lasted (seconds).
        self.last_absence = 0.0
        self._since: float | None = None

    def unreachable(self, why: str, since: float) -> float:
        """An SSH command that started at ``since`` failed; return for how long the cluster has
        been unreachable."""
        now = self._clock()
        if self._since is None:
            self._since = since
            log.warning("the cluster is unreachable (%s); waiting for it to come back", why)
        return now - self._since

    def reached(self) -> None:
        if self._since is not None:
            self.came_back(self._clock() - self._since)
            self._since = None

    def check_gap(self, excess: float) -> bool:
        """``excess``: how much longer than expected something took. True when it was a pause."""
        if excess < PAUSE_SECONDS:
            return False
        self.came_back(excess)
        return True

    def mark_back(self) -> None:
        """A way back was re-made (SSH, tunnel): the workers need time to find it."""
        self.back_at = self._clock()

    def came_back(self, absence: float) -> None:
        self.back_at = self._clock()
        self.last_absence = absence
        log.warning("this client was away from the cluster for %.0f s; back now", absence)
