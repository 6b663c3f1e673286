"""The job manager: the one thread that owns the cluster side of an executor.

It polls the scheduler for all of the executor's jobs in one call, notices workers that died or never
started and jobs held in an error state (``losses``), has workers submitted when calls wait
(``submission``, after a short batching window), and removes the jobs when the executor stops.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sheepdog_executor.away import PAUSE_SECONDS, AwayClock
from sheepdog_executor.clock import awake_or_asleep
from sheepdog_executor.diagnosis import Diagnosis
from sheepdog_executor.dispatch import Dispatcher, Liveness
from sheepdog_executor.errors import BrokenClusterExecutor, ConnectionFailed, PollFailed, SchedulerError
from sheepdog_executor.jobbook import Job, JobBook
from sheepdog_executor.jobscript import WorkerLaunch
from sheepdog_executor.losses import Losses
from sheepdog_executor.removal import Removal
from sheepdog_executor.scheduler.base import JobStates, Scheduler, TaskState
from sheepdog_executor.sitelimits import SiteLimits
from sheepdog_executor.submission import Submitter

if TYPE_CHECKING:
    from sheepdog_executor.resourcesets import SetView

log = logging.getLogger("sheepdog_executor")

__all__ = ["CURRENT_HEARTBEATS", "SECOND_LOOK_SECONDS", "AwayClock", "Job", "JobManager", "PollCounts"]

#: A task (or job) missing from the scheduler's answer is believed gone only when it is still missing
#: from an answer this many seconds later (a second look), and an error state only when it is still
#: there then: one wrong answer (an empty listing, a scheduler that restarts) must end nothing.
SECOND_LOOK_SECONDS = 5.0
#: A worker heard from within this many heartbeat intervals is alive, whatever the scheduler says.
CURRENT_HEARTBEATS = 3
#: After this client was away, workers get this long on top of heartbeat_timeout to reach it again
#: (a request stuck on a dead route times out first).
COMEBACK_SECONDS = 60.0


@dataclass
class PollCounts:
    """How the scheduler's polls went (for ``status()``)."""

    answered: int = 0
    #: Polls whose answer could not be used (a failed, hung or unreadable command).
    failed: int = 0
    last_failure: str = ""
    #: Since when the polls fail, one after the other (None while they answer).
    failing_since: float | None = None
    streak: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {"answered": self.answered, "failed": self.failed, "last_failure": self.last_failure}


class JobManager:
    """Submits, polls and cancels the executor's jobs; reports lost and never-started workers."""

    def __init__(
        self,
        scheduler: Scheduler,
        dispatcher: Dispatcher | SetView,
        launch: WorkerLaunch,
        *,
        max_workers: int,
        batch_window: float,
        poll_interval: float,
        heartbeat_timeout: float,
        disconnect_tolerance: float = 600.0,
        clock: Callable[[], float] = awake_or_asleep,
        limits: Future[SiteLimits] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.dispatcher = dispatcher
        self.launch = launch
        self.batch_window = batch_window
        self.poll_interval = poll_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.away = AwayClock(clock)
        #: The endpoint's pauses already counted as absences (``Liveness.heard``).
        self._pauses_seen = 0
        self.clock = clock
        self.book = JobBook()
        #: The jobs still on the cluster, by id, and every job submitted, in order (the book's).
        self.jobs, self.submitted_jobs = self.book.jobs, self.book.submitted
        self._wake = threading.Event()
        self._flush = False
        self._stopping = False
        self._failures = 0
        self.polls = PollCounts()
        self._last_poll = -float("inf")
        self._thread = threading.Thread(target=self._run, name="sheepdog-jobs", daemon=True)
        self.removal = Removal(scheduler, self.book, clock)
        self.losses = Losses(scheduler, dispatcher, launch, self.away, disconnect_tolerance, clock)
        self.submitter = Submitter(
            scheduler,
            dispatcher,
            launch,
            self.book,
            self.away,
            max_workers=max_workers,
            wake=self._wake.set,
            limits=limits,
        )

    @property
    def disconnect_tolerance(self) -> float:
        """How long workers wait for this client (seconds); twice that, this side gives up."""
        return self.losses.disconnect_tolerance

    @disconnect_tolerance.setter
    def disconnect_tolerance(self, seconds: float) -> None:
        self.losses.disconnect_tolerance = seconds

    @property
    def diagnosis(self) -> Diagnosis:
        """The thread that gathers lost tasks' accounting."""
        return self.losses.diagnosis

    # -- control from other threads --------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def wake(self, flush: bool = False) -> None:
        """Something changed; with ``flush``, submit without waiting for the batching window."""
        if flush:
            self._flush = True
        self._wake.set()

    def stop(self, grace: float = 5.0, timeout: float = 10.0) -> None:
        """Stop the thread, give idle workers ``grace`` seconds to exit by themselves, remove
        every job still on the cluster and wait (up to ``timeout``) until the scheduler dropped them."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)
        self.diagnosis.stop()
        self.removal.leave(grace, timeout)

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            before = self.clock()
            self._wake.wait(self.poll_interval)
            self._wake.clear()
            self.away.check_gap(self.clock() - before - self.poll_interval)
            if self._stopping:
                return
            started = self.clock()
            try:
                self._step()
                self._failures = 0
            except ConnectionFailed as exc:
                # the laptop is offline, or asleep: the workers wait for it (disconnect_tolerance);
                # this side waits twice as long before it gives up on the cluster
                unreachable = self.away.unreachable(str(exc), since=started)
                if unreachable > 2 * self.disconnect_tolerance:
                    self.dispatcher.break_(
                        BrokenClusterExecutor(
                            f"the cluster was unreachable for {unreachable:.0f} s (more than twice "
                            f"disconnect_tolerance, {self.disconnect_tolerance:.0f} s): {exc}"
                        )
                    )
                    return
            except SchedulerError as exc:
                self._failures += 1
                log.warning("job manager: %s", exc)
                if self._failures >= 3:
                    self.dispatcher.break_(BrokenClusterExecutor(f"the cluster can no longer be used: {exc}"))
                    return
            except Exception as exc:  # noqa: BLE001 - never die silently: fail loudly instead
                log.exception("job manager failed")
                self.dispatcher.break_(BrokenClusterExecutor(f"internal error in the job manager: {exc!r}"))
                return

    def _step(self) -> None:
        pending, _ = self.dispatcher.counts()
        if pending and not self._flush and self.batch_window > 0:
            time.sleep(self.batch_window)  # let submissions that arrive close together share a job
        self._flush = False
        now = self.clock()
        if now - self._last_poll >= self.poll_interval:  # one poll per interval, however busy
            self._last_poll = now
            job_ids = self.book.ids()
            throttled = self.scheduler.meter.waited_here()
            try:
                asked, states = self._poll(job_ids, pending)
            except PollFailed as exc:
                self._poll_failed(exc, now)
                if self.dispatcher.broken is not None:
                    return
                if self._took(now, throttled) < PAUSE_SECONDS:  # else judge nobody on a pause it hid
                    self._reconcile(None)  # the last view stays; silent workers are still found
            else:
                self._poll_answered(asked)
                self.submitter.polled()
                # back after SSH failures (only an answer of the cluster says so): a grace period,
                # granted before anyone is judged
                if asked:
                    self.away.reached()
                # a poll this slow means this client was cut off (or suspended) while it waited: the
                # workers could not reach it either; judge them next round, with a grace period
                if not self.away.check_gap(self._took(now, throttled)):
                    self._reconcile(states)
        if self.dispatcher.broken is None and not self._stopping:
            self.submitter.scale()

    def _took(self, since: float, throttled: float) -> float:
        """How long the poll that started at ``since`` took, less what its command waited under the
        ceiling of commands per minute (``throttled``: this thread's wait before): no pause, that."""
        return self.clock() - since - (self.scheduler.meter.waited_here() - throttled)

    def _poll(self, job_ids: list[str], pending: int) -> tuple[bool, JobStates]:
        """(whether the scheduler was asked, the states of these jobs). With caps on the user's
        jobs, the listing of all of them (every session's) is what is asked, and kept for the
        submitter to count; else only when there are jobs of ours."""
        if self.submitter.wants_listing() and (job_ids or pending):
            listed = self.submitter.listed = self.scheduler.listing()
            return True, {job: listed[job] for job in job_ids if job in listed}
        return bool(job_ids), self.scheduler.poll(job_ids) if job_ids else {}

    def _poll_failed(self, error: PollFailed, since: float) -> None:
        """A poll whose answer cannot be used: keep the last view, warn once, and give up on the
        cluster only when the polls failed for longer than it may be unreachable."""
        polls = self.polls
        polls.failed += 1
        polls.streak += 1
        polls.last_failure = str(error)
        if polls.failing_since is None:
            polls.failing_since = since
            log.warning(
                "could not read %s's answer (%s); keeping the last view of the jobs until it answers",
                self.scheduler.name,
                error,
            )
        else:
            log.debug("poll failed again: %s", error)
        failing = self.clock() - polls.failing_since
        if failing > 2 * self.disconnect_tolerance:
            self.dispatcher.break_(
                BrokenClusterExecutor(
                    f"{self.scheduler.name}'s answers to {polls.streak} polls in {failing:.0f} s (more "
                    f"than twice disconnect_tolerance, {self.disconnect_tolerance:.0f} s) could not be "
                    f"read, the last: {error}"
                )
            )

    def _poll_answered(self, asked: bool) -> None:
        polls = self.polls
        polls.answered += asked
        if polls.failing_since is not None:
            log.warning("%s answers again, after %d failed poll(s)", self.scheduler.name, polls.streak)
            polls.failing_since, polls.streak = None, 0

    def _look(self, job: Job, listed: dict[int, TaskState], now: float, live: Liveness) -> None:
        """Take the scheduler's answer for ``job``, but believe a task gone only on a second look
        (still missing ``SECOND_LOOK_SECONDS`` later) and never while its worker's heartbeat is
        current; an error state likewise only when it lasts."""
        alive = dict(listed)
        for task in listed:
            job.missing.pop(task, None)
        for task, state in job.alive.items():
            if task not in listed:
                first = job.missing.setdefault(task, now)
                if now - first < SECOND_LOOK_SECONDS or self._heard_from(job.id, task, live):
                    alive[task] = state
        if TaskState.ERROR not in listed.values():
            job.errored_since = None
        elif job.errored_since is None:
            job.errored_since = now
        job.alive = alive

    def _heard_from(self, job: str, task: int, live: Liveness) -> bool:
        """Whether a worker of this task sent a heartbeat (or anything) within a few intervals."""
        recent = self.clock() - CURRENT_HEARTBEATS * live.heartbeat
        return any(w.job == job and w.task == task and w.last_seen > recent for w in live.workers)

    def _reconcile(self, states: JobStates | None) -> None:
        """Find workers that died and jobs that ended; forget finished jobs. ``states``: the
        scheduler's answer, or None to judge on the last view (its answer could not be read)."""
        now = self.clock()
        live = self.dispatcher.liveness()
        ended, errored = self._take_answer(states, now, live) if states is not None else ([], [])
        for job in errored:  # held in an error state by the scheduler: it would wait there forever
            job.cancelled = True
            self.losses.errored(job.id)
        ended_ids = {job.id for job in ended}
        listening = self._listening(live, now)
        for worker in live.workers:
            gone = worker.job in ended_ids or (
                worker.job in self.jobs and worker.task not in self.jobs[worker.job].alive
            )
            # silence while this client itself was away (offline, suspended) says nothing of a worker
            silent = (
                listening
                and now - worker.last_seen > self.heartbeat_timeout
                and now - self.away.back_at > self.heartbeat_timeout + COMEBACK_SECONDS
            )
            if gone or silent:
                self.losses.worker_lost(worker, gone=gone, silence=now - worker.last_seen)
        pending, _ = self.dispatcher.counts()  # after the lost workers' calls were queued again
        for job in ended:
            started = any((job.id, t) in live.tasks_seen for t in range(1, job.tasks + 1))
            if not started and not job.cancelled and pending:
                self.losses.never_started(job.id)

    def _listening(self, live: Liveness, now: float) -> bool:
        """Whether the endpoint heard workers lately, so that their silence is theirs; a pause it
        noticed (this process suspended while this thread was anywhere) counts as an absence."""
        if live.heard.pauses > self._pauses_seen:
            self._pauses_seen = live.heard.pauses
            self.away.came_back(live.heard.last_pause)
        return live.heard.listening(now)

    def _take_answer(self, states: JobStates, now: float, live: Liveness) -> tuple[list[Job], list[Job]]:
        """Take the scheduler's answer into the book: (the jobs that ended, now off the book; the
        jobs whose error state lasted past a second look)."""
        ended: list[Job] = []
        errored: list[Job] = []
        with self.book.lock:
            for job in list(self.jobs.values()):
                self._look(job, states.get(job.id, {}), now, live)
                if not job.alive:
                    del self.jobs[job.id]
                    ended.append(job)
                elif job.errored_since is not None and now - job.errored_since >= SECOND_LOOK_SECONDS:
                    errored.append(job)
        return ended, errored
