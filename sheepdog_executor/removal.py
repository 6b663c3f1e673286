"""Leaving the cluster politely: the queued tasks removed first (in one command, not one per task),
idle workers given a moment to exit by themselves, then every job removed in one command, and the
scheduler's listing watched until it no longer shows them, within a short deadline."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sheepdog_executor.errors import PollFailed
from sheepdog_executor.jobbook import JobBook
from sheepdog_executor.scheduler.base import JobStates, Scheduler, TaskState

log = logging.getLogger("sheepdog_executor")


class Removal:
    """Removes the jobs of a ``JobBook`` (the job manager's, once its thread stopped)."""

    def __init__(self, scheduler: Scheduler, book: JobBook, clock: Callable[[], float]) -> None:
        self.scheduler, self.book, self.clock = scheduler, book, clock

    def leave(self, grace: float, timeout: float) -> None:
        """With ``grace``, remove the queued tasks and give the running ones that long to end by
        themselves; then remove every job and wait up to ``timeout`` for the listing to clear. None
        of these commands waits for the ceiling per minute."""
        with self.scheduler.meter.urgent():
            if grace > 0:
                self.cancel_queued()  # nothing is outstanding: a queued task would start only to stop
                self.wait_gone(grace, warn=False)  # what is left now is removed next
            self.cancel_all()
            self.wait_gone(timeout)

    def wait_gone(self, timeout: float, warn: bool = True) -> None:
        """Wait until the scheduler lists none of the jobs (a failed poll: ask again); the jobs stay
        on the books, for ``cancel_all`` (an answer that wrongly omits a job must not spare it)."""
        deadline = self.clock() + timeout
        job_ids = self.book.ids()
        while job_ids:
            try:
                states: JobStates | None = self.scheduler.poll(job_ids)
            except PollFailed as exc:
                log.debug("polling removed jobs: %s", exc)
                states = None
            if states == {} or self.clock() > deadline:
                if states and warn:
                    log.warning("jobs %s still listed by the scheduler after removal", list(states))
                return
            time.sleep(0.5)

    def cancel_queued(self) -> None:
        """Remove the tasks that have not started yet: whole jobs when none of theirs started, in
        one command, and the queued tasks of the others in one more."""
        job_ids = self.book.ids()
        try:
            states = self.scheduler.poll(job_ids) if job_ids else {}
        except PollFailed as exc:  # cancel_all() removes them all next
            log.debug("polling for queued tasks: %s", exc)
            return
        queued = {
            job: [t for t, s in tasks.items() if s is TaskState.QUEUED] for job, tasks in states.items()
        }
        whole = [job for job, tasks in states.items() if len(queued[job]) == len(tasks)]
        if whole:
            self.scheduler.cancel(whole)
        partly = {job: tasks for job, tasks in queued.items() if tasks and job not in whole}
        if partly:
            self.scheduler.cancel_tasks(partly)

    def cancel_all(self) -> None:
        with self.book.lock:
            live = [job.id for job in self.book.jobs.values()]
            for job in self.book.jobs.values():
                job.cancelled = True
        if live:
            log.debug("removing jobs %s", live)
            self.scheduler.cancel(live)
