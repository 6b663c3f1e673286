"""The workers that said hello: where each runs, what it holds, when it was last heard from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from sheepdog_executor.clock import awake_or_asleep

if TYPE_CHECKING:
    from sheepdog_executor.dispatch import WorkItem


@dataclass(eq=False)
class Worker:
    """A worker that said hello: where it runs and what it holds."""

    id: str
    job: str
    task: int
    host: str
    last_seen: float
    items: dict[int, WorkItem] = field(default_factory=dict)
    functions_sent: set[str] = field(default_factory=set)
    idle_since: float | None = None
    #: When it first asked for calls, about when its task started (its calls' ``head_start``
    #: counts from then).
    first_asked: float | None = None
    calls_done: int = 0
    #: The route it reached this client by ("direct", "tunnel", ...).
    route: str = ""
    #: The number of its latest ``/work`` request, and the calls this client answered it with: a
    #: copy of that request (the worker did not get the answer) gets the same calls again, and a
    #: copy of an older one (sent on a connection the worker has left) changes nothing.
    request: int = 0
    answer: dict[str, Any] | None = None


class WorkerSeen(NamedTuple):
    """A registered worker as the job manager sees it."""

    id: str
    job: str
    task: int
    host: str
    last_seen: float


class WorkerRegistry:
    """Workers by id, and every task that ever said hello. Not locked: the dispatcher calls it
    under its own lock (a worker's ``items`` are the dispatcher's calls)."""

    def __init__(self) -> None:
        self.workers: dict[str, Worker] = {}
        #: (job, task) of every task whose worker ever said hello.
        self.tasks_seen: set[tuple[str, int]] = set()

    def heard_from(self, worker_id: str) -> Worker | None:
        """The worker, now heard from (None: not registered, or forgotten)."""
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.last_seen = awake_or_asleep()
        return worker

    def seen(self) -> tuple[tuple[WorkerSeen, ...], frozenset[tuple[str, int]]]:
        """The workers as the job manager sees them, and the tasks seen: copies."""
        workers = tuple(WorkerSeen(w.id, w.job, w.task, w.host, w.last_seen) for w in self.workers.values())
        return workers, frozenset(self.tasks_seen)

    def rows(self, now: float) -> list[dict[str, Any]]:
        """The workers for the status page, JSON-able."""
        return [
            {
                "id": w.id,
                "host": w.host,
                "job": w.job,
                "task": w.task,
                "calls_done": w.calls_done,
                "holding": len(w.items),
                "seen_seconds_ago": round(now - w.last_seen, 1),
                "route": w.route,
            }
            for w in self.workers.values()
        ]

    def held(self) -> dict[int, WorkItem]:
        """The calls the workers hold, by id."""
        return {i: item for w in self.workers.values() for i, item in w.items.items()}

    def take_holding_only(self, batch: int) -> list[tuple[Worker, list[WorkItem]]]:
        """Forget the workers that hold calls of ``batch`` and of nothing else; return each with
        those calls, in order."""
        taken = []
        for worker in list(self.workers.values()):
            items = [worker.items[i] for i in sorted(worker.items)]
            if items and all(item.batch == batch for item in items):
                del self.workers[worker.id]
                worker.items.clear()
                taken.append((worker, items))
        return taken
