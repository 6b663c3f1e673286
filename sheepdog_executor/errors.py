"""Every exception a user of sheepdog-executor can catch, in one place."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import BrokenExecutor


class SheepdogError(Exception):
    """Base class of the errors raised by sheepdog-executor itself."""


class ConfigurationError(SheepdogError, ValueError):
    """An option given to the executor is wrong; the message says which and how to fix it."""


class OptionOfAnotherScheduler(ConfigurationError, TypeError):
    """An executor got an option only another scheduler's executor takes (``mem=`` on Grid Engine);
    a TypeError too, as an unexpected keyword argument is."""


class ResourceConflict(ConfigurationError):
    """A resource of the shared vocabulary (``time=``, ``mem=``, ``cpus=``, ``gpus=``) is also
    asked for in the scheduler's own words (``resources={"h_rt": ...}``, ``cpus_per_task=``)."""

    WHAT = {"time": "time limit", "mem": "memory", "cpus": "CPUs", "gpus": "GPUs"}

    def __init__(self, name: str, value: str, theirs: str, scheduler: str) -> None:
        shown = value if name in ("cpus", "gpus") else repr(value)
        super().__init__(
            f"{name}={shown} and {theirs} both ask {scheduler} for each task's {self.WHAT[name]}; keep "
            f"one: {name}= (the same word on every scheduler) or {theirs}, not both"
        )


class ConnectionFailed(SheepdogError, ConnectionError):
    """The head node could not be reached or refused us (DNS, TCP, host key, authentication)."""


class UnknownHostKey(ConnectionFailed):
    """The head node's host key is not in known_hosts; we never accept an unknown key silently."""


class CommandTimedOut(ConnectionFailed):
    """A command on the head node did not end in time although the connection still answers: it
    hung there (a stuck NFS mount, an overloaded scheduler); the connection is kept."""


class PicklingFailed(SheepdogError, TypeError):
    """A submitted function or its arguments cannot be pickled; the message names the part that failed."""


class SchedulerError(SheepdogError):
    """A scheduler command (qsub, sbatch, qstat, squeue, ...) failed or is missing on the head node."""


class SubmitRefused(SchedulerError):
    """The scheduler refused a submission over a per-user limit (another session of the user's took
    the room first): the job manager waits for room and submits again; no call fails for it."""


class PollFailed(SchedulerError):
    """The scheduler's answer to a poll could not be used: the command failed, hung, or printed
    something that does not parse. The job manager keeps its last view and asks again."""


class EnvironmentSyncFailed(SheepdogError):
    """``environment="sync"`` could not give the nodes the client's packages; the message names the
    distribution, its version, the cause and the fix."""

    def __init__(self, message: str, *, distribution: str | None = None, version: str | None = None) -> None:
        super().__init__(message)
        self.distribution = distribution
        self.version = version


class DiskFull(SheepdogError, OSError):
    """A file could not be written on the cluster's side: its filesystem (or the user's quota on it)
    is full. ``path`` is what was being written, ``free`` the bytes its filesystem has left."""

    def __init__(self, path: str, free: int | None) -> None:
        shown = "unknown" if free is None else str(free)
        super().__init__(
            f"no space left on the cluster: {path} ({shown} bytes free); make room there (or under "
            "your disk quota, if the free bytes are enough), or set session_root= to a directory on "
            "a filesystem with space"
        )
        self.path = path
        self.free = free

    def __reduce__(self) -> tuple[type[DiskFull], tuple[str, int | None]]:
        return type(self), (self.path, self.free)


class BrokenClusterExecutor(BrokenExecutor, SheepdogError):
    """The executor can no longer run anything (SSH refused for good, scheduler gone, initializer
    failed); pending futures fail with it and further submit() raises it."""


#: The name of ``BrokenClusterExecutor`` before there was more than one scheduler.
BrokenGridEngineExecutor = BrokenClusterExecutor


class WorkerError(SheepdogError):
    """A call could not be completed because of its worker, not because of its own code."""

    def __init__(
        self,
        message: str,
        *,
        job_id: str | None = None,
        task_id: int | None = None,
        accounting: dict[str, str] | None = None,
        stderr_tail: str = "",
        scheduler: str = "",
        summary_keys: Sequence[str] = (),
    ) -> None:
        """``scheduler`` names it in the message ("Grid Engine job 12, task 3"); ``summary_keys``
        are the ``accounting`` fields shown there (all of them when empty)."""
        details = [message]
        if job_id is not None:
            job = f"{scheduler} job {job_id}" if scheduler else f"job {job_id}"
            details.append(job + (f", task {task_id}" if task_id else ""))
        if accounting:
            keys = summary_keys or tuple(accounting)
            shown = ", ".join(f"{k}={accounting[k]}" for k in keys if k in accounting)
            if shown:
                details.append(f"accounting: {shown}")
        if stderr_tail:
            details.append("stderr of the task (tail):\n" + stderr_tail.rstrip())
        super().__init__("\n".join(details))
        self.job_id = job_id
        self.task_id = task_id
        self.accounting = dict(accounting or {})
        self.stderr_tail = stderr_tail


class WorkerLost(WorkerError):
    """The task running a call died (killed, over a limit, node gone) before reporting its result."""


class WorkerStartFailed(WorkerError):
    """The job's tasks never reached the client: no interpreter, no route back, bad set-up lines."""


class PythonVersionMismatch(WorkerStartFailed):
    """The Python on the nodes is not the client's minor version, so pickles would not be portable."""


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised on a node; set as the ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class RemoteCallError(SheepdogError):
    """Stands in for an exception raised remotely that could not be pickled back to the client, or
    rebuilt on it: its message is the original's type name and message (``DivergedError: diverged
    at step 7``), ``remote_type`` the type's qualified name, its ``__cause__`` the remote traceback."""

    def __init__(self, message: str, remote_type: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type


class ExecutorShutDown(SheepdogError):
    """The executor was stopped (exception in the ``with`` body, Ctrl-C, exit) before the call ended."""


class SweepKeyError(SheepdogError, TypeError):
    """A call of a sweep (``sweep=``) has an argument whose value cannot be hashed into its key."""


class SweepStoreRefused(SheepdogError):
    """A sweep's store on the cluster holds a record that is not what a worker of the sweep wrote
    (its MAC does not check out): it was corrupted or replaced, and nothing of it is unpickled."""


class SweepDetached(SheepdogError):
    """A call handed to the cluster by ``detach()``: it runs there with no client; an executor of
    the same sweep gets its result with ``attach()``."""
