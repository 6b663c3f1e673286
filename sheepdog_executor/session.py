"""The session an executor runs: the shell to the head node, the scheduler, the endpoint, the
dispatcher and the job manager, set up in ``Session.__init__`` and torn down exactly once in ``close``.
The session, not the executor, is what threads and finalizers hold; interpreter exit waits for the
outstanding calls of sessions never shut down.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import secrets
import shlex
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from sheepdog_executor.background import in_background, settle
from sheepdog_executor.bundle import worker_bundle
from sheepdog_executor.dispatch import Dispatcher
from sheepdog_executor.environment import ENVIRONMENT_RECORD, EnvironmentSync, HeadNode, SyncedEnvironment
from sheepdog_executor.errors import ExecutorShutDown
from sheepdog_executor.escalation import Escalation, Escalator
from sheepdog_executor.jobs import JobManager
from sheepdog_executor.jobscript import WorkerLaunch
from sheepdog_executor.remote.reach import ROUTES_FILE
from sheepdog_executor.resources import Resources
from sheepdog_executor.resourcesets import SetView, resource_sets
from sheepdog_executor.scheduler import Scheduler
from sheepdog_executor.server import Endpoint
from sheepdog_executor.sessiondir import Owner, make_session_dir, prepare_root, this_client
from sheepdog_executor.shell import Shell
from sheepdog_executor.status import StatusPage
from sheepdog_executor.tunnel import Route, choose_route

if TYPE_CHECKING:
    from sheepdog_executor.tls import Certificate

log = logging.getLogger("sheepdog_executor")
T = TypeVar("T")


class _Opened(NamedTuple):
    """What the endpoint step hands back: the endpoint and the workers' routes to it."""

    endpoint: Endpoint
    route: Route
    #: (label, host, port) of each way the workers may reach us, best first
    routes: list[tuple[str, str, int]]
    certificate: Certificate | None
    status_page: StatusPage | None


class Session:
    """Everything an executor runs: set up in named steps in ``__init__`` (each one's undo on an
    ``ExitStack``: a failed set-up leaves nothing behind), torn down exactly once in ``close``."""

    def __init__(
        self,
        shell: Shell,
        scheduler: Scheduler,
        *,
        max_workers: int,
        retries: int,
        initializer: bytes | None,
        batch_window: float,
        poll_interval: float,
        idle_timeout: float,
        heartbeat: float,
        heartbeat_timeout: float,
        callback_address: str | None,
        callback_port: int,
        callback: str,
        tls: bool | None,
        session_root: str,
        echo_output: bool,
        status_page: bool = True,
        environment: EnvironmentSync | None = None,
        disconnect_tolerance: float = 600.0,
        escalation: Escalation | None = None,
    ) -> None:
        self.shell = shell
        self.scheduler = scheduler
        self.dispatcher = Dispatcher(
            retries=retries,
            idle_timeout=idle_timeout,
            heartbeat=heartbeat,
            initializer=initializer,
            python=sys.version_info[:2],
            echo_output=echo_output,
            max_workers=max_workers,
            disconnect_tolerance=disconnect_tolerance,
            needs=scheduler.options.needs,
        )
        self._closed = False
        self._close_lock = threading.Lock()
        self._close_done = threading.Event()
        self._empty = threading.Condition()
        #: The job manager, made last: what callbacks during the set-up find (None) until then.
        self._jobs: JobManager | None = None
        #: The job managers of the other resource sets (``with_resources``), made on first use.
        self._sets: dict[Resources, JobManager] = {}
        self._sets_lock = threading.Lock()
        self.routes: list[tuple[str, str, int]] = []
        self.dispatcher.on_change = self._changed
        if escalation is not None:  # a call killed over a limit runs again in a set with more
            escalate = Escalator(
                escalation, self.dispatcher.calls, self.jobs_for, lambda: self.dispatcher.on_work()
            )
            self.dispatcher.escalate = escalate
            if "mem" in escalation.factors:  # MemoryError under an address-space limit (h_vmem)
                self.dispatcher.results.escalate_memory = lambda items: escalate(items, "mem")
        #: The site's largest array, asked now for the first submit (not awaited here).
        self.array_limit = in_background(scheduler.max_array_size, "sheepdog-array-limit")
        jobs = functools.partial(
            JobManager,
            max_workers=max_workers,
            batch_window=batch_window,
            poll_interval=poll_interval,
            heartbeat_timeout=heartbeat_timeout,
            disconnect_tolerance=disconnect_tolerance,
            array_limit=self.array_limit,
        )
        endpoint = functools.partial(
            self._open_endpoint,
            callback=callback,
            callback_address=callback_address,
            callback_port=callback_port,
            tls=tls,
            status_page=status_page,
        )
        with contextlib.ExitStack() as undo:
            self.dispatcher.start()
            undo.callback(self.dispatcher.close)
            self._set_up(undo, session_root, endpoint, environment, jobs)
            undo.pop_all()  # set up: from here on, ``close`` undoes it

    def _set_up(
        self,
        undo: contextlib.ExitStack,
        session_root: str,
        open_endpoint: Callable[[bytes], _Opened],
        environment: EnvironmentSync | None,
        jobs: Callable[..., JobManager],
    ) -> None:
        """The steps, the independent ones at once (each SSH command in a session of its own); their
        results are taken in the order of a one-after-the-other set-up, whose first error is raised,
        and each result's undo goes on ``undo`` as soon as its step has ended."""
        secret = secrets.token_hex(32).encode()
        bundle = worker_bundle()
        owner = this_client(self.scheduler.name)  # `cleanup` of another cluster sharing this home skips it
        checked = self._step(undo, self.scheduler.prepare, "check", None)
        made = self._step(
            undo,
            functools.partial(_make_session_dir, self.shell, session_root, owner, secret, bundle),
            "dir",
            lambda made: _remove_dir(self.shell, made[1]),
        )
        opened = self._step(
            undo, functools.partial(open_endpoint, secret), "endpoint", lambda o: o.endpoint.stop()
        )
        checked.result()  # the scheduler's commands are there (SchedulerError naming the fix)
        root, self.session_dir = made.result()  # 0700, with the 0600 secret and bundle
        #: The synced environment the nodes run (``environment="sync"``), else None.
        self.environment = self._sync(environment, root) if environment is not None else None
        self.endpoint, route, self.routes, certificate, self.status_page = opened.result()
        self.dispatcher.on_lost = self.endpoint.parts.forget  # a dead worker's parts are freed
        self.launch = WorkerLaunch(
            self.session_dir,
            self._url(*self.routes[0]),
            certificate.fingerprint if certificate else None,
            bundle_sha256=hashlib.sha256(bundle).hexdigest(),  # the task checks it before running it
        )
        self._write_routes()
        self._make_jobs = jobs
        self._jobs = jobs(self.scheduler, SetView(self.dispatcher, self.scheduler.options.needs), self.launch)
        self._jobs.start()
        undo.callback(self._jobs.stop, grace=0)
        log.info("session %s on %s, endpoint %s", self.session_dir, self.shell.description, self.launch.url)
        #: The status page's address with its token (None with ``status_page=False``).
        self.status_url: str | None = None
        if self.status_page is not None:
            self.status_url = self.status_page.url(
                self.endpoint.scheme, route.listen_address, self.endpoint.port
            )
            log.info("status page: %s", self.status_url)

    @staticmethod
    def _step(
        undo: contextlib.ExitStack, fn: Callable[[], T], name: str, discard: Callable[[T], object] | None
    ) -> Future[T]:
        """Start a step on a thread of its own; on the way out of a failed set-up, wait for it to end
        and ``discard`` what it made."""
        step = in_background(fn, f"sheepdog-setup-{name}")

        def undo_step() -> None:
            settle([step])  # no step still making something
            if discard is not None and step.exception() is None:
                discard(step.result())

        undo.callback(undo_step)
        return step

    def _sync(self, environment: EnvironmentSync, root: str) -> SyncedEnvironment:
        """The environment the nodes run (after the checks: a build takes minutes), recorded in the
        session directory; the scheduler the jobs go to is made with its interpreter."""
        head = HeadNode(self.shell, self.scheduler.options, self.scheduler.command_setup)
        synced = environment.prepare(head, root)
        self.dispatcher.results.environment_synced = True
        record = f"{self.session_dir}/{ENVIRONMENT_RECORD}"
        self.shell.put(record, f"{synced.key}\n".encode(), 0o600)
        self.scheduler = self.scheduler.with_python(synced.python)
        return synced

    def _open_endpoint(
        self,
        secret: bytes,
        *,
        callback: str,
        callback_address: str | None,
        callback_port: int,
        tls: bool | None,
        status_page: bool,
    ) -> _Opened:
        """Decide how workers reach us (direct or SSH tunnel), start the endpoint there and open the
        routes. With TLS (``tls=True``; by default, on the routes through the head node's relay,
        which other users share) a certificate they pin by its fingerprint, which goes on their
        command line: it is not secret, only the secret file is."""
        shell = self.shell
        route = choose_route(shell, callback, callback_address or shell.callback_address(), callback_port)
        certificate = None
        try:
            if tls or (tls is None and route.through_head_node):
                # imported here: without paramiko (LocalShell, tls=True) cryptography costs 0.5 s
                from sheepdog_executor.tls import make_certificate

                certificate = make_certificate()
            context = certificate.server_context() if certificate else None
            page = StatusPage(self.status, shell.description) if status_page else None
            endpoint = Endpoint(
                self.dispatcher,
                secret,
                address=route.listen_address,
                port=route.listen_port,
                ssl_context=context if tls else None,
                routes=page.routes() if page else (),
                tunnel_ssl=context if tls is None else None,
            )
            endpoint.start()
        except BaseException:
            route.discard()
            raise
        try:
            routes = route.open(shell, endpoint, self._tunnel_moved)
        except BaseException:
            endpoint.stop()
            raise
        return _Opened(endpoint, route, routes, certificate, page)

    @property
    def jobs(self) -> JobManager:
        """The job manager (made last in the set-up)."""
        if self._jobs is None:
            raise RuntimeError("the session is still being set up")
        return self._jobs

    def jobs_for(self, needs: Resources) -> JobManager:
        """The job manager of the calls that need ``needs`` (made and started on first use: their
        arrays ask the scheduler for ``needs``)."""
        if needs == self.scheduler.options.needs:
            return self.jobs
        with self._sets_lock:
            manager = self._sets.get(needs)
            if manager is None:
                if self._closed:
                    raise RuntimeError("cannot schedule new futures after shutdown")
                view = SetView(self.dispatcher, needs)
                manager = self._make_jobs(self.scheduler.with_needs(needs), view, self.launch)
                manager.start()
                self._sets[needs] = manager
        return manager

    def managers(self) -> list[JobManager]:
        """Every job manager: the executor's own resource set's first (none during the set-up)."""
        with self._sets_lock:
            return ([self._jobs] if self._jobs is not None else []) + list(self._sets.values())

    def submitted_jobs(self) -> list[str]:
        """Ids of every job submitted, of every resource set."""
        return [job for manager in self.managers() for job in manager.submitted_jobs]

    def _write_routes(self) -> None:
        """Tell the workers how to reach us: the routes file they read (and re-read when their
        connection fails), and the endpoint record `sheepdog-executor cleanup` reads, both 0600."""
        lines = [f"{route[0]} {self._url(*route)}\n" for route in self.routes]
        self.shell.put(f"{self.session_dir}/{ROUTES_FILE}", "".join(lines).encode(), 0o600, replace=True)
        self.shell.put(f"{self.session_dir}/endpoint", f"{self._url(*self.routes[0])}\n".encode(), 0o600)

    def _url(self, label: str, host: str, port: int) -> str:
        """The URL of a route: through the tunnel, TLS by default (``Endpoint.tunnel_scheme``)."""
        scheme = self.endpoint.tunnel_scheme if label == "tunnel" else self.endpoint.scheme
        return f"{scheme}://{host}:{port}"

    def _tunnel_moved(self, host: str, port: int, moved: bool) -> None:
        """The tunnel was re-made, perhaps elsewhere (its port was taken): workers learn it from the
        routes file, and get time to come back before their silence counts."""
        for manager in self.managers():
            manager.away.mark_back()
        if not moved or not self.routes:  # during the set-up: it writes the routes it has
            return
        self.routes = [
            (label, *((host, port) if label == "tunnel" else (h, p))) for label, h, p in self.routes
        ]
        log.warning(
            "the tunnel's relay moved to %s:%d; the workers are told through %s", host, port, ROUTES_FILE
        )
        self._write_routes()

    def status(self) -> dict[str, Any]:
        """The dispatcher's snapshot and the ids of the jobs submitted so far."""
        jobs = self._jobs  # None while the session is still being set up
        return {
            **self.dispatcher.snapshot(),
            "jobs": self.submitted_jobs(),
            "polls": jobs.polls.snapshot() if jobs else {},
            "resource_sets": resource_sets(self.dispatcher, self.managers()),
            "routes": [f"{label} {host}:{port}" for label, host, port in self.routes],
        }

    def interrupt(self, batch: int) -> None:
        """A map was interrupted (Ctrl-C, a notebook's stop button) while it waited: its queued calls
        are cancelled already; stop its running ones where they run (their tasks are removed, in
        the background, so the prompt comes back at once), as the end of a script would. The
        executor stays open: the next map starts new workers."""
        taken = self.dispatcher.take_batch(batch)
        if not taken:
            return
        stopped = CancelledError("the map was interrupted (KeyboardInterrupt); the call was stopped")
        self.dispatcher.fail_items([item for _, items in taken for item in items], stopped, "cancelled")
        tasks = sorted({(worker.job, worker.task) for worker, _ in taken})
        in_background(functools.partial(self._remove_tasks, tasks), "sheepdog-interrupt")

    def _remove_tasks(self, tasks: list[tuple[str, int]]) -> None:
        for job, task in tasks:
            try:
                self.scheduler.cancel_task(job, task)
            except Exception as exc:  # noqa: BLE001 - e.g. the executor was shut down meanwhile
                log.debug("could not remove task %s.%d of an interrupted map: %s", job, task, exc)

    def _changed(self) -> None:
        for manager in self.managers():  # none while the session is still being set up
            manager.wake()
        with self._empty:
            self._empty.notify_all()

    def wait_until_done(self) -> None:
        """Block until no call is unresolved."""
        with self._empty:
            self._empty.wait_for(lambda: self.dispatcher.outstanding() == 0)

    def close(self, abort: bool = False) -> None:
        """Stop everything; with ``abort``, first stop unfinished calls. Safe to call from several
        threads: the first does the work, the others return when it is done."""
        if abort:
            self.dispatcher.cancel_pending("the executor was shut down before this call started")
            self.dispatcher.fail_all(
                ExecutorShutDown("the executor was shut down before this call finished; its task was removed")
            )
        with self._close_lock:
            first = not self._closed
            self._closed = True
        if not first:
            self._close_done.wait()
            return
        try:
            self._teardown(abort)
        finally:
            self._close_done.set()

    def _teardown(self, abort: bool) -> None:
        self.dispatcher.stop()
        for manager in self.managers():
            try:
                manager.stop(grace=0 if abort else 5.0)
            except Exception as exc:  # noqa: BLE001 - teardown goes on; say what may be left
                log.warning("could not remove jobs %s: %s", list(manager.jobs), exc)
        self.endpoint.stop()
        self.dispatcher.close()
        _remove_dir(self.shell, self.session_dir)
        settle([self.array_limit], timeout=30)
        self.shell.close()


def _make_session_dir(
    shell: Shell, session_root: str, owner: Owner, secret: bytes, bundle: bytes
) -> tuple[str, str]:
    """A new 0700 session directory of the user's (or raise) with the secret and the worker bundle
    in it, both 0600: (the canonical session root, the directory); none left when this fails."""
    # refused if another user could replace it (canonical path, created 0700 if missing)
    root = prepare_root(shell, session_root)
    session_dir = make_session_dir(shell, root, owner=owner)
    try:
        shell.put(f"{session_dir}/secret", secret, 0o600)
        shell.put(f"{session_dir}/bundle.zip", bundle, 0o600)
    except BaseException:
        _remove_dir(shell, session_dir)
        raise
    return root, session_dir


def _remove_dir(shell: Shell, path: str) -> None:
    """Best effort: a failure here must not hide the error or the teardown around it."""
    try:
        shell.run(f"rm -rf {shlex.quote(path)}", timeout=30)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not remove %s: %s", path, exc)


#: Every session set up and not collected: interpreter exit waits for their outstanding calls.
_OPEN: weakref.WeakSet[Session] = weakref.WeakSet()
#: Sessions whose executor was collected while calls were outstanding, held until those end.
_RELEASING: set[Session] = set()


def _collected(session: Session) -> None:
    """An executor was garbage-collected (or is at interpreter exit) without a shutdown: as
    ``shutdown(wait=False)``, the calls still outstanding finish, then everything is removed."""
    if session.dispatcher.outstanding() == 0:
        session.close()
        return
    _RELEASING.add(session)
    threading.Thread(target=_close_when_done, args=(session,), name="sheepdog-release", daemon=True).start()


def _close_when_done(session: Session) -> None:
    try:
        session.wait_until_done()
        session.close()
    finally:
        _RELEASING.discard(session)


def _wait_at_exit() -> None:
    """At interpreter exit, as ``ProcessPoolExecutor`` does: outstanding calls of executors never
    shut down finish first, then their sessions are closed here (a daemon thread would be cut off
    mid-way). Ctrl-C meanwhile stops them and removes their jobs."""
    sessions = [s for s in list(_OPEN) if s.dispatcher.outstanding() or s in _RELEASING]
    calls = sum(s.dispatcher.outstanding() for s in sessions)
    if calls:
        log.warning(
            "waiting at exit for %d call(s) of executors never shut down, as ProcessPoolExecutor "
            "does; Ctrl-C stops them and removes their jobs",
            calls,
        )
    try:
        for session in sessions:
            session.wait_until_done()
    except KeyboardInterrupt:
        for session in sessions:
            session.close(abort=True)
        print("sheepdog: interrupted at exit; unfinished calls stopped, their jobs removed", file=sys.stderr)
    for session in sessions:
        session.close()


# before the atexit handlers (weakref.finalize's among them), as concurrent.futures registers its own
threading._register_atexit(_wait_at_exit)  # type: ignore[attr-defined]
