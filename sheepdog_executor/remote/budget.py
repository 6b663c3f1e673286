"""A task's budget: whether the next call can finish before the task's time ends and within its
memory, and what a ``MemoryError`` under the task's memory limit means. Stdlib only (runs on the
nodes).

A task runs many calls, but the scheduler's time limit (Slurm's ``--time``, Grid Engine's ``h_rt``)
bounds the task, not each call. The job script exports when the task's time ends as
``SHEEPDOG_DEADLINE``, seconds since the epoch (``Scheduler.task_environment``: the time asked for,
counted from the task's start; on Slurm ``SLURM_JOB_END_TIME`` where it exists, or ``squeue``'s end
time when no ``time=`` was given). The worker keeps the longest run of each function it ran and,
before each call, checks that this much (times ``SAFETY``, plus ``RESERVE_SECONDS`` to report it)
is left; when it is not, it hands back the calls it has not started and retires, and the executor
starts a fresh task for them. A function the worker has not run yet is run: there is nothing to
judge it by, and a fresh task always makes progress.

Memory likewise, where a task's use accumulates across calls (caches, leaks, memory the allocator
keeps): with ``SHEEPDOG_MEMORY_LIMIT`` ("BYTES rss" or "BYTES vmem": what the scheduler counts
against the task, e.g. Slurm's ``mem=`` against its resident memory, Grid Engine's ``h_vmem``
against its address space), the worker keeps each function's largest rise in memory during a call
and takes no call that would bring it above ``MEMORY_FRACTION`` of the limit; it retires instead.
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
#: A call is expected to raise the worker's memory by up to its function's largest rise so far times
#: ``SAFETY``; the worker retires rather than go above this share of the task's memory limit.
MEMORY_FRACTION = 0.9
_KINDS = ("rss", "vmem")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class Budget:
    """The task's time and memory left, and what each function took of them in this worker."""

    def __init__(
        self,
        deadline: float | None,
        clock: Callable[[], float] = time.time,
        memory_limit: int | None = None,
        memory_kind: str = "rss",
    ) -> None:
        now = clock()
        #: When the task's time ends, on ``time.monotonic``'s clock (None: not known). A deadline
        #: already past is a wrong clock or expression, not a reason to stop: ignored.
        self._ends = time.monotonic() + deadline - now if deadline is not None and deadline > now else None
        self._longest: dict[str, float] = {}
        #: The task's memory limit in bytes (None: not known), and what it is counted against.
        self.memory_limit = memory_limit if memory_kind in _KINDS else None
        self._kind = memory_kind
        self._statm: int | None = None
        self._rise: dict[str, int] = {}
        self._before = (0, 0)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Budget:
        try:
            deadline: float | None = float(environ.get("SHEEPDOG_DEADLINE", ""))
        except ValueError:
            deadline = None
        size, _, kind = environ.get("SHEEPDOG_MEMORY_LIMIT", "").partition(" ")
        limit = int(size) if size.isdigit() and int(size) > 0 else None
        return cls(deadline, memory_limit=limit, memory_kind=kind or "rss")

    @property
    def bounded(self) -> bool:
        """Whether the task has a time or memory limit this worker knows of (else nothing to check)."""
        return self._ends is not None or self.memory_limit is not None

    def left(self) -> float | None:
        """Seconds until the task's time ends (None: not known)."""
        return None if self._ends is None else self._ends - time.monotonic()

    def ran(self, fn_key: str, seconds: float) -> None:
        """A call of ``fn_key`` ran for ``seconds`` (since ``fits`` said it did)."""
        if seconds > self._longest.get(fn_key, 0.0):
            self._longest[fn_key] = seconds
        if self.memory_limit is not None:
            now, peak = self.memory()
            before, peak_before = self._before
            # the peak during the call when it set a new one, else what it left behind
            rise = (peak if peak > peak_before else now) - before
            if rise > self._rise.get(fn_key, 0):
                self._rise[fn_key] = rise

    def fits(self, fn_key: str) -> bool:
        """Whether a call of ``fn_key`` is expected to end (and report) before the task's time does,
        and within its memory."""
        left, longest = self.left(), self._longest.get(fn_key)
        if left is not None and longest is not None and left < longest * SAFETY + RESERVE_SECONDS:
            return False
        if self.memory_limit is None:
            return True
        self._before = self.memory()
        rise = self._rise.get(fn_key)
        return rise is None or self._before[0] + rise * SAFETY <= MEMORY_FRACTION * self.memory_limit

    def memory(self) -> tuple[int, int]:
        """This process's memory as the task's limit counts it, now and at its peak (bytes; 0 when
        ``/proc`` cannot say). A few microseconds: ``/proc/self/statm`` read again on one open
        descriptor, and ``getrusage`` for the peak of resident memory (of the address space, the
        current size stands for the peak)."""
        try:
            if self._statm is None:
                self._statm = os.open("/proc/self/statm", os.O_RDONLY)
            size, resident = os.pread(self._statm, 128, 0).split()[:2]
        except (OSError, ValueError):
            return 0, 0
        if self._kind == "vmem":
            return int(size) * _PAGE, int(size) * _PAGE
        import resource

        return int(resident) * _PAGE, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
