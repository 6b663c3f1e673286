"""How many workers to start, and starting them: arrays no bigger than the site allows, never past
the user's caps (``sitelimits``: work waits for room), a submission cut off by a dropped connection
adopted rather than repeated, queued tasks nobody needs removed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from sheepdog_executor.away import AwayClock
from sheepdog_executor.dispatch import Dispatcher
from sheepdog_executor.errors import ConnectionFailed, SubmitRefused
from sheepdog_executor.jobbook import JobBook
from sheepdog_executor.jobscript import WorkerLaunch
from sheepdog_executor.scheduler.base import JobStates, Scheduler, TaskState
from sheepdog_executor.sitelimits import SiteLimits, room

if TYPE_CHECKING:
    from sheepdog_executor.resourcesets import SetView

log = logging.getLogger("sheepdog_executor")


class Submitter:
    """The job manager's submission policy (called on its thread)."""

    def __init__(
        self,
        scheduler: Scheduler,
        dispatcher: Dispatcher | SetView,
        launch: WorkerLaunch,
        book: JobBook,
        away: AwayClock,
        *,
        max_workers: int,
        wake: Callable[[], None],
        limits: Future[SiteLimits] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.dispatcher = dispatcher
        self.launch = launch
        self.book = book
        self.away = away
        self.max_workers = max_workers
        #: Asks the job manager's thread for another turn soon.
        self._wake = wake
        self._limits: SiteLimits | None = None
        #: The scheduler's answer to ``site_limits``, asked early (during the set-up), if it was.
        self._early_limits = limits
        #: The last listing of all the user's jobs (taken by the job manager's polls when there are caps).
        self.listed: JobStates = {}
        #: Why calls wait although workers are short ("" when they do not): the cap that left no room.
        self.waiting = ""
        #: A submission was refused over a per-user limit: none is tried again before the next poll.
        self._refused = False

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
            self._start(wanted - capacity, pending)
            return
        self.waiting = ""
        if not pending and not held and queued:
            fully_queued = [j for j, tasks in queued.items() if len(tasks) == self.book.jobs[j].tasks]
            if fully_queued:
                log.debug("removing unneeded queued jobs %s", fully_queued)
                for job_id in fully_queued:
                    self.book.jobs[job_id].cancelled = True
                self.scheduler.cancel(fully_queued)

    def _start(self, tasks: int, pending: int) -> None:
        """Submit ``tasks`` more workers in arrays no bigger than the site allows (Grid Engine's
        max_aj_tasks, Slurm's MaxArraySize), as far as the user's caps leave room."""
        if self._refused:  # no room until the next poll says what left
            return
        limits = self.limits()
        self.waiting = ""
        jobs_left, limited, short = None, False, ""
        if limits.caps:
            with self.book.lock:
                ours = {job.id: job.alive for job in self.book.jobs.values()}
            free = room(limits.caps, self.listed, ours)
            jobs_left, short = free.jobs, f"waiting for room: {free.binding}"
            if free.tasks is not None and free.tasks < tasks:
                tasks, limited = free.tasks, True
        while tasks > 0:
            if jobs_left == 0:
                limited = True
                break
            size = min(tasks, limits.max_array) if limits.max_array else tasks
            if not self.submit(size, pending):
                return
            tasks -= size
            jobs_left = None if jobs_left is None else jobs_left - 1
        if limited:
            self.waiting = short

    def submit(self, tasks: int, pending: int) -> bool:
        """Submit one array job of ``tasks`` workers; False when a dropped connection cut the
        submission off before the scheduler took it (the thread is woken to try again)."""
        try:
            job_id = self.scheduler.submit(self.launch, tasks)
        except SubmitRefused as exc:  # another session took the room first: wait for room
            log.info("%s; waiting for room", exc)
            self.waiting, self._refused = f"waiting for room: {exc}", True
            return False
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

    def limits(self) -> SiteLimits:
        """The site's limits, asked once (the early answer if it came, else now)."""
        if self._limits is None:
            early = self._early_limits
            if early is not None and early.exception() is None:
                self._limits = early.result()
            else:  # not asked early, or that failed (a dropped connection): ask now
                self._limits = self.scheduler.site_limits()
            if self._limits.caps:
                log.info("site limits: %s", ", ".join(self._limits.describe()))
        return self._limits

    def snapshot(self) -> dict[str, Any]:
        """For ``status()``: the limits found (once asked) and why calls wait for room, if they do."""
        return {"limits": self._limits.describe() if self._limits else [], "waiting": self.waiting}

    def polled(self) -> None:
        """The scheduler answered a poll: room may have freed up since a refusal."""
        self._refused = False

    def wants_listing(self) -> bool:
        """Whether polls should list all the user's jobs (there are caps to count them against)."""
        return bool(self.limits().caps)
