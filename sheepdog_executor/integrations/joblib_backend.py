"""joblib's ``"gridengine"`` backend: ``joblib.Parallel`` calls run as Grid Engine array jobs.

    import sheepdog_executor.integrations.joblib_backend  # or register(); or import the package
    with joblib.parallel_config(backend="gridengine", host="fear", max_workers=16, queue="short.q"):
        results = joblib.Parallel()(joblib.delayed(f)(x) for x in xs)

Keyword arguments of ``parallel_config`` (or extra ones of ``Parallel``) go to
``GridEngineExecutor``. ``n_jobs`` is ``max_workers``: ``-1`` (the default) means ``max_workers``
(else 32), ``-2`` one fewer, and so on; ``n_jobs=1`` runs in this process, as with every joblib backend.

Executors are reused across ``Parallel`` calls, as loky's reusable executor is: at the end of a
call its executor is kept, with its workers, for ``idle_timeout`` seconds (the time an idle worker
stays up; 5 s unless set), and the next call with the same options takes it over, so it submits no
new job; then it is shut down, leaving no jobs (also at interpreter exit, and at once with
``shutdown_reusable_executors()``). An executor whose call failed or was aborted is never kept.
``reuse=False`` opens a new executor per call (or per ``with Parallel(...) as parallel:`` session)
and shuts it down at its end. Each call of a batch is submitted on its own,
so the nodes need only what ``f`` needs (not joblib), and the executor ships ``f``'s module by value
when it is the user's own. An error (or Ctrl-C, or an abandoned ``return_as="generator"``) stops the
executor at once and removes its jobs, as the loky backend kills its workers; the call's exception is
raised with its original type and the remote traceback as ``__cause__``. Nested ``Parallel`` calls
inside ``f`` use joblib's defaults on the node; ``backend="gridengine"`` (or ``"slurm"``) there, or
in a loky child of the worker, means loky on that node, with a RuntimeWarning (``remote.nested``).
Without ``host=``, the usual cluster is used (``$SHEEPDOG_HOST``, or ``host`` in ``[default]``).
"""

from __future__ import annotations

import atexit
import functools
import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any

import joblib
from joblib.parallel import AutoBatchingMixin, FallbackToBackend, ParallelBackendBase, SequentialBackend

from sheepdog_executor import ClusterExecutor, GridEngineExecutor, SlurmExecutor, registry
from sheepdog_executor.config import resolve_options
from sheepdog_executor.executor import executor_class
from sheepdog_executor.integrations import JOBLIB_BACKEND, SLURM_JOBLIB_BACKEND
from sheepdog_executor.options import DEFAULT_MAX_WORKERS, ExecutorOptions  # n_jobs=-1 without max_workers

log = logging.getLogger("sheepdog_executor")

#: Keywords joblib passes to every backend's ``configure``: they are not executor options.
_JOBLIB_KEYWORDS = frozenset(
    {"max_nbytes", "temp_folder", "mmap_mode", "prefer", "require", "verbose", "context"}
)

#: How long an idle worker stays up unless ``idle_timeout`` says otherwise: the executor's default.
DEFAULT_IDLE_TIMEOUT: float = ExecutorOptions().idle_timeout


class ReusableExecutors:
    """Executors kept warm between ``Parallel`` calls: at most one idle executor per set of options,
    each shut down when its idle time has passed (then its workers have gone too), or at exit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[Hashable, tuple[ClusterExecutor, threading.Timer]] = {}

    def take(self, key: Hashable) -> ClusterExecutor | None:
        """The idle executor kept for these options, now the caller's; None if there is none."""
        with self._lock:
            kept = self._idle.pop(key, None)
        if kept is None:
            return None
        executor, timer = kept
        timer.cancel()
        if executor.status().get("broken"):
            _stop_now(executor)
            return None
        return executor

    def keep(self, key: Hashable, executor: ClusterExecutor, seconds: float) -> None:
        """Keep ``executor`` for the next call with these options, for ``seconds``; if one is kept
        already, shut this one down instead."""
        timer = threading.Timer(seconds, self._expire, (key, executor))
        timer.name = "sheepdog-joblib-reuse"
        timer.daemon = True  # interpreter exit shuts the kept executors down (atexit)
        with self._lock:
            keep = key not in self._idle
            if keep:
                try:
                    timer.start()
                except RuntimeError:  # the interpreter is exiting: no new threads, no keeping
                    keep = False
                else:
                    self._idle[key] = (executor, timer)
        if not keep:
            _shut_down(executor)

    def shut_down(self) -> None:
        """Shut every kept executor down now (their jobs removed); wait until it is done."""
        with self._lock:
            kept, self._idle = list(self._idle.values()), {}
        for executor, timer in kept:
            timer.cancel()
            _shut_down(executor)

    def _expire(self, key: Hashable, executor: ClusterExecutor) -> None:
        with self._lock:
            mine = key in self._idle and self._idle[key][0] is executor
            if mine:
                del self._idle[key]
        if mine:
            _shut_down(executor)


_reusable = ReusableExecutors()
atexit.register(_reusable.shut_down)


def shutdown_reusable_executors() -> None:
    """Shut down the executors kept warm between ``Parallel`` calls now, removing their jobs
    (otherwise each goes after its ``idle_timeout``, or at interpreter exit)."""
    _reusable.shut_down()


class GridEngineBackend(AutoBatchingMixin, ParallelBackendBase):
    """A joblib backend over one ``GridEngineExecutor`` per ``Parallel`` session, taken from and
    given back to ``ReusableExecutors`` so that back-to-back sessions share one (and its workers).

    Auto-batching as for loky: a round trip costs milliseconds once workers run, close to loky's,
    so joblib's 0.2-2 s batches hide it (the executor spreads a batch's calls over the workers by
    itself). Batches dispatched before the first one came back waited for the cold start (qsub,
    scheduling, interpreter start: seconds, minutes on a busy cluster) and would make joblib think
    the calls slow, so their durations are left out of its estimate.
    """

    #: The executor each ``Parallel`` session runs on.
    executor_class: type[ClusterExecutor] = GridEngineExecutor
    default_n_jobs = -1
    supports_retrieve_callback = True  # so return_as="generator" and timeout= work
    supports_inner_max_num_threads = False
    supports_sharedmem = False
    uses_threads = False

    def __init__(
        self, nesting_level: int | None = None, inner_max_num_threads: int | None = None, **options: Any
    ) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads, **options)
        self._lock = threading.Lock()
        self._options: dict[str, Any] = dict(options)
        self._executor: ClusterExecutor | None = None
        self._callbacks: ThreadPoolExecutor | None = None
        self._in_callback = threading.local()
        self._warm_since: float | None = None
        self._workers = self.effective_n_jobs(self.default_n_jobs)
        self._open = False
        self._reuse = True

    # -- joblib's session: configure ... terminate ------------------------------------------------
    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None or n_jobs < 0:
            every = int(self._options.get("max_workers") or DEFAULT_MAX_WORKERS)
            return max(every + 1 + (n_jobs or -1), 1)
        return int(n_jobs)

    def configure(
        self,
        n_jobs: int | None = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        **options: Any,
    ) -> int:
        self._options = {
            **self.backend_kwargs,
            **{k: v for k, v in options.items() if k not in _JOBLIB_KEYWORDS},
        }
        self._reuse = bool(self._options.pop("reuse", True))
        workers = self.effective_n_jobs(n_jobs)
        if workers == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        self._close(_shut_down)  # a session joblib never terminated
        self._workers = workers
        with self._lock:
            self._open = True
            self._callbacks = ThreadPoolExecutor(1, thread_name_prefix="sheepdog-joblib")
        try:
            self._executor_now()
        except BaseException:
            self._close(_shut_down)
            raise
        return workers

    def terminate(self) -> None:
        self._close(self._keep_or_shut_down)
        self.reset_batch_stats()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Stop now: cancel waiting calls, stop running ones, remove the jobs. With ``ensure_ready``
        the session goes on and its next batch opens a new executor."""
        if not ensure_ready:
            self._close(_stop_now)
            return
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            _stop_now(executor)
        self.reset_batch_stats()  # the next executor starts cold

    # -- batches ------------------------------------------------------------------------------
    def submit(self, func: Any, callback: Any = None) -> Future[list[Any]]:
        """Submit each call of joblib's batch; one future for the batch, done when all are. A batch
        that cannot be submitted fails with the reason, so joblib raises it instead of waiting."""
        batch: Future[list[Any]]
        try:
            executor = self._executor_now()
            batch = _gather([executor.submit(f, *args, **kwargs) for f, args, kwargs in func.items])
        except Exception as exc:  # noqa: BLE001 - handed to joblib through the batch's future
            batch = Future()
            batch.set_exception(exc)
        if callback is not None:
            batch.add_done_callback(functools.partial(self._call_back, callback))
        return batch

    def retrieve_result_callback(self, out: Future[list[Any]]) -> list[Any]:
        return out.result()

    def batch_completed(self, batch_size: int, duration: float) -> None:
        now = time.time()
        if self._warm_since is None:
            self._warm_since = now
        if now - duration >= self._warm_since:  # dispatched once workers were running
            super().batch_completed(batch_size, duration)

    def reset_batch_stats(self) -> None:
        super().reset_batch_stats()
        self._warm_since = None

    # -- helpers ------------------------------------------------------------------------------
    def _executor_now(self) -> ClusterExecutor:
        with self._lock:
            if not self._open:
                raise RuntimeError("this joblib session is over")
            if self._executor is None:
                options = {**self._options, "max_workers": self._workers}
                reused = _reusable.take(self._key(options)) if self._reuse else None
                if reused is not None:
                    workers = len(reused.status().get("workers") or ())
                    log.debug("joblib: reusing the executor of jobs %s (%d workers)", reused.job_ids, workers)
                    if workers:
                        self._warm_since = time.time()  # its batches need not wait for a cold start
                self._executor = reused or self.executor_class(**options)
            return self._executor

    def _key(self, options: Mapping[str, Any]) -> Hashable:
        """What a kept executor is found by: its class and its options."""
        return (self.executor_class.__name__, _options_key(options))

    def _keep_or_shut_down(self, executor: ClusterExecutor) -> None:
        """At the end of a call: keep the executor warm for the next call with the same options
        (while its workers stay up, ``idle_timeout``), or shut it down."""
        options = {**self._options, "max_workers": self._workers}
        if not self._reuse or executor.status().get("broken"):
            _shut_down(executor)
            return
        resolved = resolve_options(options.get("host"), options)
        _reusable.keep(
            self._key(options), executor, float(resolved.get("idle_timeout", DEFAULT_IDLE_TIMEOUT))
        )

    def _close(self, stop: Callable[[ClusterExecutor], None]) -> None:
        """End the session: no new executor, ``stop`` the current one, join the callback thread."""
        with self._lock:
            self._open = False
            executor, self._executor = self._executor, None
            callbacks, self._callbacks = self._callbacks, None
        if executor is not None:
            stop(executor)
        if callbacks is not None:
            callbacks.shutdown(wait=not getattr(self._in_callback, "active", False))

    def _call_back(self, callback: Any, future: Future[list[Any]]) -> None:
        """Run joblib's callback (which dispatches the next batch, reading the user's iterator) on
        our own thread: results arrive on the executor's endpoint thread, which must not block."""
        callbacks = self._callbacks
        if callbacks is None:
            return  # the session is over: joblib no longer wants this batch
        try:
            callbacks.submit(self._run_callback, callback, future)
        except RuntimeError:  # shut down meanwhile
            pass

    def _run_callback(self, callback: Any, future: Future[list[Any]]) -> None:
        self._in_callback.active = True
        try:
            callback(future)
        except BaseException:  # noqa: BLE001 - joblib's own bug; say so rather than lose it
            log.exception("joblib's batch callback failed")
        finally:
            self._in_callback.active = False

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        return f"{type(self).__name__}({shown})"


def _gather(futures: Sequence[Future[Any]]) -> Future[list[Any]]:
    """One future for a batch's futures: their results in order, or the first error."""
    gathered: Future[list[Any]] = Future()
    gathered.set_running_or_notify_cancel()
    results: list[Any] = [None] * len(futures)
    left = [len(futures)]
    lock = threading.Lock()

    def done(index: int, future: Future[Any]) -> None:
        try:
            error = future.exception()
        except CancelledError as cancelled:
            error = cancelled
        with lock:
            if not left[0]:
                return  # an earlier call failed: the batch is decided
            left[0] = left[0] - 1 if error is None else 0
            if error is None:
                results[index] = future.result()
            finished = not left[0]
        if finished:
            if error is None:
                gathered.set_result(results)
            else:
                gathered.set_exception(error)

    if not futures:
        gathered.set_result(results)
    for index, future in enumerate(futures):
        future.add_done_callback(functools.partial(done, index))
    return gathered


def _options_key(options: Mapping[str, Any]) -> Hashable:
    """Equal for equal executor options (lists and dicts compared by value, the rest as themselves)."""

    def frozen(value: Any) -> Hashable:
        if isinstance(value, Mapping):
            return ("{}", tuple(sorted((str(k), frozen(v)) for k, v in value.items())))
        if isinstance(value, (list, tuple)):
            return ("[]", tuple(frozen(v) for v in value))
        try:
            hash(value)
        except TypeError:
            return ("id", id(value))
        return value

    return frozen(dict(options))


def _shut_down(executor: ClusterExecutor) -> None:
    """Every call has ended: shut down, which removes the jobs."""
    executor.shutdown(wait=True)


def _stop_now(executor: ClusterExecutor) -> None:
    """Running calls stop, jobs go, at once."""
    executor.abort()


class SlurmBackend(GridEngineBackend):
    """The same backend over ``SlurmExecutor``: ``joblib.parallel_config(backend="slurm", ...)``."""

    executor_class = SlurmExecutor


_BACKENDS: dict[str, type[GridEngineBackend]] = {
    JOBLIB_BACKEND: GridEngineBackend,
    SLURM_JOBLIB_BACKEND: SlurmBackend,
}


def backend_class(key: str) -> type[GridEngineBackend]:
    """The backend over the executor of the scheduler registered as ``key`` (its joblib name)."""
    executor = executor_class(key)
    found = _BACKENDS.get(key)
    if found is None or found.executor_class is not executor:
        doc = f"The backend over ``{executor.__name__}``: ``parallel_config(backend={key!r}, ...)``."
        found = _BACKENDS[key] = type(
            f"{executor.__name__}Backend", (GridEngineBackend,), {"executor_class": executor, "__doc__": doc}
        )
    return found


def register() -> None:
    """Make a backend of each registered scheduler (``"gridengine"``, ``"slurm"``, ...) available to
    joblib, named as the registry names it (importing this module does it too)."""
    for key in registry.entries():
        joblib.register_parallel_backend(key, functools.partial(_make_backend, key))


def _make_backend(key: str, **options: Any) -> GridEngineBackend:
    return backend_class(key)(**options)


register()
