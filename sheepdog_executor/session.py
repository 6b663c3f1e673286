"""The session an executor runs: the shell to the head node, the scheduler, the endpoint, the
dispatcher and the job manager, set up in named steps (connect first) in ``Session.__init__`` and
torn down exactly once in ``close``.
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
from typing import Any, TypeVar

from sheepdog_executor.background import in_background, settle
from sheepdog_executor.bundle import worker_bundle
from sheepdog_executor.dispatch import Dispatcher
from sheepdog_executor.endpointsetup import open_endpoint
from sheepdog_executor.environment import ENVIRONMENT_RECORD, EnvironmentSync, HeadNode, SyncedEnvironment
from sheepdog_executor.errors import ExecutorShutDown
from sheepdog_executor.escalation import Escalation, Escalator
from sheepdog_executor.jobs import JobManager
from sheepdog_executor.jobscript import WorkerLaunch
from sheepdog_executor.options import ExecutorOptions
from sheepdog_executor.remote.reach import ROUTES_FILE
from sheepdog_executor.resourcesets import JobManagers, resource_sets
from sheepdog_executor.scheduler import Scheduler
from sheepdog_executor.sessiondir import Owner, make_session_dir, prepare_root, this_client
from sheepdog_executor.shell import Shell, connect
from sheepdog_executor.sitelimits import SiteLimits

log = logging.getLogger("sheepdog_executor")
T = TypeVar("T")


class Session:
    """Everything an executor runs: set up in named steps in ``__init__`` (each one's undo on an
    ``ExitStack``: a failed set-up leaves nothing behind), torn down exactly once in ``close``."""

    def __init__(
        self,
        options: ExecutorOptions,
        make_scheduler: Callable[[Shell], Scheduler],
        *,
        max_workers: int,
        initializer: bytes | None,
        environment: EnvironmentSync | None = None,
        escalation: Escalation | None = None,
    ) -> None:
        """Connect to ``options.host``, make the scheduler (``make_scheduler(shell)``) and the
        dispatcher, then the other steps (``_set_up``); ``escalation``: a call killed over a limit
        runs again in a resource set with more."""
        self._closed = False
        self._close_lock = threading.Lock()
        self._close_done = threading.Event()
        self._empty = threading.Condition()
        #: The job managers, one per resource set (the executor's own made last in the set-up).
        self.sets = JobManagers()
        self.routes: list[tuple[str, str, int]] = []
        with contextlib.ExitStack() as undo:
            self.shell = _connect(options)
            undo.callback(self.shell.close)
            self.scheduler = make_scheduler(self.shell)
            self.dispatcher = self._start_dispatcher(options, max_workers, initializer)
            undo.callback(self.dispatcher.close)
            if escalation is not None:
                self._escalate(escalation)
            self.scheduler.meter.per_minute = options.commands_per_minute
            #: The site's limits (largest array, caps on the user's jobs), asked now for the first
            #: submit (not awaited here).
            self.site_limits = in_background(self.scheduler.site_limits, "sheepdog-site-limits")
            self._set_up(undo, options, environment, max_workers)
            undo.pop_all()  # set up: from here on, ``close`` undoes it

    def _start_dispatcher(
        self, options: ExecutorOptions, max_workers: int, initializer: bytes | None
    ) -> Dispatcher:
        """The dispatcher, started: it tells this session of every change (``_changed``)."""
        dispatcher = Dispatcher(
            retries=options.retries,
            idle_timeout=options.idle_timeout,
            heartbeat=options.heartbeat,
            initializer=initializer,
            python=sys.version_info[:2],
            echo_output=options.echo_output,
            max_workers=max_workers,
            disconnect_tolerance=options.disconnect_tolerance,
            needs=self.scheduler.options.needs,
        )
        dispatcher.on_change = self._changed
        dispatcher.start()
        return dispatcher

    def _escalate(self, escalation: Escalation) -> None:
        """A call killed over a limit runs again in a resource set with more (``escalation.py``)."""

        def site() -> SiteLimits | None:  # asked during the set-up (``site_limits``)
            limits = self.site_limits
            return limits.result() if limits.done() and limits.exception() is None else None

        escalate = Escalator(
            escalation, self.dispatcher.calls, self.sets.jobs_for, lambda: self.dispatcher.on_work(), site
        )
        self.dispatcher.escalate = escalate
        if "mem" in escalation.factors:  # MemoryError under an address-space limit (h_vmem)
            self.dispatcher.results.escalate_memory = lambda items: escalate(items, "mem")

    def _set_up(
        self,
        undo: contextlib.ExitStack,
        options: ExecutorOptions,
        environment: EnvironmentSync | None,
        max_workers: int,
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
            functools.partial(_make_session_dir, self.shell, options.session_root, owner, secret, bundle),
            "dir",
            lambda made: _remove_dir(self.shell, made[1]),
        )
        opened = self._step(
            undo,
            functools.partial(
                open_endpoint, self.shell, self.dispatcher, self.status, secret, options, self._tunnel_moved
            ),
            "endpoint",
            lambda o: o.endpoint.stop(),
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
        jobs = self._start_jobs(options, max_workers)
        undo.callback(jobs.stop, grace=0)
        log.info("session %s on %s, endpoint %s", self.session_dir, self.shell.description, self.launch.url)
        #: The status page's address with its token (None with ``status_page=False``).
        self.status_url: str | None = None
        if self.status_page is not None:
            self.status_url = self.status_page.url(
                self.endpoint.scheme, route.listen_address, self.endpoint.port
            )
            log.info("status page: %s", self.status_url)

    def _start_jobs(self, options: ExecutorOptions, max_workers: int) -> JobManager:
        """The job manager of the executor's own resource set, started: it submits, polls and
        removes its jobs. Those of other sets (``JobManagers.jobs_for``) are made alike, on first
        use."""
        make = functools.partial(
            JobManager,
            max_workers=max_workers,
            batch_window=options.batch_window,
            poll_interval=options.poll_interval,
            heartbeat_timeout=options.heartbeat_timeout,
            disconnect_tolerance=options.disconnect_tolerance,
            limits=self.site_limits,
        )
        return self.sets.start(make, self.scheduler, self.dispatcher, self.launch)

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

    @property
    def jobs(self) -> JobManager:
        """The job manager of the executor's own resource set (made last in the set-up)."""
        if self.sets.own is None:
            raise RuntimeError("the session is still being set up")
        return self.sets.own

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
        for manager in self.sets.managers():
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
        """The dispatcher's snapshot, the head node, and the ids of the jobs submitted so far."""
        jobs = self.sets.own  # None while the session is still being set up
        return {
            **self.dispatcher.snapshot(),
            "host": self.shell.description,
            "jobs": self.sets.submitted_jobs(),
            "polls": jobs.polls.snapshot() if jobs else {},
            "scheduler_commands": self.scheduler.meter.snapshot(),
            "site_limits": jobs.submitter.snapshot() if jobs else {},
            "resource_sets": resource_sets(self.dispatcher, self.sets.managers()),
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
        by_job: dict[str, list[int]] = {}
        for job, task in tasks:
            by_job.setdefault(job, []).append(task)
        try:
            self.scheduler.cancel_tasks(by_job)
        except Exception as exc:  # noqa: BLE001 - e.g. the executor was shut down meanwhile
            log.debug("could not remove tasks %s of an interrupted map: %s", tasks, exc)

    def _changed(self) -> None:
        for manager in self.sets.managers():  # none while the session is still being set up
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
        self.sets.close()
        if not first:
            self._close_done.wait()
            return
        try:
            self._teardown(abort)
        finally:
            self._close_done.set()

    def _teardown(self, abort: bool) -> None:
        self.dispatcher.stop()
        for manager in self.sets.managers():
            try:
                manager.stop(grace=0 if abort else 5.0)
            except Exception as exc:  # noqa: BLE001 - teardown goes on; say what may be left
                log.warning("could not remove jobs %s: %s", list(manager.jobs), exc)
        self.endpoint.stop()
        self.dispatcher.close()
        _remove_dir(self.shell, self.session_dir)
        settle([self.site_limits], timeout=30)
        self.shell.close()


def _connect(options: ExecutorOptions) -> Shell:
    """The shell to the head node (``shell.connect``). On a thread of its own: paramiko keeps a
    caught exception in a reference cycle with its frames, whose callers' frames (the executor's
    among them) would keep the executor alive until a full garbage collection, and with it its
    jobs after its last reference went (see ``_collected``)."""
    return in_background(functools.partial(connect, options.host, options), "sheepdog-connect").result()


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
    try:  # a Ctrl-C while the warning is still being written stops them too
        if calls:
            log.warning(
                "waiting at exit for %d call(s) of executors never shut down, as ProcessPoolExecutor "
                "does; Ctrl-C stops them and removes their jobs",
                calls,
            )
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
