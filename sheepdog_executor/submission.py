"""How many workers to start, and starting them: arrays no bigger than the site allows, a
submission cut off by a dropped connection adopted rather than repeated, queued tasks nobody needs
removed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future

from sheepdog_executor.away import AwayClock
from sheepdog_executor.dispatch import Dispatcher
from sheepdog_executor.errors import ConnectionFailed
from sheepdog_executor.jobbook import JobBook
from sheepdog_executor.jobscript import WorkerLaunch
from sheepdog_executor.scheduler.base import Scheduler, TaskState

log = logging.getLogger("sheepdog_executor")


class Submitter:
    """The job manager's submission policy (called on its thread)."""

    def __init__(
        self,
        scheduler: Scheduler,
        dispatcher: Dispatcher,
        launch: WorkerLaunch,
        book: JobBook,
        away: AwayClock,
        *,
        max_workers: int,
        wake: Callable[[], None],
        array_limit: Future[int | None] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.dispatcher = dispatcher
        self.launch = launch
        self.book = book
        self.away = away
        self.max_workers = max_workers
        #: Asks the job manager's thread for another turn soon.
        self._wake = wake
        self._max_array: int | None = None
        self._array_limit_known = False
        #: The scheduler's answer to ``max_array_size``, asked early (during the set-up), if it was.
        self._early_array_limit = array_limit

    def scale(self) -> None:
        """Submit a job when calls wait for workers; remove queued tasks nobody needs."""
        live = self.dispatcher.liveness()
        pending, held = live.pending, live.held
        registered = {(w.job, w.task) for w in live.workers}
        seen = live.tasks_seen
        with self.book.lock:
            capacity = 0
            queued: dict[str, list[int]] = {}
            for job in self.book.jobs.values():
                for task, state in job.alive.items():
                    # a task whose worker said hello runs, whatever the last (possibly stale) poll said
                    if state is TaskState.QUEUED and (job.id, task) not in seen:
                        queued.setdefault(job.id, []).append(task)
                        capacity += 1
                    elif (job.id, task) not in seen or (job.id, task) in registered:
                        capacity += 1
        wanted = min(self.max_workers, pending + held)
        if wanted > capacity and pending:
            # arrays no bigger than the site allows (Grid Engine's max_aj_tasks, Slurm's MaxArraySize)
            tasks, limit = wanted - capacity, self._array_limit()
            while tasks > 0:
                size = min(tasks, limit) if limit else tasks
                if not self.submit(size, pending):
                    return
                tasks -= size
        elif not pending and not held and queued:
            fully_queued = [j for j, tasks in queued.items() if len(tasks) == self.book.jobs[j].tasks]
            if fully_queued:
                log.debug("removing unneeded queued jobs %s", fully_queued)
                for job_id in fully_queued:
                    self.book.jobs[job_id].cancelled = True
                self.scheduler.cancel(fully_queued)

    def submit(self, tasks: int, pending: int) -> bool:
        """Submit one array job of ``tasks`` workers; False when a dropped connection cut the
        submission off before the scheduler took it (the thread is woken to try again)."""
        try:
            job_id = self.scheduler.submit(self.launch, tasks)
        except ConnectionFailed:
            # the connection dropped during the submission: the job may exist; adopt it, never submit twice
            with self.book.lock:
                known = set(self.book.submitted)
            adopted = [j for j in self.scheduler.find_jobs(self.launch) if j not in known]
            if not adopted:
                log.warning("a submission was cut off by a dropped connection before it was taken; retrying")
                self._wake()
                return False
            job_id = adopted[0]
            log.warning("adopted job %s submitted before the SSH connection dropped", job_id)
        self.away.reached()
        log.info("submitted job %s with %d task(s) for %d pending call(s)", job_id, tasks, pending)
        self.book.add(job_id, tasks)
        return True

    def _array_limit(self) -> int | None:
        """The site's largest array, asked once (the early answer if it came, else now)."""
        if not self._array_limit_known:
            early = self._early_array_limit
            if early is not None and early.exception() is None:
                self._max_array = early.result()
            else:  # not asked early, or that failed (a dropped connection): ask now
                self._max_array = self.scheduler.max_array_size()
            self._array_limit_known = True
        return self._max_array
