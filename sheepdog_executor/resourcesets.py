"""Resource sets: calls of one executor that need other resources (``ex.with_resources(mem=...)``)
go to arrays of their own, and a worker takes only calls of its own set.

Each set has its own queue (``CallBook``), its own scheduler (the executor's, with the set's
``Resources``) and its own job manager (``JobManagers``), which sees the dispatcher through
``SetView``: the calls and workers of its set only, so it submits for its own calls and judges only
its own workers. Every guarantee is the job manager's and the dispatcher's, per set: cancellation,
shutdown, retries, no orphan job.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Any, TypeVar

from sheepdog_executor.dispatch import Dispatcher, Liveness
from sheepdog_executor.resources import Resources

if TYPE_CHECKING:
    from sheepdog_executor.calls import WorkItem
    from sheepdog_executor.executor import ClusterExecutor
    from sheepdog_executor.jobs import JobManager
    from sheepdog_executor.jobscript import WorkerLaunch
    from sheepdog_executor.scheduler import Scheduler

T = TypeVar("T")


class SetView:
    """The dispatcher as the job manager of one resource set sees it: its set's calls and workers."""

    def __init__(self, dispatcher: Dispatcher, needs: Resources) -> None:
        self._dispatcher = dispatcher
        self.needs = needs
        self.retries = dispatcher.retries
        # what every set shares: lost calls, their retries and errors, a broken executor
        self.take_lost = dispatcher.take_lost
        self.retry_or_split = dispatcher.retry_or_split
        self.fail_items = dispatcher.fail_items
        self.break_ = dispatcher.break_

    @property
    def broken(self) -> BaseException | None:
        return self._dispatcher.broken

    @property
    def escalate(self) -> Callable[[list[WorkItem], str], list[WorkItem]] | None:
        return self._dispatcher.escalate

    def counts(self) -> tuple[int, int]:
        """(calls of this set waiting for a worker, calls its workers hold)."""
        live = self.liveness()
        return live.pending, live.held

    def liveness(self) -> Liveness:
        return self._dispatcher.liveness(self.needs)

    def take_pending(self) -> list[WorkItem]:
        """Take this set's calls that wait for a worker out of its queue."""
        return self._dispatcher.calls.take_waiting(self.needs)


class JobManagers:
    """A session's job managers, one per resource set: the executor's own set's (``own``, made
    last in the set-up) and the others' (``with_resources``), each made and started on first use."""

    def __init__(self) -> None:
        #: The executor's own set's: None until the set-up made it (what callbacks find until then).
        self.own: JobManager | None = None
        self._sets: dict[Resources, JobManager] = {}
        self._lock = threading.Lock()
        self._closed = False

    def start(
        self,
        make: Callable[[Scheduler, SetView, WorkerLaunch], JobManager],
        scheduler: Scheduler,
        dispatcher: Dispatcher,
        launch: WorkerLaunch,
    ) -> JobManager:
        """Make and start the executor's own set's job manager (``make(scheduler, view, launch)``,
        with ``scheduler``'s resources); those of other sets are made alike."""
        self._make = make
        self._scheduler = scheduler
        self._dispatcher = dispatcher
        self._launch = launch
        own = make(scheduler, SetView(dispatcher, scheduler.options.needs), launch)
        own.start()
        self.own = own
        return own

    def jobs_for(self, needs: Resources) -> JobManager:
        """The job manager of the calls that need ``needs`` (made and started on first use: their
        arrays ask the scheduler for ``needs``)."""
        if self.own is None:
            raise RuntimeError("the session is still being set up")
        if needs == self._scheduler.options.needs:
            return self.own
        with self._lock:
            manager = self._sets.get(needs)
            if manager is None:
                if self._closed:
                    raise RuntimeError("cannot schedule new futures after shutdown")
                view = SetView(self._dispatcher, needs)
                manager = self._make(self._scheduler.with_needs(needs), view, self._launch)
                manager.start()
                self._sets[needs] = manager
        return manager

    def close(self) -> None:
        """No set gets a job manager from now on (the session is closing)."""
        with self._lock:
            self._closed = True

    def managers(self) -> list[JobManager]:
        """Every job manager: the executor's own resource set's first (none during the set-up)."""
        with self._lock:
            return ([self.own] if self.own is not None else []) + list(self._sets.values())

    def submitted_jobs(self) -> list[str]:
        """Ids of every job submitted, of every resource set."""
        return [job for manager in self.managers() for job in manager.submitted_jobs]


def resource_sets(dispatcher: Dispatcher, managers: list[JobManager]) -> list[dict[str, Any]]:
    """One row per resource set for ``status()`` and the status page: what it asks for, its calls
    waiting and held, its live workers and its jobs."""
    rows = []
    for manager in managers:
        needs = manager.scheduler.options.needs
        live = dispatcher.liveness(needs)
        rows.append(
            {
                "resources": needs.label() or "the site's defaults",
                "waiting": live.pending,
                "held": live.held,
                "workers": len(live.workers),
                "jobs": list(manager.submitted_jobs),
            }
        )
    return rows


class ResourceView(Executor):
    """An executor's calls with other resources (``ClusterExecutor.with_resources``): the same
    session, workers and status page; ``submit`` and ``map`` go to arrays of their own. Shutting
    down the executor shuts its views down; a view's own ``shutdown`` waits for nothing."""

    def __init__(self, executor: ClusterExecutor, needs: Resources) -> None:
        self._executor = executor
        #: What each task of this view's arrays asks for.
        self.needs = needs

    @classmethod
    def of(cls, executor: ClusterExecutor, needs: Resources, changes: Mapping[str, Any]) -> ResourceView:
        """A view of ``executor`` whose calls need ``needs`` with ``changes``; checked against the
        site now (``ResourceConflict`` now, not at the first submit)."""
        needs = needs.updated(changes)
        scheduler = executor._session.scheduler
        scheduler.check_needs(scheduler.site, needs)
        return cls(executor, needs)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return self._executor._submit(fn, args, kwargs, self.needs)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        return self._executor._map(fn, iterables, timeout, chunksize, buffersize, self.needs)

    def with_resources(self, **resources: Any) -> ResourceView:
        """A view with these resources changed too."""
        return ResourceView.of(self._executor, self.needs, resources)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.needs.label() or 'the site defaults'} of {self._executor!r}>"
