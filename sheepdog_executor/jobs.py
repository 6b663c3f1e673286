"""The job manager: the one thread that owns the cluster side of an executor.

It submits array jobs when calls wait and workers are short (after a short batching window), polls
the scheduler for all of the executor's jobs in one call, notices workers that died or never
started, and removes tasks that are no longer needed.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sheepdog_executor.clock import awake_or_asleep
from sheepdog_executor.diagnosis import Diagnosis
from sheepdog_executor.dispatch import Dispatcher, Liveness, WorkItem
from sheepdog_executor.errors import (
    BrokenClusterExecutor,
    ConnectionFailed,
    PollFailed,
    SchedulerError,
    WorkerError,
    WorkerLost,
    WorkerStartFailed,
)
from sheepdog_executor.jobscript import WorkerLaunch, setup_failure, worker_exit_status
from sheepdog_executor.scheduler.base import JobStates, Scheduler, TaskState

if TYPE_CHECKING:
    from sheepdog_executor.resourcesets import SetView

log = logging.getLogger("sheepdog_executor")

#: A gap this much longer than expected in the job manager's own loop means this process was
#: suspended (SIGSTOP, a laptop's sleep) or starved: workers are not judged on the silence it caused.
PAUSE_SECONDS = 15.0
#: A task (or job) missing from the scheduler's answer is believed gone only when it is still missing
#: from an answer this many seconds later (a second look), and an error state only when it is still
#: there then: one wrong answer (an empty listing, a scheduler that restarts) must end nothing.
SECOND_LOOK_SECONDS = 5.0
#: A worker heard from within this many heartbeat intervals is alive, whatever the scheduler says.
CURRENT_HEARTBEATS = 3
#: After this client was away, workers get this long on top of heartbeat_timeout to reach it again
#: (a request stuck on a dead route times out first).
COMEBACK_SECONDS = 60.0


class AwayClock:
    """When this client was last away from the cluster (offline or suspended), and for how long.

    Kept by the job manager's thread: it counts the time its SSH commands failed, and gaps in its
    own loop that only a suspended process (SIGSTOP, a sleeping laptop) shows.
    """

    def __init__(self, clock: Callable[[], float] = awake_or_asleep) -> None:
        self._clock = clock
        #: When the client was last back; workers' silence before that is not theirs.
        self.back_at = 0.0
        #: How long the last absence lasted (seconds).
        self.last_absence = 0.0
        self._since: float | None = None

    def unreachable(self, why: str, since: float) -> float:
        """An SSH command that started at ``since`` failed; return for how long the cluster has
        been unreachable."""
        now = self._clock()
        if self._since is None:
            self._since = since
            log.warning("the cluster is unreachable (%s); waiting for it to come back", why)
        return now - self._since

    def reached(self) -> None:
        if self._since is not None:
            self.came_back(self._clock() - self._since)
            self._since = None

    def check_gap(self, excess: float) -> bool:
        """``excess``: how much longer than expected something took. True when it was a pause."""
        if excess < PAUSE_SECONDS:
            return False
        self.came_back(excess)
        return True

    def mark_back(self) -> None:
        """A way back was re-made (SSH, tunnel): the workers need time to find it."""
        self.back_at = self._clock()

    def came_back(self, absence: float) -> None:
        self.back_at = self._clock()
        self.last_absence = absence
        log.warning("this client was away from the cluster for %.0f s; back now", absence)


@dataclass(eq=False)
class Job:
    """An array job this executor submitted."""

    id: str
    tasks: int
    cancelled: bool = False
    alive: dict[int, TaskState] = field(default_factory=dict)
    #: Tasks in ``alive`` that the scheduler's last answers did not list: since when.
    missing: dict[int, float] = field(default_factory=dict)
    #: Since when the scheduler's answers show the job in an error state (None: they do not).
    errored_since: float | None = None


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
        array_limit: Future[int | None] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.dispatcher = dispatcher
        self.launch = launch
        self.max_workers = max_workers
        self.batch_window = batch_window
        self.poll_interval = poll_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.disconnect_tolerance = disconnect_tolerance
        self.away = AwayClock(clock)
        self.clock = clock
        self.jobs: dict[str, Job] = {}
        self.submitted_jobs: list[str] = []
        self._jobs_lock = threading.Lock()
        self._wake = threading.Event()
        self._flush = False
        self._stopping = False
        self._failures = 0
        self.polls = PollCounts()
        self._last_poll = -float("inf")
        self._max_array: int | None = None
        self._array_limit_known = False
        #: The scheduler's answer to ``max_array_size``, asked early (during the set-up), if it was.
        self._early_array_limit = array_limit
        self._thread = threading.Thread(target=self._run, name="sheepdog-jobs", daemon=True)
        #: Gathers lost tasks' stderr and accounting on a thread of its own (joined in ``stop``).
        self.diagnosis = Diagnosis(
            scheduler,
            launch,
            lambda items: dispatcher.retry_or_split(items)[1],
            dispatcher.fail_items,
            clock,
            escalate=lambda items, kind: dispatcher.escalate(items, kind) if dispatcher.escalate else items,
        )

    # -- control from other threads --------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def wake(self, flush: bool = False) -> None:
        """Something changed; with ``flush``, submit without waiting for the batching window."""
        if flush:
            self._flush = True
        self._wake.set()

    def stop(self, grace: float = 5.0, timeout: float = 20.0) -> None:
        """Stop the thread, give idle workers ``grace`` seconds to exit by themselves, remove
        every job still on the cluster and wait (up to ``timeout``) until the scheduler dropped them."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)
        self.diagnosis.stop()
        if grace > 0:
            self._cancel_queued()  # nothing is outstanding: a queued task would start only to stop
            self._wait_gone(grace, warn=False)  # what is left now is removed next
        self.cancel_all()
        self._wait_gone(timeout)

    def _wait_gone(self, timeout: float, warn: bool = True) -> None:
        """Wait until the scheduler lists none of the jobs (a failed poll: ask again); the jobs stay
        on the books, for ``cancel_all`` (an answer that wrongly omits a job must not spare it)."""
        deadline = self.clock() + timeout
        with self._jobs_lock:
            job_ids = list(self.jobs)
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
            time.sleep(0.2)

    def _cancel_queued(self) -> None:
        """Remove the tasks that have not started yet (whole jobs when none of theirs started)."""
        with self._jobs_lock:
            job_ids = list(self.jobs)
        try:
            states = self.scheduler.poll(job_ids) if job_ids else {}
        except PollFailed as exc:  # cancel_all() removes them all next
            log.debug("polling for queued tasks: %s", exc)
            return
        whole = [job for job, tasks in states.items() if all(s is TaskState.QUEUED for s in tasks.values())]
        if whole:
            self.scheduler.cancel(whole)
        for job, tasks in states.items():
            if job not in whole:
                for task in (t for t, s in tasks.items() if s is TaskState.QUEUED):
                    self.scheduler.cancel_task(job, task)

    def cancel_all(self) -> None:
        with self._jobs_lock:
            live = [job.id for job in self.jobs.values()]
            for job in self.jobs.values():
                job.cancelled = True
        if live:
            log.debug("removing jobs %s", live)
            self.scheduler.cancel(live)

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
            with self._jobs_lock:
                job_ids = list(self.jobs)
            try:
                states = self.scheduler.poll(job_ids) if job_ids else {}
            except PollFailed as exc:
                self._poll_failed(exc, now)
                if self.dispatcher.broken is not None:
                    return
                if self.clock() - now < PAUSE_SECONDS:  # else judge nobody on a pause it hid
                    self._reconcile(None)  # the last view stays; silent workers are still found
            else:
                self._poll_answered(bool(job_ids))
                # back after SSH failures (only an answer of the cluster says so): a grace period,
                # granted before anyone is judged
                if job_ids:
                    self.away.reached()
                # a poll this slow means this client was cut off (or suspended) while it waited: the
                # workers could not reach it either; judge them next round, with a grace period
                if not self.away.check_gap(self.clock() - now):
                    self._reconcile(states)
        self._scale()

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
        ended: list[Job] = []
        errored: list[Job] = []
        with self._jobs_lock:
            for job in list(self.jobs.values()):
                if states is None:
                    continue
                self._look(job, states.get(job.id, {}), now, live)
                if not job.alive:
                    del self.jobs[job.id]
                    ended.append(job)
                elif job.errored_since is not None and now - job.errored_since >= SECOND_LOOK_SECONDS:
                    errored.append(job)
        for job in errored:  # held in an error state by the scheduler: it would wait there forever
            self._fail_errored(job)
        for worker in live.workers:
            gone = worker.job in {j.id for j in ended} or (
                worker.job in self.jobs and worker.task not in self.jobs[worker.job].alive
            )
            # silence while this client itself was away (offline, suspended) says nothing of a worker
            silent = now - worker.last_seen > self.heartbeat_timeout and (
                now - self.away.back_at > self.heartbeat_timeout + COMEBACK_SECONDS
            )
            if gone or silent:
                why = (
                    "its task ended without reporting"
                    if gone
                    else f"no heartbeat for {now - worker.last_seen:.0f} s"
                )
                if self.away.last_absence > self.disconnect_tolerance:
                    why += (
                        f"; this client was unreachable for {self.away.last_absence:.0f} s, longer than "
                        f"disconnect_tolerance ({self.disconnect_tolerance:.0f} s), so its workers gave up"
                    )
                items = self.dispatcher.take_lost(worker.id)
                if silent and not gone:  # hung or cut off: free its slot, it must not report late
                    self.scheduler.cancel_task(worker.job, worker.task)
                if items:
                    self._diagnose_later(
                        items,
                        worker.job,
                        worker.task,
                        retry=True,
                        unless_killed=gone,
                        make=self._lost(worker.host, why, ended=gone),
                    )
        pending, _ = self.dispatcher.counts()  # after the lost workers' calls were queued again
        for job in ended:
            started = any((job.id, t) in live.tasks_seen for t in range(1, job.tasks + 1))
            if not started and not job.cancelled and pending:
                items = self.dispatcher.take_pending()
                self._diagnose_later(
                    items,
                    job.id,
                    1,
                    retry=False,
                    make=self._start_failed,
                )

    def _lost(self, host: str, why: str, ended: bool = True) -> Callable[..., WorkerError]:
        """A maker of the ``WorkerLost`` of a worker on ``host``: the limit its task went over when
        the scheduler's accounting says so (a Slurm ``TIMEOUT``), else ``why`` and, when its task
        ``ended`` by itself (not removed by us for its silence), how the worker ended (the signal by
        name, from its task's stderr or the accounting); then the likely cause when the accounting
        shows memory at its request."""

        def make(**details: Any) -> WorkerError:
            tried = details.pop("tried", "")  # what escalation tried: "mem=4G, then 8G: killed ..."
            record = details.get("accounting") or {}
            killed = self.scheduler.killed_for(record)
            how = self._how_it_ended(details.get("stderr_tail", ""), record) if ended else ""
            headline = "; ".join(filter(None, [tried, killed])) or "; ".join(filter(None, [why, how]))
            hint = "" if killed else self.scheduler.memory_hint(record)
            headline += f"; {hint}" if hint else ""
            return self._error(WorkerLost, f"the worker running this call on {host} was lost: {headline}")(
                **details
            )

        return make

    def _how_it_ended(self, stderr: str, accounting: dict[str, str]) -> str:
        """ "killed by signal SIGSEGV (Segmentation fault)", "its process exited with status 3", or ""."""
        status = worker_exit_status(stderr)
        number = status - 128 if status is not None and status > 128 else None
        if status is None:
            number = self.scheduler.exit_signal(accounting)
        if number is not None:
            try:
                name = signal.Signals(number).name
            except ValueError:
                name = f"signal {number}"
            return f"killed by signal {name} ({signal.strsignal(number) or 'no description'})"
        return f"its process exited with status {status}" if status else ""

    def _start_failed(self, **details: Any) -> WorkerError:
        """Why a job's workers never reached us: a set-up line the task reported, or the usual suspects."""
        failed = setup_failure(details.get("stderr_tail", ""))
        if failed is not None:
            return self._error(
                WorkerStartFailed,
                f"set-up line {failed.number} failed with exit status {failed.status}: {failed.line}\n"
                "so no worker started and no call ran; fix or remove that line (setup=)",
            )(**details)
        return self._error(
            WorkerStartFailed,
            "the job's workers ended without ever reaching this client: check the interpreter "
            "(python=), the set-up lines, and that the nodes can reach "
            f"{self.launch.url} (callback_address=)",
        )(**details)

    def _fail_errored(self, job: Job) -> None:
        reason = self.scheduler.error_reason(job.id)
        log.warning("job %s is in an error state (%s); removing it", job.id, reason)
        job.cancelled = True
        self.scheduler.cancel([job.id])
        items = self.dispatcher.take_pending()
        if items:
            self.dispatcher.fail_items(
                items,
                self._error(
                    WorkerStartFailed,
                    f"{self.scheduler.name} holds the job in an error state, so its tasks can never "
                    f"start: {reason}; "
                    "check the job options (" + ", ".join(self.scheduler.option_names()) + ")",
                )(job_id=job.id),
            )

    def _scale(self) -> None:
        """Submit a job when calls wait for workers; remove queued tasks nobody needs."""
        live = self.dispatcher.liveness()
        pending, held = live.pending, live.held
        registered = {(w.job, w.task) for w in live.workers}
        seen = live.tasks_seen
        with self._jobs_lock:
            capacity = 0
            queued: dict[str, list[int]] = {}
            for job in self.jobs.values():
                for task, state in job.alive.items():
                    # a task whose worker said hello runs, whatever the last (possibly stale) poll said
                    if state is TaskState.QUEUED and (job.id, task) not in seen:
                        queued.setdefault(job.id, []).append(task)
                        capacity += 1
                    elif (job.id, task) not in seen or (job.id, task) in registered:
                        capacity += 1
        if self.dispatcher.broken is not None or self._stopping:
            return
        wanted = min(self.max_workers, pending + held)
        if wanted > capacity and pending:
            # arrays no bigger than the site allows (Grid Engine's max_aj_tasks, Slurm's MaxArraySize)
            tasks, limit = wanted - capacity, self._array_limit()
            while tasks > 0:
                size = min(tasks, limit) if limit else tasks
                if not self._submit(size, pending):
                    return
                tasks -= size
        elif not pending and not held and queued:
            fully_queued = [j for j, tasks in queued.items() if len(tasks) == self.jobs[j].tasks]
            if fully_queued:
                log.debug("removing unneeded queued jobs %s", fully_queued)
                for job_id in fully_queued:
                    self.jobs[job_id].cancelled = True
                self.scheduler.cancel(fully_queued)

    def _submit(self, tasks: int, pending: int) -> bool:
        """Submit one array job of ``tasks`` workers; False when a dropped connection cut the
        submission off before the scheduler took it (the thread is woken to try again)."""
        try:
            job_id = self.scheduler.submit(self.launch, tasks)
        except ConnectionFailed:
            # the connection dropped during the submission: the job may exist; adopt it, never submit twice
            with self._jobs_lock:
                known = set(self.submitted_jobs)
            adopted = [j for j in self.scheduler.find_jobs(self.launch) if j not in known]
            if not adopted:
                log.warning("a submission was cut off by a dropped connection before it was taken; retrying")
                self._wake.set()
                return False
            job_id = adopted[0]
            log.warning("adopted job %s submitted before the SSH connection dropped", job_id)
        self.away.reached()
        log.info("submitted job %s with %d task(s) for %d pending call(s)", job_id, tasks, pending)
        with self._jobs_lock:
            self.jobs[job_id] = Job(job_id, tasks, alive={t: TaskState.QUEUED for t in range(1, tasks + 1)})
            self.submitted_jobs.append(job_id)
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

    def _error(self, kind: type[WorkerError], message: str) -> Callable[..., WorkerError]:
        """A maker of ``kind`` errors worded for this scheduler (its name, its accounting fields)."""
        return functools.partial(
            kind, message, scheduler=self.scheduler.name, summary_keys=self.scheduler.summary_keys
        )

    def _diagnose_later(
        self,
        items: list[WorkItem],
        job_id: str,
        task_id: int,
        *,
        retry: bool,
        unless_killed: bool = False,
        make: Callable[..., WorkerError],
    ) -> None:
        """Retry lost calls that may be, fail the others with an error that carries the task's
        accounting and stderr (gathered by ``diagnosis``: accounting can take seconds to appear).
        ``unless_killed``: retry only once the accounting shows that the scheduler did not kill the
        task over a limit (time, memory), which the call would only hit again."""
        judge_later = (
            retry and unless_killed and (self.dispatcher.retries > 0 or bool(self.dispatcher.escalate))
        )
        failed = self.dispatcher.retry_or_split(items)[1] if retry and not judge_later else items
        if not failed:
            return

        self.diagnosis.add(failed, job_id, task_id, make, judge_later)
