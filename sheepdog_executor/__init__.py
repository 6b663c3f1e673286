"""sheepdog-executor: a concurrent.futures Executor that runs calls as Grid Engine or Slurm array jobs."""

from sheepdog_executor import integrations as _integrations  # noqa: F401 - joblib's "gridengine" backend, registered lazily
from sheepdog_executor.errors import (
    BrokenClusterExecutor,
    BrokenGridEngineExecutor,
    ConfigurationError,
    ConnectionFailed,
    DiskFull,
    ExecutorShutDown,
    PicklingFailed,
    PythonVersionMismatch,
    RemoteCallError,
    RemoteTraceback,
    SchedulerError,
    SheepdogError,
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
    "ConfigurationError",
    "ConnectionFailed",
    "DiskFull",
    "ExecutorShutDown",
    "GridEngineExecutor",
    "LocalExecutor",
    "PicklingFailed",
    "PythonVersionMismatch",
    "RemoteCallError",
    "RemoteTraceback",
    "SchedulerError",
    "SheepdogError",
    "SlurmExecutor",
    "UnknownHostKey",
    "WorkerError",
    "WorkerLost",
    "WorkerStartFailed",
]
