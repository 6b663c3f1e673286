"""The workers that said hello: where each runs, what it holds, when it was last heard from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from sheepdog_executor.away import Hearing
from sheepdog_executor.calls import ENDED
from sheepdog_executor.clock import awake_or_asleep
from sheepdog_executor.errors import PythonVersionMismatch
from sheepdog_executor.remote.protocol import Result, WireItem

if TYPE_CHECKING:
    from sheepdog_executor.calls import CallQueue, WorkItem
    from sheepdog_executor.results import Outcome


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
    #: The number of its latest ``/work`` request, and what this client answered it with (the
    #: calls' ids, in order, and the functions sent): a copy of that request (the worker did not get
    #: the answer) gets the same calls again, and a copy of an older one (sent on a connection the
    #: worker has left) changes nothing. The calls' pickled arguments are not kept: 8 workers'
    #: answers of 1 MB arguments would hold 100 MB; a copy pickles them again.
    request: int = 0
    answered: tuple[list[int], dict[str, bytes]] | None = None
    #: The queue of its resource set: it takes calls from that one only.
    queue: CallQueue | None = None

    @classmethod
    def of(cls, hello: dict[str, Any], queue: CallQueue) -> Worker:
        """The worker a hello describes, taking calls of ``queue``."""
        job, task = str(hello.get("job")), int(hello.get("task", 0))
        worker = cls(str(hello["worker"]), job, task, str(hello.get("host", "?")), awake_or_asleep())
        worker.route = str(hello.get("route", ""))[:40]
        worker.queue = queue
        return worker

    def replay(self, request: int | None, dumps: Callable[[WorkItem], bytes]) -> dict[str, Any] | None:
        """The answer for a copy of an earlier ``/work`` request (None: a new request, now this
        worker's latest), its calls' arguments pickled again with ``dumps``. Copies arrive late when
        the client was away (suspended, offline): the worker sent the request again on another
        connection, or has moved on since."""
        if request is None:
            return None
        if request < self.request:
            return {"items": []}  # nobody reads this answer: the worker left that connection
        if request == self.request and self.answered is not None:
            ids, functions = self.answered  # the worker did not get it: the same calls again
            held = [self.items[i] for i in ids if i in self.items]
            return {"items": [(i.id, i.attempt, i.fn_key, dumps(i)) for i in held], "functions": functions}
        self.request, self.answered = request, None
        return None

    def take_results(
        self, results: list[Result], observe: Callable[[float], None]
    ) -> tuple[list[Outcome], list[WorkItem]]:
        """(the calls these results resolve, with their results; the calls it holds still, which
        never reached it): a worker asks for work only once it has run everything it was given, so
        what it still holds was lost with a reply's connection. A late, duplicate or replayed result
        (not of the attempt it holds) counts for nothing. Both leave ``items``; ``observe`` gets
        each delivered call's duration."""
        held = self.items
        delivered: list[Outcome] = []
        for result in results:
            item = held.get(result.item)
            if item is None or item.attempt != result.attempt:
                continue
            del held[result.item]
            item.state = ENDED
            self.calls_done += 1
            observe(result.seconds)
            delivered.append((item, result))
        undelivered = [held[item_id] for item_id in sorted(held)]
        held.clear()
        return delivered, undelivered

    def take_from(self, queue: CallQueue, want: int, failed: list[Outcome]) -> list[WireItem]:
        """Up to ``want`` calls of ``queue`` for its next reply, as sent, their arguments pickled now
        (one that does not pickle goes to ``failed``); each notes how late in its task it starts
        (``WorkItem.head_start``). With the dispatcher's lock held."""
        now = awake_or_asleep()
        if self.first_asked is None:
            self.first_asked = now
        return queue.take_locked(want, self.id, self.host, self.items, failed, now - self.first_asked)

    def reply(self, batch: list[WireItem], blob: Callable[[str], bytes]) -> dict[str, Any]:
        """The answer that hands it ``batch``, with the pickles (``blob``) of the functions it
        has not been sent yet; kept for a copy of its request."""
        self.idle_since = None
        keys = {fn_key for _, _, fn_key, _ in batch} - self.functions_sent
        functions = {key: blob(key) for key in keys}
        self.functions_sent.update(functions)
        self.answered = ([item_id for item_id, _, _, _ in batch], functions)
        return {"items": batch, "functions": functions}

    def idle_for(self, now: float) -> float:
        """How long it has been waiting for work (counting from now if it was busy)."""
        if self.idle_since is None:
            self.idle_since = now
        return now - self.idle_since


def python_mismatch(message: dict[str, Any], python: tuple[int, int] | None) -> PythonVersionMismatch | None:
    """The error of a worker's hello from another minor version of Python than ``python`` (None:
    the same, or not checked)."""
    theirs = tuple(message.get("python", ()))[:2]
    if python is None or theirs == python:
        return None
    return PythonVersionMismatch(
        f"the workers run Python {'.'.join(map(str, message.get('python', ())))} on "
        f"{message.get('host')} but this client runs Python {'.'.join(map(str, python))}; "
        "pickled functions only travel between the same minor version: set python= (or "
        "setup=) so the nodes use a matching interpreter",
        job_id=str(message.get("job")),
        task_id=int(message.get("task", 0)),
    )


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
        #: Ticked by the endpoint's loop: whether workers could be heard at all, lately.
        self.hearing = Hearing()

    def heard_from(self, worker_id: str) -> Worker | None:
        """The worker, now heard from (None: not registered, or forgotten)."""
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.last_seen = awake_or_asleep()
        return worker

    def seen(
        self, mine: Callable[[Worker], bool] = lambda worker: True
    ) -> tuple[tuple[WorkerSeen, ...], frozenset[tuple[str, int]]]:
        """The workers as the job manager sees them (those ``mine`` says), and the tasks seen: copies."""
        workers = tuple(
            WorkerSeen(w.id, w.job, w.task, w.host, w.last_seen) for w in self.workers.values() if mine(w)
        )
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

    def take_lost(self, worker_id: str) -> list[WorkItem] | None:
        """Forget a dead worker; return the calls it held, in order, marked as lost with it (None
        when it was not registered)."""
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return None
        items = [worker.items[i] for i in sorted(worker.items)]
        worker.items.clear()
        for item in items:
            item.worker = None
            item.losses += (f"{worker.job}.{worker.task}",)
        return items

    def take_all_items(self) -> list[WorkItem]:
        """Every call the workers hold, taken from them."""
        items: list[WorkItem] = []
        for worker in self.workers.values():
            items.extend(worker.items.values())
            worker.items.clear()
        return items

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
