"""JobManager's scaling and reconciling against a fake scheduler with scripted states and a clock
the test moves: fast, and each case exact (the cell tests cover the real schedulers)."""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future
from typing import Any

import pytest

from sheepdog_executor.away import Hearing
from sheepdog_executor.callfuture import CallFuture
from sheepdog_executor.clock import awake_or_asleep
from sheepdog_executor.dispatch import Dispatcher
from sheepdog_executor.errors import ConnectionFailed, WorkerLost, WorkerStartFailed
from sheepdog_executor.jobs import COMEBACK_SECONDS, CURRENT_HEARTBEATS, SECOND_LOOK_SECONDS, JobManager
from sheepdog_executor.jobscript import JobOptions, WorkerLaunch
from sheepdog_executor.scheduler.base import JobStates, Scheduler, SessionJob, TaskState
from sheepdog_executor.scheduler.gridengine import parse_qstat_xml
from sheepdog_executor.scheduler.slurm import parse_squeue, task_state
from sheepdog_executor.shell import LocalShell
from sheepdog_executor.sitelimits import SiteLimits

LAUNCH = WorkerLaunch("/home/u/.sheepdog-executor/s1", "http://127.0.0.1:1")


class FakeScheduler(Scheduler):
    """Jobs are numbers; the test sets each task's state in ``states`` and reads what was done."""

    name = "Fake Engine"
    summary_keys = ("exit",)

    def __init__(self, max_array: int | None = None) -> None:
        super().__init__(LocalShell(), JobOptions())
        self.max_array = max_array
        self.states: JobStates = {}
        self.submitted: list[tuple[str, int]] = []
        self.cancelled: list[str] = []
        self.cancelled_tasks: list[tuple[str, int]] = []
        self.cut_off = 0  # this many next submits drop the connection ...
        self.cut_off_after_taking = False  # ... after the scheduler took the job, or before
        self.reason = "queue gone"
        self.over_limit = False  # the accounting of a task that ended says: killed over its limit
        self._next = 100

    def submit(self, launch: WorkerLaunch, tasks: int) -> str:
        self._next += 1
        job = str(self._next)
        if self.cut_off and not self.cut_off_after_taking:
            self.cut_off -= 1
            raise ConnectionFailed("connection dropped")
        self.states[job] = {t: TaskState.QUEUED for t in range(1, tasks + 1)}
        self.submitted.append((job, tasks))
        if self.cut_off:
            self.cut_off -= 1
            raise ConnectionFailed("connection dropped")
        return job

    def poll(self, job_ids: Collection[str]) -> JobStates:
        return {j: dict(self.states[j]) for j in job_ids if self.states.get(j)}

    def cancel(self, job_ids: Collection[str]) -> None:
        for job in job_ids:
            self.cancelled.append(job)
            self.states.pop(job, None)

    def cancel_task(self, job_id: str, task_id: int) -> None:
        self.cancelled_tasks.append((job_id, task_id))
        self.states.get(job_id, {}).pop(task_id, None)

    def session_jobs(self, root: str) -> list[SessionJob]:
        return [SessionJob(job, "sheepdog", "s1") for job, _ in self.submitted]

    def error_reason(self, job_id: str) -> str:
        return self.reason

    def accounting(self, job_id: str, task_id: int) -> dict[str, str]:
        return {"exit": "137", "other": "x", **({"limit": "time"} if self.over_limit else {})}

    def killed_for(self, accounting: Mapping[str, str]) -> str:
        return "killed over its time limit" if accounting.get("limit") == "time" else ""

    def limit_hit(self, accounting: Mapping[str, str]) -> str:
        return accounting.get("limit", "")

    def output_tail(self, launch: WorkerLaunch, job_id: str, task_id: int, limit: int = 3000) -> str:
        return "Killed\n"

    def max_array_size(self) -> int | None:
        return self.max_array

    def run_all(self, job: str) -> None:
        self.states[job] = {t: TaskState.RUNNING for t in self.states[job]}


class Clock:
    def __init__(self) -> None:
        self.now = awake_or_asleep()  # the dispatcher's clock: workers' last_seen

    def __call__(self) -> float:
        return self.now


class Rig:
    """A dispatcher with calls, a fake scheduler and a JobManager driven step by step."""

    def __init__(
        self,
        calls: int,
        *,
        max_workers: int = 4,
        max_array: int | None = None,
        limits: Future[SiteLimits] | None = None,
        retries: int = 0,
        scheduler: FakeScheduler | None = None,
    ) -> None:
        self.scheduler = scheduler or FakeScheduler(max_array)
        self.dispatcher = Dispatcher(retries=retries, idle_timeout=60, python=(3, 11))
        self.clock = Clock()
        self.manager = JobManager(
            self.scheduler,
            self.dispatcher,
            LAUNCH,
            max_workers=max_workers,
            batch_window=0,
            poll_interval=2.0,
            heartbeat_timeout=60.0,
            clock=self.clock,
            limits=limits,
        )
        self.futures: list[Future[Any]] = [CallFuture() for _ in range(calls)]
        self.dispatcher.add(abs, [((-1,), {})] * calls, self.futures, 1, "abs")

    def step(self, advance: float = 2.0) -> None:
        """One turn of the job manager's thread, ``advance`` seconds after the last."""
        self.clock.now += advance
        self.manager._step()

    def second_look(self) -> None:
        """The turn that believes what the last one saw missing: late enough for a second look, and
        for the heartbeats of a worker that died with its task to be out of date."""
        self.step(advance=max(SECOND_LOOK_SECONDS, CURRENT_HEARTBEATS * self.dispatcher.heartbeat) + 1)

    def hello(self, job: str, task: int) -> str:
        worker = f"{job}.{task}.1"
        reply = self.dispatcher.hello({"worker": worker, "job": job, "task": task, "python": [3, 11, 0]})
        assert "error" not in reply
        return worker


def test_submits_what_is_pending_up_to_max_workers_once() -> None:
    rig = Rig(10, max_workers=4)
    rig.step()
    rig.step()  # the job is queued: its tasks count as capacity, nothing more is submitted
    assert rig.scheduler.submitted == [("101", 4)]


def test_arrays_are_split_at_the_sites_limit() -> None:
    rig = Rig(7, max_workers=8, max_array=3)
    rig.step()
    assert [tasks for _, tasks in rig.scheduler.submitted] == [3, 3, 1]
    assert rig.manager.submitted_jobs == ["101", "102", "103"]


def test_the_sites_limit_asked_during_the_set_up_is_used_and_a_failed_answer_asked_again() -> None:
    early: Future[SiteLimits] = Future()
    early.set_result(SiteLimits(2))  # the answer that came during the set-up; the scheduler now says 3
    rig = Rig(5, max_workers=8, max_array=3, limits=early)
    rig.step()
    assert [tasks for _, tasks in rig.scheduler.submitted] == [2, 2, 1]
    failed: Future[SiteLimits] = Future()
    failed.set_exception(ConnectionFailed("dropped during the set-up"))
    rig = Rig(5, max_workers=8, max_array=3, limits=failed)
    rig.step()
    assert [tasks for _, tasks in rig.scheduler.submitted] == [3, 2]


def test_a_job_in_error_state_fails_its_calls_with_the_schedulers_reason() -> None:
    rig = Rig(2)
    rig.step()
    rig.scheduler.states["101"][1] = TaskState.ERROR
    rig.scheduler.reason = "can't chdir to /nope"
    rig.step()
    assert not rig.futures[0].done()  # seen once: not believed yet
    rig.second_look()
    with pytest.raises(WorkerStartFailed) as caught:
        rig.futures[0].result(timeout=5)
    message = str(caught.value)
    assert "Fake Engine holds the job in an error state" in message and "can't chdir to /nope" in message
    assert "working_directory=" in message and "Fake Engine job 101" in message
    assert rig.scheduler.cancelled == ["101"]
    assert rig.futures[1].exception(timeout=5) is not None


def test_a_job_that_ends_without_any_worker_fails_the_pending_calls() -> None:
    rig = Rig(2)
    rig.step()
    del rig.scheduler.states["101"]  # ended, and no task ever said hello
    rig.step()
    rig.second_look()
    error = rig.futures[0].exception(timeout=10)
    assert isinstance(error, WorkerStartFailed)
    assert error.job_id == "101" and error.accounting["exit"] == "137" and "exit=137" in str(error)
    assert "other=" not in str(error)  # only the scheduler's summary keys are shown
    assert rig.scheduler.submitted == [("101", 2)]  # and no new job for calls that cannot start


def test_a_cut_off_submission_that_was_taken_is_adopted_not_repeated() -> None:
    rig = Rig(3)
    rig.scheduler.cut_off, rig.scheduler.cut_off_after_taking = 1, True
    rig.step()
    rig.step()
    assert rig.scheduler.submitted == [("101", 3)]
    assert rig.manager.submitted_jobs == ["101"]


def test_a_cut_off_submission_that_was_not_taken_is_tried_again() -> None:
    rig = Rig(3)
    rig.scheduler.cut_off = 1
    rig.step()
    assert rig.manager.submitted_jobs == []
    rig.step()
    assert rig.scheduler.submitted == [("102", 3)] and rig.manager.submitted_jobs == ["102"]


def test_queued_jobs_nobody_needs_are_removed() -> None:
    rig = Rig(1, max_workers=4)
    rig.step()
    assert rig.scheduler.submitted == [("101", 1)]
    rig.futures[0].cancel()
    rig.step()
    assert rig.scheduler.cancelled == ["101"]


def test_a_task_that_ends_under_its_worker_loses_its_call() -> None:
    rig = Rig(1)
    rig.step()
    rig.scheduler.run_all("101")
    worker = rig.hello("101", 1)
    reply = rig.dispatcher.exchange(worker, [])
    assert reply is not None and len(reply["items"]) == 1
    rig.step()
    del rig.scheduler.states["101"][1]  # killed: the scheduler no longer lists the task
    rig.step()
    rig.second_look()
    error = rig.futures[0].exception(timeout=10)
    assert isinstance(error, WorkerLost) and "its task ended without reporting" in str(error)
    assert error.task_id == 1 and rig.scheduler.cancelled_tasks == []


@pytest.mark.parametrize("over_limit", [False, True])
def test_a_lost_call_is_retried_unless_its_task_was_killed_over_a_limit(over_limit: bool) -> None:
    rig = Rig(1, retries=1)
    rig.scheduler.over_limit = over_limit
    rig.step()
    rig.scheduler.run_all("101")
    rig.dispatcher.exchange(rig.hello("101", 1), [])
    rig.step()
    del rig.scheduler.states["101"][1]  # the task ended; its accounting says why
    rig.step()
    rig.second_look()
    if over_limit:  # it would only be killed again: no retry, the error says the limit
        error = rig.futures[0].exception(timeout=10)
        assert isinstance(error, WorkerLost) and "lost: killed over its time limit" in str(error)
        assert rig.dispatcher.counts() == (0, 0)
    else:  # queued again (once the accounting was read, off the manager's thread)
        deadline = time.monotonic() + 10
        while rig.dispatcher.counts() != (1, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rig.dispatcher.counts() == (1, 0) and not rig.futures[0].done()


@pytest.mark.parametrize("started_late", [False, True])
def test_a_call_the_tasks_time_ran_out_under_runs_again_without_using_a_retry(started_late: bool) -> None:
    """A task killed over its time limit: the call it started late (after others ran) is queued
    again for a new task, retries=0 or not; the call it started first was over the limit alone."""
    rig = Rig(1, retries=0)
    rig.scheduler.over_limit = True
    rig.step()
    rig.scheduler.run_all("101")
    rig.dispatcher.exchange(rig.hello("101", 1), [])
    if started_late:
        (item,) = rig.dispatcher._items.values()
        item.head_start = 30.0  # handed out 30 s after the worker first asked for calls
    rig.step()
    del rig.scheduler.states["101"][1]  # the task ended; its accounting says: over its time limit
    rig.step()
    rig.second_look()
    if started_late:
        deadline = time.monotonic() + 10
        while rig.dispatcher.counts() != (1, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rig.dispatcher.counts() == (1, 0) and not rig.futures[0].done()
        rig.step()
        assert [tasks for _, tasks in rig.scheduler.submitted] == [1, 1]  # a fresh task for it
    else:
        error = rig.futures[0].exception(timeout=10)
        assert isinstance(error, WorkerLost) and "lost: killed over its time limit" in str(error)


def test_a_retiring_worker_hands_back_its_calls_and_a_fresh_task_takes_them() -> None:
    """A worker whose task's time would end under its next call retires: the calls it did not run
    are queued again (no retry used, no error), it is told to stop, and a new task is submitted."""
    rig = Rig(2, max_workers=1, retries=0)
    rig.step()
    rig.scheduler.run_all("101")
    worker = rig.hello("101", 1)
    reply = rig.dispatcher.exchange(worker, [], request=1)
    assert reply is not None and len(reply["items"]) == 1
    assert rig.dispatcher.exchange(worker, [], request=2, retire=True) == {"stop": True}
    assert rig.dispatcher.counts() == (2, 0) and worker not in rig.dispatcher.workers
    del rig.scheduler.states["101"]  # the worker exited; its task ended
    rig.step()
    rig.second_look()
    assert [tasks for _, tasks in rig.scheduler.submitted] == [1, 1]
    assert not any(future.done() for future in rig.futures)
    worker = rig.hello("102", 1)
    (sent,) = rig.dispatcher.exchange(worker, [], request=1)["items"]  # type: ignore[index]
    assert sent[1] == 2  # its second hand-out: attempt 2, of which one used up no retry


def test_lost_tasks_are_diagnosed_on_one_thread_that_stop_joins() -> None:
    """One thread waits for the accounting of every lost task (not one thread each), and the job
    manager's stop ends it: the calls fail with what is known, and no thread is left behind."""
    rig = Rig(3)
    rig.scheduler.accounting = lambda job_id, task_id: {}  # type: ignore[method-assign]  # never written
    before = set(threading.enumerate())
    rig.step()
    rig.scheduler.run_all("101")
    for task in (1, 2, 3):
        rig.dispatcher.exchange(rig.hello("101", task), [])
    rig.step(advance=61.0)  # three silent workers: lost
    diagnosing = [t for t in set(threading.enumerate()) - before if t.name == "sheepdog-diagnose"]
    assert len(diagnosing) == 1
    rig.manager.stop(grace=0, timeout=5)
    assert not diagnosing[0].is_alive()
    errors = [future.exception(timeout=0) for future in rig.futures]
    assert all(isinstance(error, WorkerLost) and "no heartbeat for" in str(error) for error in errors)


def test_a_silent_worker_is_lost_and_its_task_removed() -> None:
    rig = Rig(1)
    rig.step()
    rig.scheduler.run_all("101")
    worker = rig.hello("101", 1)
    rig.dispatcher.exchange(worker, [])
    rig.step(advance=61.0)  # no heartbeat for longer than heartbeat_timeout
    error = rig.futures[0].exception(timeout=10)
    assert isinstance(error, WorkerLost) and "no heartbeat for" in str(error)
    assert rig.scheduler.cancelled_tasks == [("101", 1)]


def test_the_scheduler_is_polled_once_per_interval() -> None:
    rig = Rig(1)
    polls: list[float] = []
    poll = rig.scheduler.poll
    rig.scheduler.poll = lambda ids: polls.append(rig.clock.now) or poll(ids)  # type: ignore[method-assign]
    rig.step()  # submits; no job to poll yet
    for advance in (0.5, 0.5, 1.0, 0.5, 1.5):
        rig.step(advance)
    assert polls == [rig.clock.now - 2.0, rig.clock.now]


def test_silence_is_judged_on_a_clock_that_counts_the_laptops_sleep() -> None:
    """time.monotonic stops while a laptop is suspended: after an hour asleep its workers' hour of
    silence would look like a second, and the client could not say how long it was away."""
    if hasattr(time, "CLOCK_BOOTTIME"):  # Linux
        assert abs(awake_or_asleep() - time.clock_gettime(time.CLOCK_BOOTTIME)) < 1.0
    assert inspect.signature(JobManager).parameters["clock"].default is awake_or_asleep


def test_after_a_sleep_longer_than_the_tolerance_lost_workers_say_so() -> None:
    rig = Rig(1)
    rig.manager.disconnect_tolerance = 600.0
    rig.step()
    rig.scheduler.run_all("101")
    worker = rig.hello("101", 1)
    assert rig.dispatcher.exchange(worker, []) is not None
    rig.step()
    rig.clock.now += 700.0  # asleep; meanwhile the worker gave up and its task ended
    del rig.scheduler.states["101"][1]
    rig.manager.away.check_gap(700.0 - rig.manager.poll_interval)  # what the thread's loop measures
    rig.step(advance=0.0)  # awake: the pause seen, judged with its length (on a second look)
    rig.second_look()
    error = rig.futures[0].exception(timeout=10)
    assert isinstance(error, WorkerLost), error
    assert "unreachable for 698 s" in str(error) and "disconnect_tolerance (600 s)" in str(error), str(error)


def test_a_pause_the_job_managers_loop_missed_judges_no_worker_on_its_silence() -> None:
    """SIGSTOP (a laptop's sleep) can hit while the job manager's thread submits or waits under the
    ceiling of commands, where its loop does not measure: the endpoint's loop, which hears the
    workers, notices the pause instead. Seen: after a 120 s SIGSTOP, all 8 workers declared lost."""
    rig = Rig(1)
    hearing = rig.dispatcher.registry.hearing = Hearing(rig.clock)
    rig.step()
    rig.scheduler.run_all("101")
    worker = rig.hello("101", 1)
    rig.dispatcher.exchange(worker, [])
    hearing.tick()
    rig.clock.now += 120.0  # suspended, wherever the job manager's thread was: its loop saw nothing
    rig.step(advance=0.0)  # its thread runs first: the endpoint's loop has not ticked since
    assert not rig.futures[0].done()
    hearing.tick()  # the endpoint's loop runs: a tick 120 s late
    rig.step()
    assert not rig.futures[0].done()  # the pause counts as an absence: the worker gets time to come back
    assert rig.manager.away.last_absence == pytest.approx(120.0)
    for _ in range(int((rig.manager.heartbeat_timeout + COMEBACK_SECONDS) / 10) + 2):
        rig.clock.now += 10.0
        hearing.tick()  # the endpoint listens, the worker stays silent
        rig.step(advance=0.0)
    error = rig.futures[0].exception(timeout=10)
    assert isinstance(error, WorkerLost) and "no heartbeat for" in str(error)


# -- one bad answer of the scheduler ends nothing ---------------------------------------------------
TRUNCATED_QSTAT = "<?xml version='1.0'?>\n<job_info><queue_info><job_list state=\"running\"><JB_job_nu"


class BadAnswers:
    """The scheduler's next answers, each then parsed by the real parser: "" (nothing, exit 0) or
    text; None for a real answer."""

    def __init__(self, rig: Rig, parse: Callable[[str, set[str]], JobStates]) -> None:
        self.answers: list[str | None] = []
        poll = rig.scheduler.poll

        def scripted(job_ids: Collection[str]) -> JobStates:
            answer = self.answers.pop(0) if self.answers else None
            return poll(job_ids) if answer is None else parse(answer, set(job_ids))

        rig.scheduler.poll = scripted  # type: ignore[method-assign]


def _squeue(text: str, job_ids: set[str]) -> JobStates:
    states: JobStates = {}
    for job, task, state, reason, _, _ in parse_squeue(text):
        if job in job_ids and task is not None:
            states.setdefault(job, {})[task] = task_state(state, reason)
    return states


def _running(rig: Rig, workers: int) -> list[str]:
    """``workers`` workers of job 101 that said hello and hold a call each."""
    rig.step()
    rig.scheduler.run_all("101")
    ids = [rig.hello("101", task) for task in range(1, workers + 1)]
    for worker in ids:
        assert rig.dispatcher.exchange(worker, []) is not None
    return ids


def _beat(rig: Rig, workers: list[str]) -> None:
    for worker in workers:
        rig.dispatcher.workers[worker].last_seen = rig.clock.now


@pytest.mark.parametrize(
    ("parse", "answer"),
    [
        (parse_qstat_xml, ""),  # qstat printed nothing, exit 0
        (lambda text, ids: _squeue(text, ids), ""),  # squeue printed nothing, not even its header
        (lambda text, ids: _squeue(text, ids), "ARRAY_JOB_ID|ARRAY_TASK_ID|STATE|REASON|NAME|STDOUT\n"),
        (parse_qstat_xml, "<?xml version='1.0'?>\n<job_info><queue_info/><job_info/></job_info>"),
    ],
    ids=["qstat-empty", "squeue-empty", "squeue-no-jobs", "qstat-no-jobs"],
)
def test_one_answer_without_the_jobs_fails_no_call_of_live_workers(
    parse: Callable[[str, set[str]], JobStates], answer: str
) -> None:
    """The issue's first case: one empty answer failed the calls of three live workers."""
    rig = Rig(3, max_workers=3)
    workers = _running(rig, 3)
    bad = BadAnswers(rig, parse)
    bad.answers = [answer]
    for _ in range(6):  # the bad answer, then 10 s of real ones
        _beat(rig, workers)
        rig.step()
    assert not any(f.done() for f in rig.futures)
    assert set(rig.dispatcher.workers) == set(workers) and rig.scheduler.submitted == [("101", 3)]
    assert rig.manager.jobs["101"].alive == {1: TaskState.RUNNING, 2: TaskState.RUNNING, 3: TaskState.RUNNING}


def test_a_listing_without_the_task_of_a_worker_that_beats_takes_nothing() -> None:
    """Whatever the scheduler says for however long, a worker whose heartbeat is current keeps its
    calls; once its heartbeats stop too, they are lost."""
    rig = Rig(1)
    workers = _running(rig, 1)
    del rig.scheduler.states["101"][1]
    for _ in range(15):  # 30 s without the task in the scheduler's answers
        _beat(rig, workers)
        rig.step()
    assert not rig.futures[0].done() and rig.scheduler.cancelled_tasks == []
    rig.second_look()  # no heartbeat since: gone
    assert isinstance(rig.futures[0].exception(timeout=10), WorkerLost)


@pytest.mark.parametrize(
    ("parse", "garbage"),
    [
        (parse_qstat_xml, TRUNCATED_QSTAT),
        (parse_qstat_xml, "error: commlib error: got select error (Connection refused)\n"),
        (parse_qstat_xml, "<html><body>maintenance</body></html>"),
        (lambda text, ids: _squeue(text, ids), "slurm_load_jobs error: Socket timed out\n"),
        (
            lambda text, ids: _squeue(text, ids),
            "ARRAY_JOB_ID|ARRAY_TASK_ID|STATE|REASON|NAME|STDOUT\n10\x00\x00garbage|x\n",
        ),
    ],
    ids=["qstat-truncated", "qstat-text", "qstat-other-xml", "squeue-text", "squeue-bad-line"],
)
def test_answers_that_do_not_parse_are_failed_polls_counted_and_warned_once(
    parse: Callable[[str, set[str]], JobStates], garbage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's second and third cases: 20 s of garbage failed 53 of 150 calls; malformed
    ``qstat -xml`` crashed the job manager (BrokenClusterExecutor). Now the last view stays."""
    rig = Rig(3, max_workers=3)
    workers = _running(rig, 3)
    bad = BadAnswers(rig, parse)
    bad.answers = [garbage] * 10  # 20 s of it
    with caplog.at_level("DEBUG", logger="sheepdog_executor"):
        for _ in range(13):
            _beat(rig, workers)
            rig.step()
    assert not any(f.done() for f in rig.futures) and rig.dispatcher.broken is None
    assert rig.manager.polls.snapshot()["failed"] == 10 and rig.manager.polls.answered >= 1
    assert " printed " in rig.manager.polls.last_failure
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len([w for w in warnings if "could not read Fake Engine's answer" in w]) == 1, warnings
    assert rig.scheduler.submitted == [("101", 3)]


def test_silent_workers_are_still_found_while_the_polls_fail() -> None:
    rig = Rig(1)
    _running(rig, 1)
    bad = BadAnswers(rig, parse_qstat_xml)
    bad.answers = ["garbage"] * 40
    rig.step(advance=61.0)  # no heartbeat for longer than heartbeat_timeout, and no answer to read
    assert isinstance(rig.futures[0].exception(timeout=10), WorkerLost)


def test_polls_that_fail_for_longer_than_the_cluster_may_be_unreachable_break_the_executor() -> None:
    rig = Rig(1)
    rig.manager.disconnect_tolerance = 10.0
    _running(rig, 1)
    bad = BadAnswers(rig, parse_qstat_xml)
    bad.answers = ["garbage"] * 40
    for _ in range(10):
        rig.step()  # 18 s of failed polls: not yet
        _beat(rig, list(rig.dispatcher.workers))
    assert rig.dispatcher.broken is None
    rig.step(advance=3.0)
    error = rig.futures[0].exception(timeout=10)
    assert "could not be read" in str(error) and "disconnect_tolerance" in str(error), error


def test_a_job_missing_from_one_answer_is_not_forgotten_and_no_job_is_submitted_for_it() -> None:
    rig = Rig(4, max_workers=4)
    rig.step()  # job 101 queued, nobody said hello yet
    bad = BadAnswers(rig, parse_qstat_xml)
    bad.answers = ["<job_info><queue_info/><job_info/></job_info>"]
    rig.step()
    rig.step()
    assert "101" in rig.manager.jobs and rig.scheduler.submitted == [("101", 4)]
    assert not any(f.done() for f in rig.futures)
