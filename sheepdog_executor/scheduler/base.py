"""The interface every scheduler implements: submit, poll, cancel, account."""

from __future__ import annotations

import enum
import shlex
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence

from sheepdog_executor.jobscript import JobOptions, WorkerLaunch
from sheepdog_executor.shell import Completed, Shell


class TaskState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    #: The scheduler holds the task in an error state (Grid Engine's ``Eqw``): it will never run.
    ERROR = "error"


#: job id -> {task id -> state} for every task still known to the scheduler; absent = finished.
JobStates = dict[str, dict[int, TaskState]]


class Scheduler(ABC):
    """Turns a request for N workers into one array job, and reports on and removes its tasks."""

    name = "scheduler"

    def __init__(self, shell: Shell, options: JobOptions, command_setup: Sequence[str] = ()) -> None:
        self.shell = shell
        self.options = options
        self.command_setup = list(command_setup)

    def run(
        self, command: str, *, stdin: bytes = b"", timeout: float = 120.0, retry: bool = True
    ) -> Completed:
        """Run a scheduler command on the head node, after the ``command_setup`` lines."""
        script = "\n".join([*self.command_setup, command])
        return self.shell.run(script, stdin=stdin, timeout=timeout, retry=retry)

    def find_jobs(self, launch: WorkerLaunch) -> list[str]:
        """Ids of the jobs the scheduler holds that run workers of this launch (session)."""
        return []

    def prepare(self) -> None:  # noqa: B027 - most schedulers need no check
        """Check that the scheduler is usable from here; raise SchedulerError naming the fix."""

    @abstractmethod
    def submit(self, launch: WorkerLaunch, tasks: int) -> str:
        """Start ``tasks`` workers as one array job; return its job id."""

    @abstractmethod
    def poll(self, job_ids: Collection[str]) -> JobStates:
        """The state of every task of these jobs the scheduler still holds, in one call."""

    @abstractmethod
    def cancel(self, job_ids: Collection[str]) -> None:
        """Remove these jobs, queued and running tasks alike."""

    def error_reason(self, job_id: str) -> str:
        """Why the scheduler put a job in its error state, as it says it."""
        return ""

    def cancel_task(self, job_id: str, task_id: int) -> None:
        """Remove one task of a job (a worker gone silent whose slot should be freed)."""
        self.cancel([job_id])

    def accounting(self, job_id: str, task_id: int) -> dict[str, str]:
        """What the scheduler recorded about a finished task (exit status, failure, memory)."""
        return {}

    def output_tail(self, launch: WorkerLaunch, job_id: str, task_id: int, limit: int = 3000) -> str:
        """The end of a task's stderr file."""
        path = launch.output_path(job_id, task_id, "err")
        done = self.run(f"tail -c {int(limit)} {shlex.quote(path)} 2>/dev/null", timeout=30)
        return done.stdout
