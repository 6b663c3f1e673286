"""Schedulers turn a request for N workers into array jobs, and report and cancel their tasks."""

from sheepdog_executor.scheduler.base import Scheduler, SessionJob, TaskState
from sheepdog_executor.scheduler.gridengine import GridEngineOptions, GridEngineScheduler
from sheepdog_executor.scheduler.local import LocalScheduler
from sheepdog_executor.scheduler.slurm import SlurmOptions, SlurmScheduler

__all__ = [
    "GridEngineOptions",
    "GridEngineScheduler",
    "LocalScheduler",
    "Scheduler",
    "SessionJob",
    "SlurmOptions",
    "SlurmScheduler",
    "TaskState",
]
