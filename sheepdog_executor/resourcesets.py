"""Resource sets: calls of one executor that need other resources (``ex.with_resources(mem=...)``)
go to arrays of their own, and a worker takes only calls of its own set.

Each set has its own queue (``CallBook``), its own scheduler (the executor's, with the set's
``Resources``) and its own job manager, which sees the dispatcher through ``SetView``: the calls
and workers of its set only, so it submits for its own calls and judges only its own workers. Every
guarantee is the job manager's and the dispatcher's, per set: cancellation, shutdown, retries, no
orphan job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Any, TypeVar

from sheepdog_executor.dispatch import Dispatcher, Liveness
from sheepdog_executor.resources import Resources

if TYPE_CHECKING:
    from sheepdog_executor.calls import WorkItem
    from sheepdog_executor.executor import ClusterExecutor
    from sheepdog_executor.jobs import JobManager

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
        return self._executor._view(self.needs, resources)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.needs.label() or 'the site defaults'} of {self._executor!r}>"
