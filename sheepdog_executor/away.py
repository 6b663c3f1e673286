"""When this client was away from the cluster (offline, suspended): what the job manager counts so
that workers are not judged on a silence that was this side's."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import NamedTuple

from sheepdog_executor.clock import awake_or_asleep

log = logging.getLogger("sheepdog_executor")

#: A gap this much longer than expected in the job manager's own loop means this process was
#: suspended (SIGSTOP, a laptop's sleep) or starved: workers are not judged on the silence it caused.
PAUSE_SECONDS = 15.0
#: The endpoint's loop notes the time this often (seconds): what workers say is heard in that loop.
TICK_SECONDS = 1.0
#: A note older than this (seconds) means the endpoint's loop has not run since: this process is
#: suspended, just woken, or starved, and the workers' silence says nothing of them yet.
STALE_TICK_SECONDS = 5.0


class Heard(NamedTuple):
    """The endpoint's hearing at one moment: its last tick, and its pauses so far."""

    #: When its loop last ran (None: it never ticked, e.g. no endpoint: nothing is known).
    last_tick: float | None
    #: How many pauses it noticed, and how long the last one lasted (seconds).
    pauses: int
    last_pause: float

    def listening(self, now: float) -> bool:
        """Whether a silence up to ``now`` can be the workers': the loop that hears them has run
        lately (once it runs again after a pause, the pause is counted here first)."""
        return self.last_tick is None or now - self.last_tick < STALE_TICK_SECONDS


class Hearing:
    """Whether this client could hear its workers: the endpoint's loop ticks every ``TICK_SECONDS``
    and a tick much later than due is a pause of this process (SIGSTOP, a laptop's sleep, a starved
    loop), wherever the other threads were when it hit. The job manager's own loop sees a pause
    only while it waits; one that hit during its other steps (a submit, a throttled command) would
    make every worker look silent."""

    def __init__(self, clock: Callable[[], float] = awake_or_asleep) -> None:
        self._clock = clock
        self._last_tick: float | None = None
        self._pauses = 0
        self._last_pause = 0.0

    def tick(self) -> None:
        now = self._clock()
        if self._last_tick is not None and now - self._last_tick - TICK_SECONDS >= PAUSE_SECONDS:
            self._last_pause = now - self._last_tick
            self._pauses += 1  # counted before the tick is: a fresh tick always carries its pause
        self._last_tick = now

    def snapshot(self) -> Heard:
        return Heard(self._last_tick, self._pauses, self._last_pause)


class AwayClock:
    """When this client was last away from the cluster (offline or suspended), and for how long.

    Kept by the job manager's thread: it counts the time its SSH commands failed, and gaps in its
    own loop that only a suspended process (SIGSTOP, a sleeping laptop) shows.
    """

    def __init__(self, clock: Callable[[], float] = awake_or_asleep) -> None:
        self._clock = clock
        #: When the client was last back; workers' silence before that is not theirs.
        self.back_at = -math.inf
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
        now = self._clock()
        if now - self.back_at < PAUSE_SECONDS and absence <= self.last_absence + PAUSE_SECONDS:
            self.back_at = now  # the same absence, seen a second way (the endpoint's loop, this one)
            return
        self.back_at = now
        self.last_absence = absence
        log.warning("this client was away from the cluster for %.0f s; back now", absence)
