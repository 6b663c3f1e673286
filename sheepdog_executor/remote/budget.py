"""A task's budget: whether the next call can finish before the task's time ends, and what a
``MemoryError`` under the task's memory limit means. Stdlib only (runs on the nodes).

A task runs many calls, but the scheduler's time limit (Slurm's ``--time``, Grid Engine's ``h_rt``)
bounds the task, not each call. The job script exports when the task's time ends as
``SHEEPDOG_DEADLINE``, seconds since the epoch (``Scheduler.task_environment``: the time asked for,
counted from the task's start; on Slurm ``SLURM_JOB_END_TIME`` where it exists, or ``squeue``'s end
time when no ``time=`` was given). The worker keeps the longest run of each function it ran and,
before each call, checks that this much (times ``SAFETY``, plus ``RESERVE_SECONDS`` to report it)
is left; when it is not, it hands back the calls it has not started and retires, and the executor
starts a fresh task for them. A function the worker has not run yet is run: there is nothing to
judge it by, and a fresh task always makes progress.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

from sheepdog_executor.remote.compat import add_note

#: A call is expected to take up to its function's longest run so far times this...
SAFETY = 1.25
#: ... plus this, to send its result before the scheduler ends the task.
RESERVE_SECONDS = 3.0


class Budget:
    """The task's time left, and the longest run of each function seen by this worker."""

    def __init__(self, deadline: float | None, clock: Callable[[], float] = time.time) -> None:
        now = clock()
        #: When the task's time ends, on ``time.monotonic``'s clock (None: not known). A deadline
        #: already past is a wrong clock or expression, not a reason to stop: ignored.
        self._ends = time.monotonic() + deadline - now if deadline is not None and deadline > now else None
        self._longest: dict[str, float] = {}

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Budget:
        try:
            deadline: float | None = float(environ.get("SHEEPDOG_DEADLINE", ""))
        except ValueError:
            deadline = None
        return cls(deadline)

    def left(self) -> float | None:
        """Seconds until the task's time ends (None: not known)."""
        return None if self._ends is None else self._ends - time.monotonic()

    def ran(self, fn_key: str, seconds: float) -> None:
        """A call of ``fn_key`` ran for ``seconds``."""
        if seconds > self._longest.get(fn_key, 0.0):
            self._longest[fn_key] = seconds

    def fits(self, fn_key: str) -> bool:
        """Whether a call of ``fn_key`` is expected to end (and report) before the task's time does."""
        left, longest = self.left(), self._longest.get(fn_key)
        return left is None or longest is None or left >= longest * SAFETY + RESERVE_SECONDS


def explain_memory_error(error: BaseException, environ: Mapping[str, str] = os.environ) -> None:
    """Note on a ``MemoryError`` raised under an address-space limit (``ulimit -v``; Grid Engine's
    ``h_vmem`` sets one): an allocation failed because the task's memory limit was reached, not the
    node's memory; the note says so and what to change (``SHEEPDOG_MEMORY_ADVICE``, in the
    scheduler's words)."""
    limit = address_space_limit()
    if not isinstance(error, MemoryError) or limit is None:
        return
    advice = environ.get("SHEEPDOG_MEMORY_ADVICE") or "ask the scheduler for more memory"
    add_note(
        error,
        f"sheepdog: the call went over its task's memory limit: an allocation failed under the task's "
        f"address-space limit of {limit / 2**20:.0f} MiB (ulimit -v); {advice}",
    )


def address_space_limit() -> int | None:
    """The process's address-space limit in bytes (``RLIMIT_AS``), or None when there is none."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return None if soft == resource.RLIM_INFINITY else soft
