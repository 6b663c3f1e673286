"""The public executors: ``GridEngineExecutor``, ``SlurmExecutor`` and ``LocalExecutor``.

An executor owns a ``Session``: the shell to the head node, the scheduler, the endpoint, the dispatcher
and the job manager. The session, not the executor, is what threads and finalizers hold. As with
``ProcessPoolExecutor``, an executor garbage-collected without a shutdown behaves as
``shutdown(wait=False)`` (its outstanding calls finish: someone may wait on their Futures; then its
jobs and session directory are removed), and interpreter exit waits for outstanding calls first.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from sheepdog_executor import pickling, registry
from sheepdog_executor.callfuture import CallFuture
from sheepdog_executor.config import uses_config
from sheepdog_executor.environment import (
    EnvironmentSync,
    SyncedEnvironment,
    stderr_progress,
)
from sheepdog_executor.errors import BrokenClusterExecutor
from sheepdog_executor.escalation import Escalation
from sheepdog_executor.jobscript import JobOptions
from sheepdog_executor.mapresults import (
    check_map_arguments,
    flatten,
    map_calls,
    ordered_results,
    with_progress,
)
from sheepdog_executor.options import DEFAULT_MAX_WORKERS, ExecutorOptions, defaults
from sheepdog_executor.resources import Resources
from sheepdog_executor.resourcesets import ResourceView
from sheepdog_executor.scheduler import (
    GridEngineScheduler,
    LocalScheduler,
    Scheduler,
    SlurmScheduler,
)
from sheepdog_executor.session import _OPEN, Session, _collected

if TYPE_CHECKING:  # imported when a sweep is opened: most executors have none
    from sheepdog_executor.sweepstore import Sweep

log = logging.getLogger("sheepdog_executor")
T = TypeVar("T")

#: Calls submitted within this many seconds of each other are counted as one batch.
SUBMIT_BATCH_SECONDS = 1.0


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
        time: str | int | None = None,
        mem: str | None = None,
        cpus: int | None = None,
        gpus: int | None = None,
        escalate: Mapping[str, float] | None = None,
        max_mem: str | None = None,
        max_time: str | None = None,
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
        commands_per_minute: float = 60.0,
        sweep: str | None = None,
    ) -> None:
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        # the signature above is ExecutorOptions' fields, written out for users and IDEs (a test
        # keeps the two equal): the options object checks and holds them
        given = locals()
        options = ExecutorOptions(**{name: given[name] for name in ExecutorOptions.__dataclass_fields__})
        del given  # no second reference to this frame's values
        job_options = JobOptions.from_options(options)
        site = scheduler_options if scheduler_options is not None else self.scheduler_class.Options()
        self.scheduler_class.check_needs(site, job_options.needs)  # before anything connects
        self._max_workers = max_workers or DEFAULT_MAX_WORKERS
        self._progress = progress
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._batches = _Batches()
        self._session = _open_session(
            self.scheduler_class, options, self._max_workers, initializer, initargs, scheduler_options
        )
        #: With ``sweep=``, the sweep whose kept results this executor serves (``sweepstore``).
        self._sweep = _open_sweep(self._session, sweep, disconnect_tolerance)
        # GC of an executor never shut down, and interpreter exit, both remove its jobs, once the
        # calls outstanding then have ended (see _collected)
        _OPEN.add(self._session)
        self._finalizer = weakref.finalize(self, _collected, self._session)

    # -- submitting ---------------------------------------------------------------------------
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return self._submit(fn, args, kwargs, None)

    def with_resources(self, **resources: Any) -> ResourceView:
        """A view of this executor whose calls need other resources per task (``time=``,
        ``mem=``, ``cpus=``, ``gpus=``; None: the site's default), e.g.
        ``ex.with_resources(mem="16G", time="4:00:00")``: its ``submit`` and ``map`` go to array
        jobs of their own, on the same session; the others are this executor's own."""
        return ResourceView.of(self, self._session.scheduler.options.needs, resources)

    def _submit(
        self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any], needs: Resources | None
    ) -> Future[T]:
        future: Future[T] = CallFuture()
        with self._shutdown_lock:
            self._check_open()
            if needs is not None:
                self._session.sets.jobs_for(needs)
            batch, label = self._batches.of_submit(fn)
            self._add(fn, ((args, kwargs),), (future,), batch, label, needs)
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
        return self._map(fn, iterables, timeout, chunksize, buffersize, None)

    def _map(
        self,
        fn: Callable[..., T],
        iterables: tuple[Iterable[Any], ...],
        timeout: float | None,
        chunksize: int,
        buffersize: int | None,
        needs: Resources | None,
    ) -> Iterator[T]:
        check_map_arguments(chunksize, buffersize)
        end_time = None if timeout is None else timeout + time.monotonic()
        target, calls = map_calls(fn, iterables, chunksize)  # calls: (args, kwargs) of each
        label = f"map({_name_of(fn)})"
        with self._shutdown_lock:
            self._check_open()
            jobs = self._session.jobs if needs is None else self._session.sets.jobs_for(needs)
            batch = self._batches.of_map()
        refill: Callable[[], Future[Any] | None] | None = None
        if buffersize is None:
            arguments = list(calls)
            futures = self._queue(target, arguments, batch, label, needs)
            total: int | None = len(arguments) if chunksize == 1 else sum(len(a[0]) for a, _ in arguments)
            del arguments
        else:
            futures = self._queue(target, list(itertools.islice(calls, buffersize)), batch, label, needs)
            total = None
            refill = _refill(weakref.ref(self), calls, target, batch, label, needs)
        jobs.wake(flush=True)
        interrupted = functools.partial(self._session.interrupt, batch)
        results = ordered_results(futures, end_time, refill, interrupted)
        return with_progress(flatten(results) if chunksize > 1 else results, total, label, self._progress)

    def _queue(
        self, fn: Callable[..., Any], arguments: list[Any], batch: int, label: str, needs: Resources | None
    ) -> list[Future[Any]]:
        futures: list[Future[Any]] = [CallFuture() for _ in arguments]
        with self._shutdown_lock:
            self._check_open()
            self._add(fn, arguments, futures, batch, label, needs)
        return futures

    def _add(
        self,
        fn: Callable[..., Any],
        arguments: Sequence[tuple[Any, dict[str, Any] | None]],
        futures: Sequence[Future[Any]],
        batch: int,
        label: str,
        needs: Resources | None,
    ) -> None:
        """Queue calls (of the resource set ``needs``; None: the executor's own); in a sweep, those
        whose result is kept are resolved here instead."""
        if self._sweep is not None:
            fn, arguments, futures = self._sweep.split(fn, arguments, futures)
            if not futures:
                return
        self._session.dispatcher.add(fn, arguments, futures, batch, label, needs)

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
                self.abort()
                raise
            self._finalizer.detach()
            self._session.close()
        else:
            threading.Thread(
                target=self._shutdown_in_background, name="sheepdog-shutdown", daemon=True
            ).start()

    def detach(self) -> int:
        """With ``sweep=``: hand the calls not started yet to the cluster and shut down. They run
        there in jobs of their own with no client alive, their results kept in the sweep's store;
        an executor of the same sweep, in any process, gets them with ``attach()``. Returns once the
        calls running now have ended (their results kept too); the handed-over calls' Futures here
        end with ``SweepDetached``. Returns how many calls were handed over."""
        sweep = self._sweep_for("detach")
        with self._shutdown_lock:
            self._shutdown = True
        handed = sweep.detach(self._max_workers)
        self.shutdown(wait=True)
        return handed

    def attach(self) -> list[Future[Any]]:
        """With ``sweep=``: Futures of every call ever handed to the cluster by ``detach()`` in this
        sweep, in the order they were submitted: those that finished (while nobody was attached,
        too) are resolved at once from the store, the others run here (those a detached task is
        running are waited for when the executor opens the sweep)."""
        sweep = self._sweep_for("attach")
        futures: list[Future[Any]] = []
        batch = self._batches.of_map()
        for fn, calls in itertools.groupby(sweep.detached_calls(), key=lambda call: call[0]):
            arguments = [(args, kwargs) for _, args, kwargs in calls]
            futures.extend(self._queue(fn, arguments, batch, f"attach({_name_of(fn)})", None))
        self._session.jobs.wake(flush=True)
        return futures

    def _sweep_for(self, method: str) -> Sweep:
        if self._sweep is None:
            raise RuntimeError(f"{method}() needs a sweep: make the executor with sweep=NAME")
        return self._sweep

    def _shutdown_in_background(self) -> None:
        self._session.wait_until_done()
        self._finalizer.detach()
        self._session.close()

    def abort(self) -> None:
        """Stop now, as on an error in the ``with`` body: the calls not started are cancelled, the
        running ones fail with ``ExecutorShutDown``, the workers stop and every job is removed; the
        executor is shut down."""
        with self._shutdown_lock:
            self._shutdown = True
        self._finalizer.detach()
        self._session.close(abort=True)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.shutdown(wait=True)
        else:  # Ctrl-C or an error in the with body: stop now, leave nothing on the cluster
            self.abort()

    # -- introspection ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """A JSON-able picture of the executor: per batch queued/running/done/failed/retried calls,
        hosts, durations, the last errors, the live workers, the jobs on the cluster and the head
        node (``host``)."""
        return self._session.status()

    @property
    def job_ids(self) -> list[str]:
        """Ids of every job this executor submitted, in order."""
        return self._session.sets.submitted_jobs()

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
    def sweep(self) -> Sweep | None:
        """With ``sweep=``, the sweep: its store's directory, its kept results, how many calls
        this executor served from it (``served``) and sent to the workers (``sent``)."""
        return self._sweep

    @property
    def session_dir(self) -> str:
        """The executor's private directory on the cluster (secret, worker bundle, task logs)."""
        return self._session.session_dir

    def __repr__(self) -> str:
        return _notebook().text(self)

    def _repr_html_(self) -> str:
        """Jupyter's view: scheduler, host, workers, jobs, calls and the status page's link."""
        return _notebook().card(self)


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
        memory_resource: str = "h_vmem",
        gpu_resource: str = "gpu",
        qsub_args: Sequence[str] = (),
        **options: Any,
    ) -> None:
        site = _site_options(self.scheduler_class, locals())
        super().__init__(max_workers, initializer, initargs, scheduler_options=site, **options)


class SlurmExecutor(ClusterExecutor):
    """Run calls as Slurm array jobs (``sbatch --array``), submitted over SSH (or locally with
    ``host=None``).

    The same executor as ``GridEngineExecutor``; the jobs are shaped by Slurm's own options, named as
    sbatch names them: ``partition``, ``account``, ``qos``, ``cpus_per_task``, ``gres``,
    ``constraint``, and ``sbatch_args`` for anything else; ``time``, ``mem``, ``cpus`` and ``gpus``
    are the same words on every scheduler. Options not given here come
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


def _open_session(
    scheduler_class: type[Scheduler[Any]],
    options: ExecutorOptions,
    max_workers: int,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
    scheduler_options: Any,
) -> Session:
    """An executor's session: connected, set up in its named steps (``session.py``), with
    ``scheduler_class``, shaped by ``options`` and the scheduler's own ``scheduler_options``."""
    init_blob = pickling.dumps((initializer, tuple(initargs))) if initializer is not None else None
    sync = EnvironmentSync.from_options(
        options.environment,
        options.environment_add,
        options.environment_exclude,
        stderr_progress(options.progress),
    )
    job_options = JobOptions.from_options(options)
    command_setup = options.command_setup
    return Session(
        options,
        lambda shell: scheduler_class(shell, job_options, command_setup, scheduler_options),
        max_workers=max_workers,
        initializer=init_blob,
        environment=sync,
        escalation=Escalation.from_options(options),
    )


def _notebook() -> ModuleType:
    """The module that shows an executor (text, Jupyter's card): imported when first shown."""
    from sheepdog_executor import notebook

    return notebook


def _open_sweep(session: Session, name: str | None, disconnect_tolerance: float) -> Sweep | None:
    """With ``sweep=``, the sweep ``name``, opened for ``session`` (closed if it cannot be); a
    previous run's workers get up to their tolerance to end the calls they run."""
    if name is None:
        return None
    from sheepdog_executor.sweepstore import open_sweep

    try:
        return open_sweep(session, name, disconnect_tolerance + 60)
    except BaseException:
        session.close(abort=True)
        raise


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


def _site_options(scheduler: type[Scheduler[Any]], given: Mapping[str, Any]) -> Any:
    """A scheduler's own options (its ``Options``) out of an executor's arguments; unset ones
    (None) take the declaration's default."""
    names = [f.name for f in dataclasses.fields(scheduler.Options)]
    return scheduler.site_options({name: given[name] for name in names if name in given})


class _Batches:
    """Which batch a call belongs to (the status counts per batch): submits within
    ``SUBMIT_BATCH_SECONDS`` of each other are one batch, and each map is one of its own. Used
    under the executor's lock."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._submit_batch = 0
        self._submit_label = ""
        self._last_submit = 0.0

    def of_submit(self, fn: Callable[..., Any]) -> tuple[int, str]:
        """The batch and label of a call submitted now."""
        now = time.monotonic()
        if now - self._last_submit > SUBMIT_BATCH_SECONDS:
            self._submit_batch = next(self._ids)
            self._submit_label = f"submit({_name_of(fn)})"
        self._last_submit = now
        return self._submit_batch, self._submit_label

    def of_map(self) -> int:
        """A new batch for a map; the next submit starts a batch of its own."""
        self._last_submit = 0.0
        return next(self._ids)


def _refill(
    executor: weakref.ref[ClusterExecutor],
    calls: Iterator[tuple[Any, Any]],
    target: Callable[..., Any],
    batch: int,
    label: str,
    needs: Resources | None,
) -> Callable[[], Future[Any] | None]:
    """A map's refill with ``buffersize``: one more call for each result consumed, while the
    executor lives (as 3.14's)."""

    def refill() -> Future[Any] | None:
        alive = executor()
        call = next(calls, None) if alive is not None else None
        if alive is None or call is None:
            return None
        return alive._queue(target, [call], batch, label, needs)[0]

    return refill


def _name_of(fn: Callable[..., Any]) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__)
