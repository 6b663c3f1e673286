"""The client's side of a sweep (``sweep="NAME"``): each call's result is kept on the cluster, so
that running the same script again serves the calls that finished and runs only the rest.

Opening a sweep takes it over (its ``lease`` names this run) and reads its whole store back in one
command (every worker's records file, streamed); every record's MAC is checked before anything is
unpickled (``SweepStoreRefused`` otherwise). Calls a previous run's workers were still running are
waited for: they end in the store, or their worker is gone and they run again here; workers of the
previous run start no new call once the lease moved (see ``remote/store.py``). Each call is keyed
by ``callkey``; a kept one resolves its Future at once, the others go to the workers wrapped in
``store.kept_call``, which keeps their value. A worker lost with calls it had finished: those are
read back from its file instead of being run again.
"""

from __future__ import annotations

import base64
import logging
import math
import os
import pickle
import posixpath
import re
import secrets
import shlex
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from functools import partial
from typing import TYPE_CHECKING, Any

from sheepdog_executor import pickling
from sheepdog_executor.callkey import call_key, function_digest
from sheepdog_executor.errors import (
    ConfigurationError,
    PollFailed,
    RemoteCallError,
    SweepDetached,
    SweepStoreRefused,
)
from sheepdog_executor.jobscript import WorkerLaunch
from sheepdog_executor.remote import store
from sheepdog_executor.scheduler.local import LocalScheduler

if TYPE_CHECKING:
    from sheepdog_executor.dispatch import WorkItem
    from sheepdog_executor.session import Session

log = logging.getLogger("sheepdog_executor")

#: Sweeps live in this directory of the session root.
SWEEPS_DIR = "sweeps"
_WORKER_FILE = re.compile(r"(.+)\.([0-9]+)\.([0-9]+)\.log")
#: Seconds between two looks at the calls a previous run still runs.
WAIT_POLL_SECONDS = 1.0
#: Prints each records file of the listing as ``#F NAME``, its bytes, then one newline
#: (``store.sections`` reads it back); FILES is the shell words of the files.
LISTING = (
    'for f in FILES; do [ -f "$f" ] || continue; printf \'#F %s\\n\' "${f##*/}"; cat -- "$f"; echo; done'
)
_NO_KWARGS: dict[str, Any] = {}


def sweep_directory(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{SWEEPS_DIR}/{name}"


class Sweep:
    """A sweep opened by one executor: its kept results, and how its calls are sent out."""

    def __init__(self, session: Session, name: str, wait_limit: float) -> None:
        self.session = session
        self.name = name
        self.directory = sweep_directory(posixpath.dirname(session.session_dir), name)
        #: This executor's run of the sweep (its session directory's name).
        self.run = posixpath.basename(session.session_dir)
        self.ref = store.StoreRef(self.directory, self.run)
        #: The pickled value of every kept call, by key.
        self.kept: dict[str, bytes] = {}
        #: Calls served from the store, and calls sent to the workers, by this executor.
        self.served = 0
        self.sent = 0
        self._key = b""
        self._keys: weakref.WeakKeyDictionary[Future[Any], str] = weakref.WeakKeyDictionary()
        self._wrappers: weakref.WeakKeyDictionary[Any, Callable[..., Any]] = weakref.WeakKeyDictionary()
        self._wait_limit = wait_limit

    # -- opening -------------------------------------------------------------------------------
    def open(self) -> None:
        """Take the sweep over and read its store; wait for the calls a previous run still runs."""
        d = shlex.quote(self.directory)
        script = (
            f"umask 077\nd={d}\n"
            'mkdir -p -m 700 -- "$d/records" && cd -- "$d" || exit 3\n'
            # a new sweep's key is this client's (on stdin); ln: the first of two clients wins
            "if [ ! -f key ]; then cat > key.$$ && ln key.$$ key 2>/dev/null; rm -f key.$$; fi\n"
            f"printf '%s\\n' {shlex.quote(self.run)} > lease.$$ && mv -f lease.$$ lease || exit 3\n"
            "printf 'K %s\\n' \"$(cat key)\"\n" + LISTING.replace("FILES", "records/*.log")
        )
        done = self.session.shell.run(script, stdin=secrets.token_hex(32).encode(), timeout=300)
        first, _, listing = done.stdout.partition("\n")
        if done.returncode != 0 or not re.fullmatch(r"K [0-9a-f]{64}", first):
            raise ConfigurationError(
                f"sweep={self.name!r}: cannot open its store {self.directory} on "
                f"{self.session.shell.description}: {(done.stderr or done.stdout).strip()[-500:]}; "
                "check that you can write the session root (session_root=)"
            )
        self._key = first[2:].encode()
        running = self._take(listing)
        deadline = time.monotonic() + self._wait_limit
        while running:
            alive = self._alive(running)
            if not alive:
                break  # their workers are gone: those calls run again here
            if time.monotonic() > deadline:
                log.warning("sweep %s: %d call(s) of a previous run still running; running them again",
                            self.name, sum(len(k) for k in alive.values()))  # fmt: skip
                break
            log.warning(
                "sweep %s: waiting for %d call(s) a previous run of it still runs (workers %s)",
                self.name, sum(len(k) for k in alive.values()), ", ".join(sorted(alive)),
            )  # fmt: skip
            time.sleep(WAIT_POLL_SECONDS)
            running = self._take(self._list(sorted(alive)))
        log.info("sweep %s: %d kept result(s) in %s", self.name, len(self.kept), self.directory)

    def _list(self, workers: Sequence[str]) -> str:
        """The listing of these workers' records files."""
        files = " ".join(shlex.quote(f"{self.directory}/{store.RECORDS}/{w}.log") for w in workers)
        done = self.session.shell.run(LISTING.replace("FILES", files), timeout=300)
        return done.stdout

    def _take(self, listing: str) -> dict[str, set[str]]:
        """Keep the results of a listing; return the calls started and not ended there, by worker."""
        running: dict[str, set[str]] = {}
        for name, lines in store.sections(listing):
            started: set[str] = set()
            for number, text in enumerate(lines, 1):
                try:
                    record = store.parse(self._key, text)
                except store.BadRecord as bad:
                    raise SweepStoreRefused(
                        f"sweep {self.name!r}: record {number} of {self.directory}/{store.RECORDS}/{name} "
                        f"on {self.session.shell.description} is refused ({bad}): the file was corrupted "
                        "or replaced, and nothing of it was unpickled. Remove that file (its calls run "
                        f"again) or the whole sweep (sheepdog-executor cleanup --sweep {self.name} HOST)"
                    ) from None
                if record.kind == store.STARTED:
                    started.add(record.key)
                else:
                    started.discard(record.key)
                    if record.kind == store.RETURNED:
                        self.kept[record.key] = record.data
            started -= self.kept.keys()
            match = _WORKER_FILE.fullmatch(name)
            if started and match:
                running[name[: -len(".log")]] = started
        return running

    def _alive(self, running: dict[str, set[str]]) -> dict[str, set[str]]:
        """Of these workers (``JOB.TASK.PID``), those whose task still runs."""
        tasks = {}
        for worker in running:
            match = _WORKER_FILE.fullmatch(worker + ".log")
            if match:
                tasks[worker] = (match.group(1), int(match.group(2)), int(match.group(3)))
        if isinstance(self.session.scheduler, LocalScheduler):
            return {w: running[w] for w, (_, _, pid) in tasks.items() if _pid_runs(pid)}
        try:
            states = self.session.scheduler.poll(sorted({job for job, _, _ in tasks.values()}))
        except PollFailed as exc:  # asked again at the next look; until then, alive
            log.debug("sweep %s: polling the previous run's tasks: %s", self.name, exc)
            return running
        return {w: running[w] for w, (job, task, _) in tasks.items() if task in states.get(job, {})}

    # -- calls ----------------------------------------------------------------------------------
    def split(
        self,
        fn: Callable[..., Any],
        arguments: Sequence[tuple[Any, dict[str, Any] | None]],
        futures: Sequence[Future[Any]],
    ) -> tuple[Callable[..., Any], list[tuple[Any, dict[str, Any]]], list[Future[Any]]]:
        """Resolve the calls whose result is kept; return the rest as calls of ``fn``'s wrapper
        (which keeps their values), with their Futures."""
        digest = function_digest(fn)
        rest: list[tuple[Any, dict[str, Any]]] = []
        waiting: list[Future[Any]] = []
        for (args, kwargs), future in zip(arguments, futures, strict=True):
            key = call_key(digest, args, kwargs)
            data = self.kept.get(key)
            if data is None:
                self._keys[future] = key
                rest.append(((key, args, kwargs or _NO_KWARGS), _NO_KWARGS))
                waiting.append(future)
            elif future.set_running_or_notify_cancel():
                self.served += 1
                try:
                    future.set_result(pickle.loads(data))
                except Exception as exc:  # noqa: BLE001 - e.g. a module missing here
                    future.set_exception(
                        RemoteCallError(f"a kept result could not be unpickled here: {exc!r}")
                    )
        self.sent += len(rest)
        return self._wrapper(fn), rest, waiting

    def _wrapper(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` as the workers run it in this sweep (one object per function: pickled once)."""
        try:
            known = self._wrappers.get(fn)
        except TypeError:
            known = None
        if known is not None:
            return known
        wrapper = partial(store.kept_call, fn, self.ref)
        try:
            self._wrappers[fn] = wrapper
        except TypeError:
            pass
        return wrapper

    def recover(self, worker: str, items: list[WorkItem]) -> list[tuple[WorkItem, bytes]]:
        """Of the calls a lost worker held, those it kept before it went, with their values."""
        keys = {item.id: self._keys.get(item.future) for item in items}
        if not any(keys.values()):
            return []
        found: dict[str, bytes] = {}
        try:
            for _, lines in store.sections(self._list([worker])):
                for text in lines:
                    try:
                        record = store.parse(self._key, text)
                    except store.BadRecord:
                        continue  # not served: the call is lost, as without a store
                    if record.kind == store.RETURNED and record.run == self.run:
                        found[record.key] = record.data
        except Exception as exc:  # noqa: BLE001 - the calls are then lost, as without a store
            log.warning("sweep %s: could not read the results worker %s kept: %s", self.name, worker, exc)
            return []
        return [(item, found[key]) for item in items if (key := keys[item.id]) in found]

    # -- detached ---------------------------------------------------------------------------------
    def detach(self, max_workers: int) -> int:
        """Hand the calls no worker has taken to the cluster: written to the store as one queue,
        run by an array job of detached workers that claim its chunks from the shared filesystem
        and keep their results, with no client. Their Futures here end with ``SweepDetached``.
        Returns how many calls were handed over."""
        dispatcher = self.session.dispatcher
        items = dispatcher.take_pending()
        try:
            calls = [(item.args[0], item.fn_key, pickling.dumps(item.arguments())) for item in items]
            functions = {key: dispatcher.function_blob(key) for key in {fn_key for _, fn_key, _ in calls}}
            if calls:
                self._hand_over(calls, functions, max_workers)
        except BaseException as exc:
            dispatcher.fail_items(items, exc)
            raise
        gone = SweepDetached(
            f"handed to the cluster by detach(): an executor with sweep={self.name!r} gets its result "
            "with attach()"
        )
        dispatcher.fail_items(items, gone, "cancelled")
        return len(calls)

    def _hand_over(
        self, calls: list[tuple[str, str, bytes]], functions: dict[str, bytes], workers: int
    ) -> None:
        run, shell = self.run, self.session.shell
        chunk = max(1, math.ceil(len(calls) / (workers * 4)))
        blob = pickle.dumps({"run": run, "chunk": chunk, "functions": functions, "calls": calls}, protocol=5)
        jobs = f"{self.directory}/jobs-{run}"
        q = shlex.quote
        done = shell.run(
            f"umask 077 && cd {q(self.directory)} && mkdir -p {store.DETACHED} && mkdir claims-{q(run)} "
            f"{q(jobs)} && cp {q(self.session.launch.bundle_path)} {q(jobs)}/bundle.zip",
            timeout=120,
        )
        if done.returncode != 0:
            raise ConfigurationError(
                f"sweep {self.name!r}: cannot prepare its detached run in {self.directory}: "
                f"{done.stderr.strip()[-500:]}"
            )
        queue = f"{self.directory}/{store.DETACHED}/{run}"
        shell.put(queue, store.sign_queue(self._key, blob), 0o600)
        shell.put(f"{queue}.keys", "".join(f"{key}\n" for key, _, _ in calls).encode(), 0o600)
        launch = WorkerLaunch(
            jobs, store.DETACHED_URL + queue, None, bundle_sha256=self.session.launch.bundle_sha256
        )
        job = self.session.scheduler.submit(launch, min(workers, math.ceil(len(calls) / chunk)))
        log.info("sweep %s: %d call(s) handed to the cluster, job %s", self.name, len(calls), job)

    def detached_calls(self) -> list[tuple[Callable[..., Any], Any, dict[str, Any]]]:
        """Every call ever handed to the cluster in this sweep, in order: (function, args, kwargs)."""
        listing = self.session.shell.run(
            f"cd {shlex.quote(self.directory)}/{store.DETACHED} 2>/dev/null || exit 0\n"
            'for f in *; do case $f in *.keys) continue ;; esac; [ -f "$f" ] || continue\n'
            '  printf "%s " "$f" && base64 -w0 < "$f" && echo\ndone',
            timeout=300,
        )
        found = []
        for line in sorted(listing.stdout.splitlines()):
            name, _, data = line.partition(" ")
            try:
                queue = store.read_queue(self._key, base64.b64decode(data))
            except (store.BadRecord, ValueError) as exc:
                raise SweepStoreRefused(
                    f"sweep {self.name!r}: the detached queue {self.directory}/{store.DETACHED}/{name} is "
                    f"refused ({exc}): nothing of it was unpickled; remove it or the sweep"
                ) from None
            wrappers = {key: pickle.loads(blob) for key, blob in queue["functions"].items()}
            for _, fn_key, payload in queue["calls"]:
                (_key, args, kwargs), _ = pickle.loads(payload)
                found.append((wrappers[fn_key].args[0], args, kwargs))
        return found


def open_sweep(session: Session, name: str, wait_limit: float) -> Sweep:
    """Open sweep ``name`` for ``session``'s executor (see ``Sweep.open``)."""
    sweep = Sweep(session, name, wait_limit)
    sweep.open()
    session.dispatcher.recover = sweep.recover
    return sweep


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
