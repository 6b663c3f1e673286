"""The public executors: ``GridEngineExecutor``, ``SlurmExecutor`` and ``LocalExecutor``.

An executor owns a ``Session``: the shell to the head node, the scheduler, the endpoint, the dispatcher
and the job manager. The session, not the executor, is what threads and finalizers hold. As with
``ProcessPoolExecutor``, an executor garbage-collected without a shutdown behaves as
``shutdown(wait=False)`` (its outstanding calls finish: someone may wait on their Futures; then its
jobs and session directory are removed), and interpreter exit waits for outstanding calls first.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import inspect
import itertools
import logging
import os
import secrets
import shlex
import sys
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError, Executor, Future
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from sheepdog_executor import notebook, pickling, registry
from sheepdog_executor.background import in_background, settle
from sheepdog_executor.bundle import worker_bundle
from sheepdog_executor.callfuture import CallFuture
from sheepdog_executor.config import uses_config
from sheepdog_executor.dispatch import NO_KWARGS, Dispatcher
from sheepdog_executor.environment import (
    ENVIRONMENT_RECORD,
    EnvironmentSync,
    HeadNode,
    SyncedEnvironment,
    stderr_progress,
)
from sheepdog_executor.errors import BrokenClusterExecutor, ExecutorShutDown
from sheepdog_executor.jobs import JobManager
from sheepdog_executor.jobscript import JobOptions, WorkerLaunch
from sheepdog_executor.options import DEFAULT_MAX_WORKERS, ExecutorOptions, defaults
from sheepdog_executor.remote.reach import ROUTES_FILE
from sheepdog_executor.scheduler import GridEngineScheduler, LocalScheduler, Scheduler, SlurmScheduler
from sheepdog_executor.server import Endpoint
from sheepdog_executor.sessiondir import make_session_dir, prepare_root, this_client
from sheepdog_executor.shell import Shell, connect
from sheepdog_executor.status import StatusPage
from sheepdog_executor.tunnel import Route, choose_route

if TYPE_CHECKING:
    from sheepdog_executor.tls import Certificate

log = logging.getLogger("sheepdog_executor")
T = TypeVar("T")

#: Calls submitted within this many seconds of each other are counted as one batch.
SUBMIT_BATCH_SECONDS = 1.0
#: With ``progress=None``, a map on a terminal shows a bar at once above this many calls, else once
#: it has lasted this many seconds.
AUTO_PROGRESS_CALLS = 100
AUTO_PROGRESS_SECONDS = 2.0


class Session:
    """Everything an executor runs: set up in ``open``, torn down exactly once in ``close``."""

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
        )
        self._closed = False
        self._close_lock = threading.Lock()
        self._close_done = threading.Event()
        self._empty = threading.Condition()
        self.dispatcher.on_change = self._changed
        secret = secrets.token_hex(32).encode()
        bundle = worker_bundle()
        #: The synced environment the nodes run (``environment="sync"``), else None.
        self.environment: SyncedEnvironment | None = None
        self.session_dir = ""  # set as soon as it exists: what a failed set-up removes
        #: The site's largest array, asked now for the first submit (not awaited here).
        self.array_limit = in_background(scheduler.max_array_size, "sheepdog-array-limit")
        steps: list[Future[Any]] = []
        try:
            self.dispatcher.start()  # inside: a set-up that fails from here on closes it again
            # independent steps at once, each SSH command in a session of its own; their results
            # are taken in the order of a one-after-the-other set-up, whose first error is raised
            checked = in_background(scheduler.prepare, "sheepdog-setup-check")
            steps.append(checked)
            make = functools.partial(self._make_session_dir, session_root, secret, bundle)
            made = in_background(make, "sheepdog-setup-dir")
            steps.append(made)
            open_endpoint = functools.partial(
                self._open_endpoint, secret, callback, callback_address, callback_port, tls, status_page
            )
            opened = in_background(open_endpoint, "sheepdog-setup-endpoint")
            steps.append(opened)
            checked.result()  # the scheduler's commands are there (SchedulerError naming the fix)
            root = made.result()  # the 0700 session directory, the 0600 secret and the bundle
            if environment is not None:  # after the checks: a build takes minutes
                head = HeadNode(shell, scheduler.options, scheduler.command_setup)
                self.environment = environment.prepare(head, root)
                self.dispatcher.environment_synced = True
                record = f"{self.session_dir}/{ENVIRONMENT_RECORD}"
                self.shell.put(record, f"{self.environment.key}\n".encode(), 0o600)
                scheduler.options = dataclasses.replace(scheduler.options, python=self.environment.python)
            route, certificate = opened.result()  # the endpoint and the workers' routes to it
            self.launch = WorkerLaunch(
                self.session_dir,
                self._url(*self.routes[0]),
                certificate.fingerprint if certificate else None,
                bundle_sha256=hashlib.sha256(bundle).hexdigest(),  # the task checks it before running it
            )
            self._write_routes()
            self.jobs = JobManager(
                scheduler,
                self.dispatcher,
                self.launch,
                max_workers=max_workers,
                batch_window=batch_window,
                poll_interval=poll_interval,
                heartbeat_timeout=heartbeat_timeout,
                disconnect_tolerance=disconnect_tolerance,
                array_limit=self.array_limit,
            )
            self.jobs.start()
            log.info("session %s on %s, endpoint %s", self.session_dir, shell.description, self.launch.url)
            #: The status page's address with its token (None with ``status_page=False``).
            self.status_url: str | None = None
            if self.status_page is not None:
                self.status_url = self.status_page.url(
                    self.endpoint.scheme, route.listen_address, self.endpoint.port
                )
                log.info("status page: %s", self.status_url)
        except BaseException:
            # nothing half-made stays behind: the endpoint, the tunnel, the session directory
            settle(steps)  # no step still making something
            self._discard_partial()
            raise

    def _make_session_dir(self, session_root: str, secret: bytes, bundle: bytes) -> str:
        """Make a new 0700 session directory of the user's (or raise), and put the secret and the
        worker bundle in it, both 0600; return the canonical session root."""
        # refused if another user could replace it (canonical path, created 0700 if missing)
        root = prepare_root(self.shell, session_root)
        # with who owns it: `cleanup` of another cluster sharing this home must leave it alone
        self.session_dir = make_session_dir(self.shell, root, owner=this_client(self.scheduler.name))
        self.shell.put(f"{self.session_dir}/secret", secret, 0o600)
        self.shell.put(f"{self.session_dir}/bundle.zip", bundle, 0o600)
        return root

    def _open_endpoint(
        self,
        secret: bytes,
        callback: str,
        callback_address: str | None,
        callback_port: int,
        tls: bool | None,
        status_page: bool,
    ) -> tuple[Route, Certificate | None]:
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
            self.status_page = StatusPage(self.status, shell.description) if status_page else None
            self.endpoint = Endpoint(
                self.dispatcher,
                secret,
                address=route.listen_address,
                port=route.listen_port,
                ssl_context=context if tls else None,
                routes=self.status_page.routes() if self.status_page else (),
                tunnel_ssl=context if tls is None else None,
            )
            self.dispatcher.on_lost = self.endpoint.parts.forget  # a dead worker's parts are freed
            self.endpoint.start()
        except BaseException:
            route.discard()
            raise
        try:
            #: (label, host, port) of each way the workers may reach us, best first
            self.routes = route.open(shell, self.endpoint, self._tunnel_moved)
        except BaseException:
            self.endpoint.stop()
            raise
        return route, certificate

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
        jobs = getattr(self, "jobs", None)
        if jobs is not None:
            jobs.away.mark_back()
        if not moved:
            return
        self.routes = [
            (label, *((host, port) if label == "tunnel" else (h, p))) for label, h, p in self.routes
        ]
        log.warning(
            "the tunnel's relay moved to %s:%d; the workers are told through %s", host, port, ROUTES_FILE
        )
        self._write_routes()

    def _discard_partial(self) -> None:
        endpoint = getattr(self, "endpoint", None)
        if endpoint is not None:
            endpoint.stop()
        self.dispatcher.close()
        self._remove_session_dir()

    def _remove_session_dir(self) -> None:
        """Best effort: a failure here must not hide the error or the teardown around it."""
        if not self.session_dir:
            return
        try:
            self.shell.run(f"rm -rf {shlex.quote(self.session_dir)}", timeout=30)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not remove %s: %s", self.session_dir, exc)

    def status(self) -> dict[str, Any]:
        """The dispatcher's snapshot and the ids of the jobs submitted so far."""
        jobs = getattr(self, "jobs", None)  # None while the session is still being set up
        return {
            **self.dispatcher.snapshot(),
            "jobs": list(jobs.submitted_jobs) if jobs else [],
            "polls": jobs.polls.snapshot() if jobs else {},
            "routes": [f"{label} {host}:{port}" for label, host, port in getattr(self, "routes", [])],
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
        jobs = getattr(self, "jobs", None)  # None while the session is still being set up
        if jobs is not None:
            jobs.wake()
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
        try:
            self.jobs.stop(grace=0 if abort else 5.0)
        except Exception as exc:  # noqa: BLE001 - teardown goes on; say what may be left
            log.warning("could not remove jobs %s: %s", list(self.jobs.jobs), exc)
        self.endpoint.stop()
        self.dispatcher.close()
        self._remove_session_dir()
        settle([self.array_limit], timeout=30)
        self.shell.close()


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


class ClusterExecutor(Executor):
    """A ``concurrent.futures.Executor`` whose calls run as workers of a batch scheduler.

    The base of every cluster executor: it owns what all schedulers share (the SSH connection, the
    task's set-up and interpreter, the executor's behaviour); a subclass names its scheduler
    (``scheduler_class``) and passes that scheduler's own options (``scheduler_options``).
    """

    #: The scheduler this executor submits to (set by each subclass).
    scheduler_class: ClassVar[type[Scheduler]]

    def __init__(
        self,
        max_workers: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        scheduler_options: Any = None,
        host: str | None = None,
        user: str | None = None,
        port: int | None = None,
        key_filename: str | None = None,
        ssh_config: str = "~/.ssh/config",
        connect_timeout: float = 15.0,
        command_setup: Sequence[str] | str = (),
        job_name: str = "sheepdog",
        working_directory: str | None = None,
        setup: Sequence[str] | str = (),
        setup_shell: str = "/bin/bash -l",
        python: str = "python3",
        retries: int = 0,
        batch_window: float = 0.05,
        poll_interval: float = 2.0,
        idle_timeout: float = 5.0,
        heartbeat: float = 5.0,
        heartbeat_timeout: float = 60.0,
        callback_address: str | None = None,
        callback_port: int = 0,
        callback: str = "auto",
        tls: bool | None = None,
        session_root: str = "~/.sheepdog-executor",
        echo_output: bool = False,
        status_page: bool = True,
        progress: bool | None = None,
        environment: str | None = None,
        environment_add: Sequence[str] | str = (),
        environment_exclude: Sequence[str] | str = (),
        disconnect_tolerance: float = 600.0,
    ) -> None:
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        # the signature above is ExecutorOptions' fields, written out for users and IDEs (a test
        # keeps the two equal): the options object checks and holds them
        given = locals()
        options = ExecutorOptions(**{name: given[name] for name in ExecutorOptions.__dataclass_fields__})
        del given  # no second reference to this frame's values
        job_options = JobOptions.from_options(options)
        self._max_workers = max_workers or DEFAULT_MAX_WORKERS
        self._progress = progress
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._batch_ids = itertools.count(1)
        self._submit_batch = 0
        self._submit_label = ""
        self._last_submit = 0.0
        # on a thread of its own: paramiko keeps a caught exception in a reference cycle with its
        # frames, whose callers' frames would keep this executor alive until a full garbage
        # collection, and with it its jobs after its last reference went (see _collected)
        shell = in_background(functools.partial(connect, host, options), "sheepdog-connect").result()
        init_blob = pickling.dumps((initializer, tuple(initargs))) if initializer is not None else None
        try:
            sync = EnvironmentSync.from_options(
                environment, environment_add, environment_exclude, stderr_progress(progress)
            )
            session_options = {name: options[name] for name in _SESSION_OPTIONS}
            session_options.update(max_workers=self._max_workers, initializer=init_blob, environment=sync)
            scheduler = self.scheduler_class(shell, job_options, command_setup, scheduler_options)
            self._session = Session(shell, scheduler, **session_options)
        except BaseException:
            shell.close()
            raise
        # GC of an executor never shut down, and interpreter exit, both remove its jobs, once the
        # calls outstanding then have ended (see _collected)
        _OPEN.add(self._session)
        self._finalizer = weakref.finalize(self, _collected, self._session)

    # -- submitting ---------------------------------------------------------------------------
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = CallFuture()
        with self._shutdown_lock:
            self._check_open()
            now = time.monotonic()
            if now - self._last_submit > SUBMIT_BATCH_SECONDS:
                self._submit_batch = next(self._batch_ids)
                self._submit_label = f"submit({_name_of(fn)})"
            self._last_submit = now
            self._session.dispatcher.add(
                fn, "call", ((args, kwargs),), (future,), self._submit_batch, self._submit_label
            )
        return future

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        """Like ``Executor.map`` (Python 3.14's, on every Python): all calls of one map go out
        together, as one array job; with ``buffersize``, at most that many calls (chunks with
        ``chunksize``) are submitted ahead of the results consumed, so any iterable, endless
        ones included, is mapped in bounded memory."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None and not isinstance(buffersize, int):
            raise TypeError("buffersize must be an integer or None")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
        end_time = None if timeout is None else timeout + time.monotonic()
        calls: Iterator[tuple[Any, Any]]  # (args, kwargs) of a call, or (list of those, None) of a chunk
        argument_sets = zip(*iterables)  # noqa: B905 - as Executor.map
        if chunksize == 1:
            kind, calls = "call", ((args, NO_KWARGS) for args in argument_sets)
        else:
            chunks = iter(lambda: [(a, NO_KWARGS) for a in itertools.islice(argument_sets, chunksize)], [])
            kind, calls = "chunk", ((chunk, None) for chunk in chunks)
        with self._shutdown_lock:
            self._check_open()
            batch = next(self._batch_ids)
            self._last_submit = 0.0  # the next submit starts a batch of its own
        label = f"map({_name_of(fn)})"
        refill: Callable[[], Future[Any] | None] | None = None
        if buffersize is None:
            arguments = list(calls)
            futures = self._queue(fn, kind, arguments, batch, label)
            total: int | None = len(arguments) if chunksize == 1 else sum(len(a) for a, _ in arguments)
            del arguments
        else:
            futures = self._queue(fn, kind, list(itertools.islice(calls, buffersize)), batch, label)
            total = None
            executor = weakref.ref(self)

            def refill() -> Future[Any] | None:
                """One more call for each result consumed, while the executor lives (as 3.14's)."""
                alive = executor()
                call = next(calls, None) if alive is not None else None
                if alive is None or call is None:
                    return None
                return alive._queue(fn, kind, [call], batch, label)[0]

        self._session.jobs.wake(flush=True)
        interrupted = functools.partial(self._session.interrupt, batch)
        results = _ordered_results(futures, end_time, refill, interrupted)
        return self._with_progress(_flatten(results) if chunksize > 1 else results, total, label)

    def _queue(
        self, fn: Callable[..., Any], kind: str, arguments: list[Any], batch: int, label: str
    ) -> list[Future[Any]]:
        futures: list[Future[Any]] = [CallFuture() for _ in arguments]
        with self._shutdown_lock:
            self._check_open()
            self._session.dispatcher.add(fn, kind, arguments, futures, batch, label)
        return futures

    def _with_progress(self, results: Iterator[T], total: int | None, desc: str) -> Iterator[T]:
        """``results`` behind a progress bar on stderr, as the ``progress`` option says."""
        if self._progress is False:
            return results
        from sheepdog_executor.progress import progress

        auto = self._progress is None
        delay = AUTO_PROGRESS_SECONDS if auto and (total or 0) <= AUTO_PROGRESS_CALLS else 0.0
        return progress(results, total, desc, disable=None if auto else False, delay=delay)

    def _check_open(self) -> None:
        broken = self._session.dispatcher.broken
        if broken is not None:
            raise BrokenClusterExecutor(str(broken)) from broken
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    # -- lifecycle ----------------------------------------------------------------------------
    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._shutdown_lock:
            self._shutdown = True
        if cancel_futures:
            self._session.dispatcher.cancel_pending("cancelled by shutdown(cancel_futures=True)")
        if wait:
            try:
                self._session.wait_until_done()
            except KeyboardInterrupt:  # Ctrl-C, a notebook's stop button: stop now, leave no job
                self._finalizer()
                raise
            self._finalizer.detach()
            self._session.close()
        else:
            threading.Thread(
                target=self._shutdown_in_background, name="sheepdog-shutdown", daemon=True
            ).start()

    def _shutdown_in_background(self) -> None:
        self._session.wait_until_done()
        self._finalizer.detach()
        self._session.close()

    def _abort(self) -> None:
        """Stop now: cancel what waits, fail what runs, remove every job."""
        self._finalizer.detach()
        self._session.close(abort=True)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.shutdown(wait=True)
        else:  # Ctrl-C or an error in the with body: stop now, leave nothing on the cluster
            with self._shutdown_lock:
                self._shutdown = True
            self._abort()

    # -- introspection ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """A JSON-able picture of the executor: per batch queued/running/done/failed/retried calls,
        hosts, durations, the last errors, the live workers and the jobs on the cluster."""
        return self._session.status()

    @property
    def job_ids(self) -> list[str]:
        """Ids of every job this executor submitted, in order."""
        return list(self._session.jobs.submitted_jobs)

    @property
    def status_url(self) -> str | None:
        """The live status page in a browser, token included (logged at INFO on start); None with
        ``status_page=False``. Anyone with this URL can see the status: share it like a password."""
        return self._session.status_url

    @property
    def environment(self) -> SyncedEnvironment | None:
        """With ``environment="sync"``, the environment the nodes run (its path, whether this
        executor built it); None otherwise."""
        return self._session.environment

    @property
    def session_dir(self) -> str:
        """The executor's private directory on the cluster (secret, worker bundle, task logs)."""
        return self._session.session_dir

    def __repr__(self) -> str:
        return notebook.text(self)

    def _repr_html_(self) -> str:
        """Jupyter's view: scheduler, host, workers, jobs, calls and the status page's link."""
        return notebook.card(self)


class GridEngineExecutor(ClusterExecutor):
    """Run calls as Grid Engine array jobs, submitted over SSH (or locally with ``host=None``).

    Takes ProcessPoolExecutor's ``max_workers``, ``initializer`` and ``initargs``; ``host`` is a host
    name or an alias of ``~/.ssh/config``; the other arguments shape the jobs (see the README).
    Options not given here come from the config file and environment (see ``config.py``).
    """

    scheduler_class = GridEngineScheduler

    @uses_config
    def __init__(
        self,
        max_workers: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        queue: str | None = None,
        resources: Mapping[str, str] | Sequence[str] | None = None,
        parallel_environment: str | None = None,
        slots: int = 1,
        qsub_args: Sequence[str] = (),
        **options: Any,
    ) -> None:
        site = _site_options(self.scheduler_class, locals())
        super().__init__(max_workers, initializer, initargs, scheduler_options=site, **options)


class SlurmExecutor(ClusterExecutor):
    """Run calls as Slurm array jobs (``sbatch --array``), submitted over SSH (or locally with
    ``host=None``).

    The same executor as ``GridEngineExecutor``; the jobs are shaped by Slurm's own options, named as
    sbatch names them: ``partition``, ``account``, ``qos``, ``time``, ``mem``, ``cpus_per_task``,
    ``gres``, ``constraint``, and ``sbatch_args`` for anything else. Options not given here come
    from the config file and environment (see ``config.py``).
    """

    scheduler_class = SlurmScheduler

    @uses_config
    def __init__(
        self,
        max_workers: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        partition: str | None = None,
        account: str | None = None,
        qos: str | None = None,
        time: str | None = None,
        mem: str | None = None,
        cpus_per_task: int = 1,
        gres: str | None = None,
        constraint: str | None = None,
        sbatch_args: Sequence[str] = (),
        **options: Any,
    ) -> None:
        site = _site_options(self.scheduler_class, locals())
        super().__init__(max_workers, initializer, initargs, scheduler_options=site, **options)


class LocalExecutor(ClusterExecutor):
    """The same executor with workers as local processes: no cluster and no SSH needed."""

    scheduler_class = LocalScheduler

    def __init__(
        self,
        max_workers: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        python: str = sys.executable,
        **options: Any,
    ) -> None:
        options.setdefault("callback_address", "127.0.0.1")
        options.setdefault("poll_interval", 0.5)
        super().__init__(
            max_workers or (os.cpu_count() or 1),
            initializer,
            initargs,
            python=python,
            **options,
        )


def executor_class(key: str) -> type[ClusterExecutor]:
    """The executor class of the scheduler registered as ``key`` (``registry.py``): the library's own
    for its rows, else one made once from the scheduler's declaration (its ``Options`` are the
    class's keyword arguments, config tables and all)."""
    row = registry.entry(key)
    scheduler = row.load()
    own = globals().get(row.executor)
    if isinstance(own, type) and issubclass(own, ClusterExecutor) and own.scheduler_class is scheduler:
        return own
    with _MADE_LOCK:
        made = _MADE.get(key)
        if made is None or made.scheduler_class is not scheduler:
            made = _MADE[key] = _make_executor_class(row.executor, scheduler)
    return made


_MADE: dict[str, type[ClusterExecutor]] = {}
_MADE_LOCK = threading.Lock()


def _make_executor_class(name: str, scheduler: type[Scheduler[Any]]) -> type[ClusterExecutor]:
    """A ``ClusterExecutor`` subclass for ``scheduler``, whose signature names its options."""
    own = defaults(scheduler.Options)

    def __init__(
        self: ClusterExecutor,
        max_workers: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        **options: Any,
    ) -> None:
        site = _site_options(scheduler, options)
        shared = {name: value for name, value in options.items() if name not in own}
        ClusterExecutor.__init__(self, max_workers, initializer, initargs, scheduler_options=site, **shared)

    signature = inspect.signature(__init__)
    parameters = list(signature.parameters.values())
    keywords = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d) for n, d in own.items()]
    written = signature.replace(parameters=[*parameters[:-1], *keywords, parameters[-1]])
    __init__.__signature__ = written  # type: ignore[attr-defined]
    doc = f"Run calls as {scheduler.name} jobs (``{scheduler.__module__}.{scheduler.__qualname__}``)."
    namespace = {"__init__": uses_config(__init__), "scheduler_class": scheduler, "__doc__": doc}
    return type(name, (ClusterExecutor,), namespace)


#: The options ``Session`` takes (as a mapping of name to value), read from its signature.
_SESSION_OPTIONS = tuple(
    name for name in inspect.signature(Session).parameters if name in ExecutorOptions.__dataclass_fields__
)


def _site_options(scheduler: type[Scheduler[Any]], given: Mapping[str, Any]) -> Any:
    """A scheduler's own options (its ``Options``) out of an executor's arguments; unset ones
    (None) take the declaration's default."""
    names = [f.name for f in dataclasses.fields(scheduler.Options)]
    return scheduler.site_options({name: given[name] for name in names if name in given})


def _name_of(fn: Callable[..., Any]) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__)


def _ordered_results(
    futures: list[Future[T]],
    end_time: float | None,
    refill: Callable[[], Future[T] | None] | None,
    interrupted: Callable[[], None] = lambda: None,
) -> Generator[T, None, None]:
    """Yield results in order; on timeout, error or abandonment cancel the rest (as CPython does);
    on a KeyboardInterrupt, also stop the running ones (``interrupted``): one that comes while it
    waits, or while a progress bar counts a result (which closes it meanwhile). Holds no
    reference to a result it yielded; with ``refill``, submits one more call before each result is
    awaited (``buffersize``)."""
    pending = collections.deque(futures)
    del futures
    try:
        while pending:
            if refill is not None and (more := refill()) is not None:
                pending.append(more)
                del more
            yield _result_or_cancel(pending.popleft(), end_time)
    except (KeyboardInterrupt, GeneratorExit) as stop:
        if _by_interrupt(stop):
            for future in pending:  # first: no queued call of the map can start after this
                future.cancel()
            interrupted()
        raise
    finally:
        for future in pending:
            future.cancel()


def _by_interrupt(stop: BaseException | None) -> bool:
    """A KeyboardInterrupt, or a generator closed while one propagates (through others closed)."""
    while isinstance(stop, GeneratorExit):
        stop = stop.__context__
    return isinstance(stop, KeyboardInterrupt)


def _result_or_cancel(future: Future[T], end_time: float | None) -> T:
    try:
        try:
            return future.result(None if end_time is None else max(end_time - time.monotonic(), 0))
        except (FuturesTimeout, KeyboardInterrupt):  # the call awaited, if it has not started yet
            future.cancel()
            raise
    finally:
        del future  # no reference to the result from this frame's traceback either


def _flatten(chunks: Generator[list[T], None, None]) -> Iterator[T]:
    """The results of each chunk in order, each list emptied as it goes (no reference kept);
    closing it closes ``chunks`` at once (an interrupt's trace goes with it)."""
    try:
        for chunk in chunks:
            chunk.reverse()
            while chunk:
                yield chunk.pop()
    finally:
        chunks.close()
