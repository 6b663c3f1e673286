"""sheepdog-executor: a concurrent.futures Executor that runs calls as Grid Engine or Slurm array jobs."""

import sys as _sys

from sheepdog_executor.errors import (
    BrokenClusterExecutor,
    BrokenGridEngineExecutor,
    CommandTimedOut,
    ConfigurationError,
    ConnectionFailed,
    DiskFull,
    EnvironmentSyncFailed,
    ExecutorShutDown,
    OptionOfAnotherScheduler,
    PicklingFailed,
    PollFailed,
    PythonVersionMismatch,
    RemoteCallError,
    RemoteTraceback,
    ResourceConflict,
    SchedulerError,
    SheepdogError,
    SubmitRefused,
    SweepDetached,
    SweepKeyError,
    SweepStoreRefused,
    UnknownHostKey,
    WorkerError,
    WorkerLost,
    WorkerStartFailed,
)
from sheepdog_executor.executor import ClusterExecutor, GridEngineExecutor, LocalExecutor, SlurmExecutor

__version__ = "0.1.0"

__all__ = [
    "BrokenClusterExecutor",
    "BrokenGridEngineExecutor",
    "ClusterExecutor",
    "CommandTimedOut",
    "ConfigurationError",
    "ConnectionFailed",
    "DiskFull",
    "EnvironmentSyncFailed",
    "ExecutorShutDown",
    "GridEngineExecutor",
    "LocalExecutor",
    "OptionOfAnotherScheduler",
    "PicklingFailed",
    "PollFailed",
    "PythonVersionMismatch",
    "RemoteCallError",
    "RemoteTraceback",
    "ResourceConflict",
    "SchedulerError",
    "SheepdogError",
    "SlurmExecutor",
    "SubmitRefused",
    "SweepDetached",
    "SweepKeyError",
    "SweepStoreRefused",
    "UnknownHostKey",
    "WorkerError",
    "WorkerLost",
    "WorkerStartFailed",
]


def _register_joblib_backends() -> None:
    """joblib's backends, without importing joblib and without an import hook: registered now when
    joblib is loaded already (or in a task, where the names mean joblib's loky on the node); else
    ``import sheepdog_executor.integrations`` registers them once joblib loads, and
    ``import sheepdog_executor.integrations.joblib_backend`` at once."""
    from sheepdog_executor.remote.nested import in_worker

    if "joblib.parallel" in _sys.modules or in_worker():
        from sheepdog_executor import integrations  # noqa: F401


_register_joblib_backends()
