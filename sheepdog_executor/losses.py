"""What became of ended tasks: the calls of a lost worker retried or failed, a job whose workers
never started, a job held in an error state; each failure worded with the task's accounting and
stderr (gathered by ``Diagnosis`` on its own thread)."""

from __future__ import annotations

import functools
import logging
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sheepdog_executor.away import AwayClock
from sheepdog_executor.diagnosis import LATE_SECONDS, Diagnosis
from sheepdog_executor.dispatch import Dispatcher, WorkItem
from sheepdog_executor.errors import WorkerError, WorkerLost, WorkerStartFailed
from sheepdog_executor.jobscript import WorkerLaunch, setup_failure, worker_exit_status
from sheepdog_executor.scheduler.base import Scheduler
from sheepdog_executor.workers import WorkerSeen

if TYPE_CHECKING:
    from sheepdog_executor.resourcesets import SetView

log = logging.getLogger("sheepdog_executor")


class Losses:
    """Settles the calls of workers and jobs the job manager found gone."""

    def __init__(
        self,
        scheduler: Scheduler,
        dispatcher: Dispatcher | SetView,
        launch: WorkerLaunch,
        away: AwayClock,
        disconnect_tolerance: float,
        clock: Callable[[], float],
    ) -> None:
        self.scheduler = scheduler
        self.dispatcher = dispatcher
        self.launch = launch
        self.away = away
        self.disconnect_tolerance = disconnect_tolerance
        #: Gathers lost tasks' stderr and accounting on a thread of its own (joined in ``stop``).
        self.diagnosis = Diagnosis(
            scheduler,
            launch,
            lambda items: dispatcher.retry_or_split(items)[1],
            dispatcher.fail_items,
            clock,
            escalate=lambda items, kind: dispatcher.escalate(items, kind) if dispatcher.escalate else items,
        )

    def worker_lost(self, worker: WorkerSeen, *, gone: bool, silence: float) -> None:
        """``worker`` is lost: its task ended (``gone``) or it was silent for ``silence`` seconds
        (its task is removed: it must not report late); retry or fail its calls."""
        why = "its task ended without reporting" if gone else f"no heartbeat for {silence:.0f} s"
        if self.away.last_absence > self.disconnect_tolerance:
            why += (
                f"; this client was unreachable for {self.away.last_absence:.0f} s, longer than "
                f"disconnect_tolerance ({self.disconnect_tolerance:.0f} s), so its workers gave up"
            )
        items = self.dispatcher.take_lost(worker.id)
        if not gone:  # hung or cut off: free its slot, it must not report late
            self.scheduler.cancel_task(worker.job, worker.task)
        if items:
            self.diagnose_later(
                items,
                worker.job,
                worker.task,
                retry=True,
                unless_killed=gone,
                make=self._lost(worker.host, why, ended=gone),
            )

    def never_started(self, job_id: str) -> None:
        """A job ended without any of its workers reaching us: its pending calls fail."""
        self.diagnose_later(self.dispatcher.take_pending(), job_id, 1, retry=False, make=self._start_failed)

    def errored(self, job_id: str) -> None:
        """The scheduler holds ``job_id`` where it can never run: remove it, fail the pending calls."""
        reason = self.scheduler.error_reason(job_id)
        log.warning("job %s is in an error state (%s); removing it", job_id, reason)
        self.scheduler.cancel([job_id])
        items = self.dispatcher.take_pending()
        if items:
            self.dispatcher.fail_items(
                items,
                self._error(
                    WorkerStartFailed,
                    f"{self.scheduler.name} holds the job in an error state, so its tasks can never "
                    f"start: {reason}; "
                    "check the job options (" + ", ".join(self.scheduler.option_names()) + ")",
                )(job_id=job_id),
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

    def _error(self, kind: type[WorkerError], message: str) -> Callable[..., WorkerError]:
        """A maker of ``kind`` errors worded for this scheduler (its name, its accounting fields)."""
        return functools.partial(
            kind, message, scheduler=self.scheduler.name, summary_keys=self.scheduler.summary_keys
        )

    def diagnose_later(
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
        task over a limit (time, memory), which the call would only hit again, unless the task's
        time ran out under a call it started late (``ran_out_under``: run again, retries or not)."""
        late = any(item.head_start > LATE_SECONDS for item in items)
        escalates = bool(self.dispatcher.escalate)
        judge_later = retry and unless_killed and (self.dispatcher.retries > 0 or late or escalates)
        failed = self.dispatcher.retry_or_split(items)[1] if retry and not judge_later else items
        if failed:
            self.diagnosis.add(failed, job_id, task_id, make, judge_later)
