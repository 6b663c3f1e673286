"""The one hook tests use to look inside a running executor: ``internals(executor)``.

What a user could want to know is in ``executor.status()``; this view shows the rest a test needs
(the worker's URL, the endpoint, the shell, the scheduler object, the tasks that said hello) without
reaching into private attributes, so that a change of the library's insides is mended here and not
in every test. Not an API for applications: what it shows may change with any release.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sheepdog_executor.executor import ClusterExecutor
    from sheepdog_executor.jobscript import WorkerLaunch
    from sheepdog_executor.scheduler import Scheduler
    from sheepdog_executor.server import Endpoint
    from sheepdog_executor.session import Session
    from sheepdog_executor.shell import Shell
    from sheepdog_executor.status import StatusPage


def internals(executor: ClusterExecutor) -> Internals:
    """A read-only view of ``executor``'s session. It holds the session, not the executor: a test
    may keep it to check what is left after the executor was dropped."""
    return Internals(executor._session)


@dataclass(frozen=True)
class Internals:
    """What tests read of an executor's session; each attribute is read when asked (the scheduler,
    for one, is replaced once the synced environment's interpreter is known)."""

    _session: Session

    @property
    def shell(self) -> Shell:
        """The shell to the head node (SSH, or local)."""
        return self._session.shell

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler object the jobs go to."""
        return self._session.scheduler

    @property
    def launch(self) -> WorkerLaunch:
        """How a task starts its worker: the session directory, the endpoint's URL, the fingerprint."""
        return self._session.launch

    @property
    def endpoint(self) -> Endpoint:
        """The endpoint workers talk to (its secret, port, refused requests, result parts)."""
        return self._session.endpoint

    @property
    def status_page(self) -> StatusPage | None:
        """The status page (None with ``status_page=False``)."""
        return self._session.status_page

    @property
    def routes(self) -> list[tuple[str, str, int]]:
        """(label, host, port) of each way the workers may reach the endpoint, best first (a copy)."""
        return list(self._session.routes)

    @property
    def session_dir(self) -> str:
        """The session directory on the cluster."""
        return self._session.session_dir

    @property
    def submitted_jobs(self) -> list[str]:
        """Every job the session submitted, in order (also after the executor was dropped)."""
        return list(self._session.jobs.submitted_jobs)

    @property
    def retries(self) -> int:
        """How often a call whose worker was lost is handed out again."""
        return self._session.dispatcher.retries

    @property
    def tasks_seen(self) -> frozenset[tuple[str, int]]:
        """(job, task) of every task whose worker ever said hello."""
        return frozenset(self._session.dispatcher.tasks_seen)

    def outstanding(self) -> int:
        """Calls submitted and not resolved yet."""
        return self._session.dispatcher.outstanding()

    def held_calls(self) -> dict[int, str | None]:
        """The calls workers hold: call id -> the worker holding it."""
        return {number: item.worker for number, item in self._session.dispatcher._items.items()}
