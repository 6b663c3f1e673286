"""What a site lets one user have at once, as the scheduler's configuration says, and the room left.

Schedulers discover them (``Scheduler.site_limits``: Grid Engine's ``max_u_jobs``, ``maxujobs``,
``max_aj_tasks``, ``max_aj_instances``; Slurm's ``MaxArraySize`` and the ``MaxSubmitJobs``/``MaxJobs``
of the user's association and QOS); the job manager submits no further than the room they leave,
counted from the scheduler's listing of all the user's jobs (other sessions' included).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: job id -> {task id -> state}, as ``Scheduler.poll`` answers (only the task ids count here).
Listed = Mapping[str, Mapping[int, object]]


@dataclass(frozen=True)
class Cap:
    """One limit on the user's jobs in the system at once, named as the site names it."""

    #: e.g. "max_u_jobs", "MaxSubmitJobs of association sheepdog", "MaxSubmitPU of QOS normal".
    name: str
    value: int
    #: "job": an array job counts once (Grid Engine's max_u_jobs); "task": each array task counts.
    per: str = "task"

    def __str__(self) -> str:
        return f"{self.name} {self.value}"


@dataclass(frozen=True)
class SiteLimits:
    """The most tasks one array may have, the caps on the user's jobs at once (none: no cap), and
    the most time and memory one task may ask for (escalation goes no higher; None: no limit)."""

    max_array: int | None = None
    caps: tuple[Cap, ...] = ()
    #: Seconds, e.g. a Slurm partition's ``MaxTime`` or the largest ``h_rt`` of Grid Engine's queues.
    max_time: int | None = None
    #: Bytes per task, or per CPU (``mem_per_cpu``: Grid Engine's per-slot ``h_vmem``, Slurm's
    #: ``MaxMemPerCPU``).
    max_mem: int | None = None
    mem_per_cpu: bool = False
    #: Where the time and memory limits come from, e.g. "partition short", "queue all.q".
    source: str = ""

    def describe(self) -> list[str]:
        """Each limit as "name value", for ``status()``."""
        array = [f"largest array {self.max_array}"] if self.max_array else []
        return array + [str(cap) for cap in self.caps]

    def most(self, kind: str, cpus: int | None) -> int | None:
        """The most a task of ``cpus`` CPUs may ask of ``kind`` ("time", "mem"); None: no limit."""
        if kind == "time":
            return self.max_time
        if self.max_mem is None:
            return None
        return self.max_mem * (cpus or 1) if self.mem_per_cpu else self.max_mem


@dataclass(frozen=True)
class Room:
    """How many more jobs and tasks may be submitted now (None: no cap), and the cap that binds."""

    jobs: int | None
    tasks: int | None
    binding: Cap | None = None

    @property
    def none_left(self) -> bool:
        return self.jobs == 0 or self.tasks == 0


def strictest(caps: Iterable[Cap]) -> tuple[Cap, ...]:
    """The lowest cap of each kind ("job", "task"), in that order; positive values only."""
    found: dict[str, Cap] = {}
    for cap in caps:
        if cap.value > 0 and (cap.per not in found or cap.value < found[cap.per].value):
            found[cap.per] = cap
    return tuple(found[per] for per in ("job", "task") if per in found)


def room(caps: Iterable[Cap], listed: Listed, ours: Listed) -> Room:
    """The room the ``caps`` leave, given the user's jobs in the scheduler's ``listed`` answer and
    ``ours``, the jobs this executor believes alive (one just submitted may not be listed yet)."""
    everything = {job: set(tasks) for job, tasks in listed.items()}
    for job, tasks in ours.items():
        everything.setdefault(job, set()).update(tasks)
    counts = {"job": len(everything), "task": sum(max(len(t), 1) for t in everything.values())}
    left: dict[str, tuple[int, Cap]] = {}
    for cap in caps:
        free = max(0, cap.value - counts[cap.per])
        if cap.per not in left or free < left[cap.per][0]:
            left[cap.per] = (free, cap)
    binding = min(left.values(), key=lambda found: found[0])[1] if left else None
    free_jobs, free_tasks = left.get("job"), left.get("task")
    return Room(free_jobs[0] if free_jobs else None, free_tasks[0] if free_tasks else None, binding)
