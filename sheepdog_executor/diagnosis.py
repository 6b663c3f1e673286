"""Why a worker's calls were lost: one thread that gathers each lost task's stderr and accounting
(which can take seconds to appear) from a deadline queue, then retries or fails its calls."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sheepdog_executor.clock import awake_or_asleep
from sheepdog_executor.dispatch import WorkItem
from sheepdog_executor.errors import WorkerError
from sheepdog_executor.escalation import tried
from sheepdog_executor.jobscript import WORKER_DEATH_TAIL, WorkerLaunch
from sheepdog_executor.scheduler.base import Scheduler
from sheepdog_executor.tracebacks import restore_source

log = logging.getLogger("sheepdog_executor")

#: How long the scheduler's accounting of a lost task is waited for, and how often it is asked.
ACCOUNTING_WAIT_SECONDS = 20.0
ACCOUNTING_ASK_SECONDS = 2.0
#: A call handed out more than this many seconds after its worker first asked for calls did not
#: have its task's whole time: killed by the task's time limit, it runs again in a new task without
#: using up a retry (at most ``FREE_RERUNS`` times), and is not reported as over the limit.
LATE_SECONDS = 2.0
FREE_RERUNS = 3


def ran_out_under(item: WorkItem) -> bool:
    """Whether a call lost with a task killed over its time limit was the task's time running out
    under it (it started late in the task), not the call alone being longer than the limit."""
    return item.head_start > LATE_SECONDS and len(item.losses) <= FREE_RERUNS


@dataclass
class Case:
    """The calls of one lost task, waiting for what the scheduler says about it."""

    items: list[WorkItem]
    job_id: str
    task_id: int
    make: Callable[..., WorkerError]
    #: Retry the calls only once the accounting shows the scheduler did not kill the task.
    judge_later: bool
    deadline: float
    tail: str | None = None
    record: dict[str, str] = field(default_factory=dict)


class Diagnosis:
    """One thread and a queue of cases by the time each is next looked at; ``stop`` joins it."""

    def __init__(
        self,
        scheduler: Scheduler,
        launch: WorkerLaunch,
        retry: Callable[[list[WorkItem]], list[WorkItem]],
        fail: Callable[[list[WorkItem], BaseException], None],
        clock: Callable[[], float] = awake_or_asleep,
        escalate: Callable[[list[WorkItem], str], list[WorkItem]] = lambda items, kind: items,
    ) -> None:
        self.scheduler, self.launch, self.clock = scheduler, launch, clock
        #: Run calls killed over a limit again with more (escalation.py); returns those it cannot.
        self._escalate = escalate
        #: Queue again what has retries left; return the calls out of retries.
        self._retry = retry
        self._fail = fail
        self._queue: list[tuple[float, int, Case]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sheepdog-diagnose", daemon=True)

    def add(
        self,
        items: list[WorkItem],
        job_id: str,
        task_id: int,
        make: Callable[..., WorkerError],
        judge_later: bool,
    ) -> None:
        """Diagnose these lost calls of a task: fail them with ``make(...)`` of its accounting and
        stderr, or with ``judge_later``, retry them unless the scheduler killed the task."""
        case = Case(items, job_id, task_id, make, judge_later, self.clock() + ACCOUNTING_WAIT_SECONDS)
        with self._changed:
            if not self._stopping:
                heapq.heappush(self._queue, (time.monotonic(), next(self._order), case))
                self._changed.notify_all()
                if self._thread.ident is None:  # started by the first lost task
                    self._thread.start()
                return
        self._judge(case)  # stopped: on what is known

    def stop(self, timeout: float = 60.0) -> None:
        """Diagnose what is queued without waiting for more accounting, then end the thread."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=timeout)

    def _put(self, due: float, case: Case) -> None:
        with self._changed:
            heapq.heappush(self._queue, (due, next(self._order), case))
            self._changed.notify_all()

    def _next(self) -> Case | None:
        """The next case that is due (waiting until one is); None once stopping and all are done."""
        with self._changed:
            while True:
                if self._queue and (self._stopping or self._queue[0][0] <= time.monotonic()):
                    return heapq.heappop(self._queue)[2]
                if self._stopping:
                    return None
                self._changed.wait(self._queue[0][0] - time.monotonic() if self._queue else None)

    def _run(self) -> None:
        while (case := self._next()) is not None:
            try:
                if self._look(case):
                    self._put(time.monotonic() + ACCOUNTING_ASK_SECONDS, case)
                else:
                    self._judge(case)
            except Exception:  # noqa: BLE001 - a bug here must not strand the other cases' calls
                log.exception(
                    "diagnosing the lost calls of job %s, task %s failed", case.job_id, case.task_id
                )
                self._fail(case.items, self._error(case))

    def _look(self, case: Case) -> bool:
        """Read the task's stderr (once) and ask its accounting; True to ask again later."""
        try:
            if case.tail is None:
                # a crash's faulthandler traceback names <dynamic-code> for functions shipped by value
                case.tail = ""
                tail = self.scheduler.output_tail(self.launch, case.job_id, case.task_id, WORKER_DEATH_TAIL)
                case.tail = restore_source(tail)
            if not self._stopping:
                case.record = self.scheduler.accounting(case.job_id, case.task_id)
        except Exception as exc:  # noqa: BLE001 - the calls fail anyway, with what we know
            case.tail = case.tail or f"(could not read the task's stderr: {exc})"
            return False
        return not case.record and self.clock() < case.deadline and not self._stopping

    def _judge(self, case: Case) -> None:
        lost = case.items
        if case.judge_later:
            killed = self.scheduler.killed_for(case.record)
            if self.scheduler.limit_hit(case.record) == "time":
                late = [item for item in lost if ran_out_under(item)]
                if late:
                    log.info(
                        "the time of job %s, task %s ran out under %d call(s) it started late; running "
                        "them again in a new task",
                        case.job_id,
                        case.task_id,
                        len(late),
                    )
                    for item in late:
                        item.undelivered += 1  # a run cut short by its task's time uses up no retry
                    lost = [item for item in lost if item not in late] + self._retry(late)
            if not lost:
                return
            if killed:
                lost = self._escalate(lost, self.scheduler.killed_over(case.record))
                if lost:
                    log.warning(
                        "not running again the calls of job %s, task %s: %s",
                        case.job_id,
                        case.task_id,
                        killed,
                    )
            else:
                lost = self._retry(lost)
        if lost:
            self._fail(lost, self._error(case))

    def _error(self, case: Case) -> WorkerError:
        details: dict[str, Any] = {"job_id": case.job_id, "task_id": case.task_id, "accounting": case.record}
        item = case.items[0] if case.items else None
        said: list[str] = []
        if item is not None and item.history and item.queue is not None:  # escalated in vain
            kind = self.scheduler.killed_over(case.record)
            said.append(tried((*item.history, item.queue.needs), kind) if kind else "")
        if item is not None and item.bound:  # and the site lets it ask for no more
            said.append(item.bound)
        if any(said):
            details["tried"] = "; ".join(filter(None, said))
        return case.make(**details, stderr_tail=case.tail or "")
