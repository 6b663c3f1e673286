"""The executor's jobs as the job manager knows them: one book, shared by the manager's parts."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from sheepdog_executor.scheduler.base import TaskState


@dataclass(eq=False)
class Job:
    """An array job this executor submitted."""

    id: str
    tasks: int
    cancelled: bool = False
    alive: dict[int, TaskState] = field(default_factory=dict)
    #: Tasks in ``alive`` that the scheduler's last answers did not list: since when.
    missing: dict[int, float] = field(default_factory=dict)
    #: Since when the scheduler's answers show the job in an error state (None: they do not).
    errored_since: float | None = None


class JobBook:
    """The jobs still on the cluster (``jobs``, by id) and every job ever submitted, in order;
    changed under ``lock`` (the job manager's thread writes, status and stop read)."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.submitted: list[str] = []
        self.lock = threading.Lock()

    def add(self, job_id: str, tasks: int) -> None:
        """A job just submitted: all its tasks queued."""
        with self.lock:
            self.jobs[job_id] = Job(job_id, tasks, alive={t: TaskState.QUEUED for t in range(1, tasks + 1)})
            self.submitted.append(job_id)

    def ids(self) -> list[str]:
        with self.lock:
            return list(self.jobs)
