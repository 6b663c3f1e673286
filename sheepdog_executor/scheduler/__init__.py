"""Schedulers turn a request for N workers into a job, and report and cancel its tasks."""

from sheepdog_executor.scheduler.base import Scheduler, TaskState
from sheepdog_executor.scheduler.gridengine import GridEngineScheduler
from sheepdog_executor.scheduler.local import LocalScheduler

__all__ = ["GridEngineScheduler", "LocalScheduler", "Scheduler", "TaskState"]
