"""The interface every scheduler implements: submit, poll, cancel, account, explain."""

from __future__ import annotations

import dataclasses
import enum
import posixpath
import re
import shlex
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from sheepdog_executor.errors import CommandTimedOut, PollFailed, SchedulerError, SubmitRefused
from sheepdog_executor.jobscript import JobOptions, WorkerLaunch
from sheepdog_executor.meter import CommandMeter
from sheepdog_executor.options import lines
from sheepdog_executor.resources import Resources
from sheepdog_executor.shell import TIMED_OUT, Completed, Shell, bound_seconds, bounded
from sheepdog_executor.sitelimits import SiteLimits


class TaskState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    #: The scheduler holds the task where it can never run (Grid Engine's ``Eqw``, a Slurm job
    #: pending for a reason that will not go away): its calls fail with ``error_reason``.
    ERROR = "error"


#: job id -> {task id -> state} for every task still known to the scheduler; absent = finished.
JobStates = dict[str, dict[int, TaskState]]


@dataclass(frozen=True)
class SessionJob:
    """One of the user's jobs that runs our worker from a session directory."""

    id: str
    name: str
    #: The session directory's name (under the session root).
    session: str


@dataclass(frozen=True)
class NoOptions:
    """A scheduler without options of its own."""


OptionsT = TypeVar("OptionsT")


class Scheduler(ABC, Generic[OptionsT]):
    """Turns a request for N workers into array jobs, and reports on and removes their tasks.

    A new scheduler is one module with one subclass, ``Scheduler[ItsOptions]``: the class attributes
    below, ``submit``, ``poll``, ``cancel`` and, to explain failures,
    ``accounting``/``error_reason``/``session_jobs``; plus one registry row (``registry.py``, or an
    entry point of the ``sheepdog_executor.schedulers`` group). Its ``Options`` dataclass declares
    its own options once, with ``options.option`` fields: the executor class, the config table and
    the CLI take them from there.
    """

    #: How users and messages name the scheduler ("Grid Engine", "Slurm").
    name: ClassVar[str] = "scheduler"
    #: The commands ``prepare`` expects on the head node.
    commands: ClassVar[tuple[str, ...]] = ()
    #: What to change when the commands are missing (after "add ... to PATH").
    setup_hint: ClassVar[str] = ""
    #: The options of the scheduler's own (a frozen dataclass of ``option()`` fields, e.g. queue or
    #: partition): ``OptionsT`` itself, as a class.
    Options: ClassVar[type[Any]] = NoOptions
    #: The accounting fields worth showing in an error message, in order.
    summary_keys: ClassVar[tuple[str, ...]] = ()
    #: What to change when a task runs out of memory, in the scheduler's words ("ask for more mem=").
    memory_advice: ClassVar[str] = ""
    #: How long a poll of the scheduler may take before it counts as failed (ended on the head node).
    poll_timeout: ClassVar[float] = 60.0
    #: Words of a submit command's refusal over a per-user limit (``SubmitRefused``: wait for room).
    refusals: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        shell: Shell,
        options: JobOptions,
        command_setup: Sequence[str] | str = (),
        site: OptionsT | None = None,
    ) -> None:
        self.shell = shell
        self.options = options
        self.command_setup = lines(command_setup)
        self.site: OptionsT = site if site is not None else self.Options()
        #: Counts the commands ``run`` sends and keeps them under a ceiling per minute.
        self.meter = CommandMeter()
        self.check_needs(self.site, options.needs)

    def with_python(self, python: str) -> Scheduler:
        """A scheduler like this one whose tasks run ``python`` (a synced environment's)."""
        return self._like(dataclasses.replace(self.options, python=python))

    def with_needs(self, needs: Resources) -> Scheduler:
        """A scheduler like this one whose tasks ask for ``needs`` (a resource set's)."""
        return self._like(dataclasses.replace(self.options, needs=needs))

    def _like(self, options: JobOptions) -> Scheduler:
        """This scheduler with other job options; the two count their commands together."""
        other = type(self)(self.shell, options, self.command_setup, self.site)
        other.meter = self.meter
        return other

    @classmethod
    def check_needs(cls, site: OptionsT, needs: Resources) -> None:
        """ConfigurationError (``ResourceConflict``) when the scheduler's own options (``site``)
        ask for what ``needs`` asks too (before anything connects, and for each resource set)."""

    # -- what every scheduler does ----------------------------------------------------------------
    @abstractmethod
    def submit(self, launch: WorkerLaunch, tasks: int) -> str:
        """Start ``tasks`` workers as one array job; return its job id."""

    @abstractmethod
    def poll(self, job_ids: Collection[str]) -> JobStates:
        """The state of every task of these jobs the scheduler still holds, in one call."""

    @abstractmethod
    def cancel(self, job_ids: Collection[str]) -> None:
        """Remove these jobs, queued and running tasks alike."""

    # -- with defaults ----------------------------------------------------------------------------
    def listing(self) -> JobStates:
        """Every task of all the user's own jobs (every session's, and others), in one call; a job
        that is not an array lists as task 0. Needed by a scheduler whose ``site_limits`` has caps."""
        raise NotImplementedError(f"{self.name} cannot list the user's jobs")

    def cancel_tasks(self, tasks: Mapping[str, Collection[int]]) -> None:
        """Remove these tasks (job id -> task ids), in as few commands as the scheduler allows."""
        for job_id, task_ids in tasks.items():
            for task_id in task_ids:
                self.cancel_task(job_id, task_id)

    @classmethod
    def site_options(cls, options: Mapping[str, Any]) -> OptionsT:
        """The scheduler's own options (its ``Options``) out of all of an executor's options;
        raises ConfigurationError for a bad value."""
        names = {f.name for f in dataclasses.fields(cls.Options)}
        return cls.Options(**{k: v for k, v in options.items() if k in names and v is not None})

    @classmethod
    def option_names(cls) -> list[str]:
        """The executor options that shape this scheduler's jobs, as a user writes them."""
        return ["working_directory=", *(f"{f.name}=" for f in dataclasses.fields(cls.Options))]

    def run_together(self, commands: Sequence[str], timeout: float = 60.0) -> list[str]:
        """The outputs of ``commands`` (stderr dropped), run at the same time in one command on the
        head node: the site's limits take several slow queries (``sacctmgr`` talks to slurmdbd), and
        the first submit waits for them."""
        split = "@@sheepdog@@"
        started = " ".join(f'( {command} ) >"$d/{i}" 2>/dev/null &' for i, command in enumerate(commands))
        shown = "; ".join(f'cat "$d/{i}"; echo {split}' for i in range(len(commands)))
        script = f'd=$(mktemp -d) || exit 1; {started} wait; {shown}; rm -rf "$d"'
        outputs = self.run(script, timeout=timeout).stdout.split(split + "\n")
        return (outputs + [""] * len(commands))[: len(commands)]

    def run(
        self,
        command: str,
        *,
        stdin: bytes = b"",
        timeout: float = 120.0,
        retry: bool = True,
        urgent: bool = False,
    ) -> Completed:
        """Run a scheduler command on the head node, after the ``command_setup`` lines; one that
        hangs there is ended there too (exit status ``TIMED_OUT``), shortly before ``timeout``.
        Counted by ``meter``, and delayed while the last minute had its ceiling of commands, unless
        ``urgent`` (a removal, which frees the site's resources)."""
        self.meter.take(urgent)
        script = bounded("\n".join([*self.command_setup, command]), timeout)
        return self.shell.run(script, stdin=stdin, timeout=timeout, retry=retry)

    def query(self, command: str) -> str:
        """The output of a command that reads the scheduler's state (``qstat``, ``squeue``); raises
        PollFailed when it exits non-zero or does not end within ``poll_timeout``."""
        program = command.split()[0]
        try:
            done = self.run(command, timeout=self.poll_timeout)
        except CommandTimedOut as exc:
            raise PollFailed(f"{program} did not answer: {exc}") from exc
        if done.returncode == TIMED_OUT:
            raise PollFailed(
                f"{program} did not answer within {bound_seconds(self.poll_timeout)} s on "
                f"{self.shell.description} (ended there)"
            )
        if done.returncode != 0:
            raise PollFailed(
                f"{program} failed on {self.shell.description} (exit {done.returncode}): "
                f"{done.stderr.strip()[-500:]}"
            )
        return done.stdout

    def submit_script(self, command: str, script: str, job_id: re.Pattern[str]) -> str:
        """Run the submit ``command`` with the job ``script`` on stdin and return the id that
        ``job_id`` finds on the last line it prints; if it fails or prints no id, SchedulerError with
        what it said. Never retried: the job may exist all the same (see ``find_jobs``)."""
        done = self.run(command, stdin=script.encode(), retry=False)
        if done.returncode == TIMED_OUT:  # taken or not: the caller looks (find_jobs)
            raise CommandTimedOut(f"{command.split()[0]} did not end in time on {self.shell.description}")
        lines = done.stdout.strip().splitlines()
        match = job_id.match(lines[-1].strip() if lines else "")
        said = (done.stderr or done.stdout).strip()
        if (done.returncode != 0 or not match) and any(word in said for word in self.refusals):
            raise SubmitRefused(f"{command.split()[0]} was refused over a per-user limit: {said[-300:]}")
        if done.returncode != 0 or not match:
            raise SchedulerError(
                f"{command.split()[0]} on {self.shell.description} failed (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()}"
            )
        return match.group(1)

    def prepare(self) -> None:
        """Check that the scheduler's commands are there; raise SchedulerError naming the fix."""
        if not self.commands:
            return
        probe = "; ".join(f"command -v {c} >/dev/null || echo {c}" for c in self.commands)
        missing = self.run(probe, timeout=60).stdout.split()
        if missing:
            raise SchedulerError(
                f"{', '.join(missing)} not found on {self.shell.description} in a non-interactive "
                f"shell; add {self.name}'s bin directory to PATH in the remote ~/.bashrc (before any "
                f"'return if not interactive' line), or {self.setup_hint}"
            )

    def version(self) -> str:
        """The scheduler's version as its commands print it ("" when unknown)."""
        return ""

    def max_array_size(self) -> int | None:
        """The most tasks one array job may have at this site (None: no known limit)."""
        return None

    def site_limits(self) -> SiteLimits:
        """What this site lets the user have at once: the largest array and the caps on the user's
        jobs (a scheduler with caps implements ``listing`` too)."""
        return SiteLimits(max_array=self.max_array_size())

    def cancel_task(self, job_id: str, task_id: int) -> None:
        """Remove one task of a job (a worker gone silent whose slot should be freed)."""
        self.cancel([job_id])

    def accounting(self, job_id: str, task_id: int) -> dict[str, str]:
        """What the scheduler recorded about a finished task (exit status, failure, memory)."""
        return {}

    def killed_for(self, accounting: Mapping[str, str]) -> str:
        """Why the scheduler itself ended a task, read from its ``accounting`` ("" when it does not
        say, e.g. a plain SIGKILL): a limit the task went over, and the option to change."""
        return ""

    def limit_hit(self, accounting: Mapping[str, str]) -> str:
        """Which limit the scheduler ended a task for, read from its ``accounting``: "time",
        "memory", or "" (none, or the record does not say which)."""
        return ""

    def time_limit(self) -> float | None:
        """The seconds each task may run, as this executor asked for them (None: not asked)."""
        return None

    def deadline_expression(self) -> str:
        """A shell expression, evaluated first thing in a task, of when the task's time ends (seconds
        since the epoch; empty when not known)."""
        limit = self.time_limit()
        return f"$(( $(date +%s) + {int(limit)} ))" if limit else ""

    def memory_limit(self) -> str:
        """A shell word of the task's memory limit as the worker measures it, "BYTES rss" or
        "BYTES vmem" (what the scheduler counts against it); "" when none was asked for."""
        return ""

    def task_environment(self) -> dict[str, str]:
        """What the job script exports for the worker first thing (name -> shell word): when the
        task's time ends (``SHEEPDOG_DEADLINE``: the worker takes no call that would not finish
        before it), its memory limit (``SHEEPDOG_MEMORY_LIMIT``: nor one that would go over it)
        and what to change when a call runs out of memory (``SHEEPDOG_MEMORY_ADVICE``); see
        ``remote/budget.py``."""
        environment = {}
        deadline = self.deadline_expression()
        if deadline:
            environment["SHEEPDOG_DEADLINE"] = f'"{deadline}"'
        if self.memory_limit():
            environment["SHEEPDOG_MEMORY_LIMIT"] = self.memory_limit()
        if self.advice_for_memory():
            environment["SHEEPDOG_MEMORY_ADVICE"] = shlex.quote(self.advice_for_memory())
        return environment

    def advice_for_memory(self) -> str:
        """What to change when a call runs out of memory (its limit asked by ``mem=`` or the
        scheduler's own option)."""
        return self.memory_advice

    def killed_over(self, accounting: Mapping[str, str]) -> str:
        """Which of the task's limits the scheduler killed it over, in the words of ``escalate=``:
        "mem", "time", or "" (not known, or not a kill over a limit)."""
        return {"time": "time", "memory": "mem"}.get(self.limit_hit(accounting), "")

    def exit_signal(self, accounting: Mapping[str, str]) -> int | None:
        """The signal that ended a task, from its ``accounting`` (an exit status of 128+N, as
        Grid Engine and a shell report it); None when it was not a signal or is not known."""
        status = accounting.get("exit_status", "").split(" ")[0]
        return int(status) - 128 if status.isdigit() and 128 < int(status) < 160 else None

    def memory_hint(self, accounting: Mapping[str, str]) -> str:
        """The likely cause of a task's death when its ``accounting`` shows memory at or above
        its request, and the option to change; "" otherwise."""
        return ""

    def error_reason(self, job_id: str) -> str:
        """Why the scheduler holds a job where it can never run, in its own words."""
        return ""

    def pending_reason(self, job_id: str) -> str:
        """Why a job still waits in the queue, in the scheduler's words ("" when it does not say)."""
        return ""

    def inspect_command(self, job_id: str) -> str:
        """The command that shows a user everything the scheduler knows about a job."""
        return ""

    def session_jobs(self, root: str) -> list[SessionJob]:
        """The user's own jobs whose task output goes to a session directory under ``root``."""
        return []

    def find_jobs(self, launch: WorkerLaunch) -> list[str]:
        """Ids of the user's jobs that run workers of this launch (session)."""
        root, name = posixpath.split(launch.session_dir.rstrip("/"))
        return [job.id for job in self.session_jobs(root) if job.session == name]

    def output_tail(self, launch: WorkerLaunch, job_id: str, task_id: int, limit: int = 3000) -> str:
        """The end of a task's stderr file."""
        path = launch.output_path(job_id, task_id, "err")
        done = self.run(f"tail -c {int(limit)} {shlex.quote(path)} 2>/dev/null", timeout=30)
        return done.stdout


def session_of(path: str, root: str, job_id: str, task_id: str) -> str | None:
    """The session name in a task output path as a job script wrote it (``root/NAME/task-...``),
    with the scheduler's own placeholders ``job_id``/``task_id``; None when it is not ours."""
    prefix, suffix = WorkerLaunch("SESSION", "").output_path(job_id, task_id, "out").split("SESSION")
    start = f"{root.rstrip('/')}/{prefix}"
    if not (path.startswith(start) and path.endswith(suffix) and len(path) > len(start) + len(suffix)):
        return None
    name = path[len(start) : len(path) - len(suffix)]
    return name if plain_name(name) else None


def plain_name(name: str) -> bool:
    """A single, ordinary path component."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\n" not in name
