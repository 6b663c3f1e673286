"""The worker: runs in each array task, pulls calls from the client's endpoint and posts results back.

Started as ``python bundle.zip URL SECRET_FILE`` (see ``__main__.py`` in the bundle). It says hello
(its Python version, host and task), runs the initializer, then loops: post the results it has and
receive the next calls, until the client tells it to stop. A thread sends heartbeats meanwhile.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import itertools
import os
import pickle
import socket
import ssl
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable
from typing import Any

from sheepdog_executor.remote import protocol, store
from sheepdog_executor.remote.budget import Budget, explain_memory_error
from sheepdog_executor.remote.compat import add_note
from sheepdog_executor.remote.reach import (
    EXIT_CLIENT_UNREACHABLE,
    MAX_BACKOFF_SECONDS,
    ROUTES_FILE,
    Reach,
    Watchdog,
)

#: At most this much of each of a call's stdout and stderr (the end of it) travels back with its result.
OUTPUT_LIMIT = 64 * 1024
#: At least this long a sweep's worker whose results are all kept in the store waits for a client
#: gone silent before it leaves (else ``disconnect_tolerance``).
STORE_PATIENCE_SECONDS = 15.0
#: Seconds to open a connection (a route that drops packets is left soon), and to wait for an answer
#: (longer than the endpoint's long poll).
CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 60.0


class Refused(Exception):
    """The client answered, but not with a signed body: wrong secret, or not our client."""


class ClientUnreachable(Exception):
    """The client has not answered for longer than ``disconnect_tolerance``."""


class Channel:
    """Signed HTTP requests to the client's endpoint over one keep-alive connection."""

    def __init__(self, reach: Reach | str, secret: bytes, fingerprint: str | None = None) -> None:
        #: The routes to the client and the time since it answered (shared with other channels).
        self.reach = reach if isinstance(reach, Reach) else Reach(reach)
        self._fingerprint = fingerprint
        self._secret = secret
        self._conn: http.client.HTTPConnection | None = None
        self._url = ""  # the route self._conn goes to
        self._lock = threading.Lock()

    def _connect(self) -> http.client.HTTPConnection:
        self._url = self.reach.current[1]
        parts = urllib.parse.urlsplit(self._url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._tls = parts.scheme == "https"
        if self._tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # pinned by fingerprint below instead
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self._host, self._port, timeout=CONNECT_TIMEOUT, context=context
            )
            conn.connect()
            der = conn.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
            if hashlib.sha256(der or b"").hexdigest() != self._fingerprint:
                conn.close()
                raise Refused("the endpoint's TLS certificate is not the client's")
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=CONNECT_TIMEOUT)
            conn.connect()
        conn.sock.settimeout(REQUEST_TIMEOUT)  # type: ignore[union-attr]
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
        return conn

    def call(
        self, path: str, message: Any, attempts: int | None = None, patience: float | None = None
    ) -> Any:
        """Send a message and return the client's signed answer. Failed attempts move on to the
        next route and back off; with ``attempts`` None they go on until the client has been out of
        reach for longer than the tolerance, or ``patience`` when given (``ClientUnreachable``).
        A hello says which route it took."""
        body = protocol.dumps(message)
        refusals = 0
        with self._lock:
            for attempt in itertools.count():
                try:
                    if self._conn is not None and not self.reach.follow(self._url):
                        self.close()  # the relay moved: whoever holds its old port is not our client
                    if self._conn is None:
                        self._conn = self._connect()
                    if path == "/hello":
                        body = protocol.dumps({**message, "route": self.reach.current[0]})
                    header, nonce = protocol.sign_request(self._secret, "POST", path, body)
                    self._conn.request(
                        "POST",
                        path,
                        body=body,
                        headers={protocol.AUTH_HEADER: header, "Content-Type": "application/octet-stream"},
                    )
                    data = self._read_answer(self._conn.getresponse(), path, nonce)
                except (OSError, http.client.HTTPException) as exc:
                    self._failed(attempt, attempts, exc, patience)
                    continue
                except Refused as refused:
                    # not our client at this address: another route may lead to it, or, once we
                    # reached it, the route may come back (a port someone took while the relay moved)
                    refusals += 1
                    if not self.reach.reached and refusals >= len(self.reach.routes):
                        self.close()  # whatever is left of its answer stays unread
                        raise
                    self._failed(attempt, attempts, refused, patience)
                    continue
                self.reach.contacted()
                return protocol.loads(data)
        raise AssertionError("unreachable")

    def _read_answer(self, response: http.client.HTTPResponse, path: str, nonce: str) -> bytearray:
        """The body of a signed answer. Its auth header is checked against its Content-Length before
        any body byte is read; of an answer that fails (or of any non-200 one) at most
        ``UNSIGNED_READ_LIMIT`` is read and dropped (the caller then closes the connection). A signed
        body is hashed as it comes and refused unless it is the one that was signed."""
        length = protocol.parse_length(response.getheader("Content-Length"))
        header = response.getheader(protocol.AUTH_HEADER)
        digest = None
        if response.status == 200 and length is not None:
            digest = protocol.check_response_headers(self._secret, nonce, header, length)
        if digest is None or length is None:
            said = response.read(protocol.UNSIGNED_READ_LIMIT)
            if response.status != 200:
                raise Refused(f"{path}: HTTP {response.status} {said[:200]!r}")
            raise Refused(f"{path}: response not signed with our secret")
        body = bytearray(length)
        view = memoryview(body)
        check = hashlib.sha256()
        received = 0
        while received < length:
            count = response.readinto(view[received : received + 1024 * 1024])
            if not count:
                raise http.client.IncompleteRead(b"", length - received)
            check.update(view[received : received + count])
            received += count
        if not hmac.compare_digest(check.hexdigest(), digest):
            raise Refused(f"{path}: response body is not the one signed with our secret")
        return body

    def _failed(
        self, attempt: int, attempts: int | None, exc: Exception, patience: float | None = None
    ) -> None:
        """After a failed attempt: drop the connection, move to the next route, pause after a round
        over all of them; raise when out of attempts or past the tolerance."""
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self.reach.last_error = str(exc)
        tried_all = self.reach.move_on(self._url)
        if attempts is not None and attempt + 1 >= attempts:
            raise exc
        if self.reach.gave_up() or (
            patience is not None and (self.reach.silent_for() > patience or store.superseded())
        ):
            raise ClientUnreachable(
                f"the client was unreachable for {self.reach.silent_for():.0f} s "
                f"(disconnect_tolerance {self.reach.tolerance:.0f} s): {exc}"
            ) from exc
        if tried_all:
            time.sleep(min(2 ** min(attempt, 6), MAX_BACKOFF_SECONDS))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None


class Capture:
    """Captures what a call writes to file descriptors 1 and 2, so ``print``, ``os.write``,
    subprocesses and C code are all seen; stdout and stderr are kept apart. Each goes to an
    unlinked file (disk, not memory); only the last ``OUTPUT_LIMIT`` bytes of each travel. The
    task's shell made those files (``SHEEPDOG_CAPTURE_FDS``), so that it can still print what the
    calls wrote if this process dies under them (see ``jobscript.worker_command``); between
    replies they are empty."""

    def __init__(self) -> None:
        self._files = _inherited_scratch() or (self._scratch(), self._scratch())

    @staticmethod
    def _scratch() -> int:
        fd, path = tempfile.mkstemp(prefix="sheepdog-output-")
        os.unlink(path)
        return fd

    def __enter__(self) -> Capture:
        _flush_std()
        self._saved = (os.dup(1), os.dup(2))
        for target in (1, 2):
            scratch = self._files[target - 1]
            os.ftruncate(scratch, 0)
            os.lseek(scratch, 0, os.SEEK_SET)
            os.dup2(scratch, target)
        return self

    def __exit__(self, *exc: object) -> None:
        _flush_std()
        for target in (1, 2):
            os.dup2(self._saved[target - 1], target)
            os.close(self._saved[target - 1])
            os.ftruncate(self._files[target - 1], 0)  # a death between replies tells no old story

    def mark(self) -> tuple[int, int]:
        """Where stdout and stderr are now: many calls share one capture, each its own stretch."""
        _flush_std()
        return os.lseek(self._files[0], 0, os.SEEK_CUR), os.lseek(self._files[1], 0, os.SEEK_CUR)

    def since(self, mark: tuple[int, int]) -> tuple[str, str, tuple[int, int]]:
        """(stdout, stderr) written since ``mark`` (their last ``OUTPUT_LIMIT`` bytes each), and
        the mark of now."""
        now = self.mark()
        return _tail(self._files[0], mark[0], now[0]), _tail(self._files[1], mark[1], now[1]), now


def _inherited_scratch() -> tuple[int, int] | None:
    """The two files the task's shell opened for the captured stdout and stderr, if it did."""
    try:
        fds = tuple(int(fd) for fd in os.environ.get("SHEEPDOG_CAPTURE_FDS", "").split(","))
        if len(fds) != 2 or min(fds) < 3:
            return None
        for fd in fds:
            os.fstat(fd)
            os.set_inheritable(fd, False)  # not into the calls' subprocesses
    except (ValueError, OSError):
        return None
    return fds[0], fds[1]


def enable_crash_reports() -> None:
    """On a fatal signal (SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL), write the Python traceback of
    the crashing thread to the task's stderr file, not to a call's captured stderr: a copy of
    descriptor 2 as it is before any call runs."""
    import faulthandler

    faulthandler.enable(file=os.dup(2), all_threads=False)


def _flush_std() -> None:
    try:
        sys.stdout.flush()
    except (AttributeError, OSError, ValueError):
        pass
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass


def _tail(fd: int, begin: int = 0, end: int | None = None) -> str:
    """The last ``OUTPUT_LIMIT`` bytes of ``fd`` between ``begin`` and ``end`` (its size)."""
    end = os.fstat(fd).st_size if end is None else end
    if end <= begin:
        return ""
    start = max(begin, end - OUTPUT_LIMIT)
    text = os.pread(fd, end - start, start).decode("utf-8", errors="replace")
    return f"[... {start - begin} bytes left out]\n{text}" if start > begin else text


def _where() -> str:
    return f"host {socket.gethostname()}, Python {sys.version.split()[0]} at {sys.executable}"


def explain_missing_module(error: BaseException, what: str) -> None:
    """Say where a module is missing and what to set, when ``error`` is a missing module."""
    if isinstance(error, ModuleNotFoundError):
        add_note(
            error,
            f"sheepdog: {what}: module {error.name!r} is not importable on the nodes ({_where()}); "
            "install it there, use an interpreter that has it (python=, or setup= lines such as "
            "'source /path/to/venv/bin/activate' or 'module load ...'), or ship this client's "
            'packages with environment="sync"',
        )


def run_items(
    items: list[tuple[Any, ...]],
    functions: dict[str, Callable[..., Any]],
    capture: Capture,
    budget: Budget | None = None,
) -> list[protocol.Result]:
    """Run a reply's calls (``protocol.Item``) under one capture (entering it costs a dozen system
    calls: per call, it would cost more than a small call itself); each call's output is its own
    stretch of it. With a ``budget``, stop before a call that would not end before the task's time
    does: the calls not run are the ones without a result (the client queues them again)."""
    results = []
    new_result, clock = protocol.new_result, time.perf_counter
    with capture:
        mark = capture.mark()
        for item_id, attempt, fn_key, payload in items:  # a ``protocol.Item`` as sent
            if budget is not None and not budget.fits(fn_key):
                break  # it retires; a fresh task takes this call and the rest
            started = clock()
            ok, data = call(functions[fn_key], payload)
            out, err, mark = capture.since(mark)
            seconds = clock() - started
            if budget is not None:
                budget.ran(fn_key, seconds)
            results.append(new_result((item_id, attempt, ok, data, out, seconds, err, 0)))
    return results


def run_chunk(fn: Callable[..., Any], calls: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
    """A map's chunk (``chunksize``), shipped as ``functools.partial(run_chunk, fn)``: the results
    of its calls in order (as ``concurrent.futures.process._process_chunk``)."""
    return [fn(*args, **kwargs) for args, kwargs in calls]


def call(fn: Callable[..., Any], payload: bytes) -> tuple[bool, bytes]:
    """Run one call; return (ok, pickled value or error).

    Whatever the call raises, BaseException included (KeyboardInterrupt, SystemExit), is the call's
    result, as with ProcessPoolExecutor: only the worker's death is a lost worker."""
    try:
        try:
            arguments = pickle.loads(payload)
        except BaseException as exc:
            explain_missing_module(exc, "an argument of the call could not be unpickled")
            raise
        args, kwargs = arguments
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            if not getattr(exc, "__notes__", None):
                explain_missing_module(exc, "the call failed to import a module")
            explain_memory_error(exc)
            raise
        return True, _dump_value(value)
    except BaseException as exc:  # noqa: BLE001 - all of it goes back to the client
        return False, _dump_error(exc)


def send_in_parts(
    channel: Channel, worker_id: str, results: list[protocol.Result], part_bytes: int
) -> list[protocol.Result]:
    """Send the pickled values that would make the /work body larger than ``part_bytes`` to /part,
    in pieces of at most that size; their results then carry the pickled size (``parted``) instead."""
    inline = 0
    sent: list[protocol.Result] = []
    for result in results:
        data = result.data
        if inline + len(data) <= part_bytes:
            inline += len(data)
            sent.append(result)
            continue
        view = memoryview(data)
        for offset in range(0, len(data), part_bytes):
            part = {"worker": worker_id, "item": result.item, "attempt": result.attempt, "offset": offset}
            reply = channel.call(
                "/part", {**part, "total": len(data), "data": bytes(view[offset : offset + part_bytes])}
            )
            if not reply.get("kept", True):  # refused (too large for the client): the rest would be too
                break
        sent.append(result._replace(data=b"", parted=len(data)))
    return sent


def load_function(blob: bytes) -> Callable[..., Any]:
    """Unpickle a function; one that cannot be loaded here becomes a function raising why."""
    try:
        return pickle.loads(blob)  # type: ignore[no-any-return]
    except Exception as exc:  # noqa: BLE001 - e.g. a module the nodes do not have
        if isinstance(exc, ModuleNotFoundError):
            explain_missing_module(exc, "the function could not be unpickled")
        else:
            add_note(
                exc,
                f"sheepdog: the function could not be unpickled on the nodes ({_where()}); the "
                "nodes' packages differ from this client's: match them (python=, setup=)",
            )
        error = exc

        def unloadable(*args: Any, **kwargs: Any) -> Any:
            raise error

        return unloadable


_PLAIN = (int, float, str, bytes, bool, type(None))


def _dump_value(value: Any) -> bytes:
    if type(value) in _PLAIN:  # the C pickler is several times faster than cloudpickle's
        return pickle.dumps(value, protocol=protocol.PICKLE_PROTOCOL)
    import cloudpickle

    return cloudpickle.dumps(value, protocol=protocol.PICKLE_PROTOCOL)


def _dump_error(exc: BaseException) -> bytes:
    """An exception as a pickled ``protocol.Error`` (a plain tuple)."""
    import cloudpickle

    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    tb = "".join(traceback.format_exception(kind, exc, exc.__traceback__))
    try:
        message = str(exc)
    except Exception as failed:  # noqa: BLE001 - a broken __str__ must not lose the rest
        message = f"(str() of the exception failed: {failed!r})"
    exc.__traceback__ = None
    try:
        blob: bytes | None = cloudpickle.dumps(exc, protocol=protocol.PICKLE_PROTOCOL)
    except Exception:  # the exception itself does not pickle: its text goes alone
        blob = None
    return pickle.dumps(tuple(protocol.Error(blob, tb, name, message)), protocol=protocol.PICKLE_PROTOCOL)


class Heartbeat(threading.Thread):
    """Tells the client every few seconds that this worker is alive."""

    def __init__(self, channel: Channel, worker_id: str, interval: float) -> None:
        super().__init__(name="sheepdog-heartbeat", daemon=True)
        self._channel, self._worker_id, self._interval = channel, worker_id, interval
        self.stopped = threading.Event()

    def run(self) -> None:
        heartbeat_channel = self._channel
        while not self.stopped.wait(self._interval):
            try:
                heartbeat_channel.call("/heartbeat", {"worker": self._worker_id}, attempts=1)
            except Exception:  # a missed beat is fine; the client decides what silence means
                pass
        heartbeat_channel.close()


def worker_identity() -> dict[str, Any]:
    # set by the job script of every scheduler (jobscript.render_script) and by LocalScheduler
    job = os.environ.get("SHEEPDOG_JOB_ID") or "local"
    task = os.environ.get("SHEEPDOG_TASK_ID", "1")
    task = task if task.isdigit() else "1"
    return {
        "job": job,
        "task": int(task),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "python": list(sys.version_info[:3]),
        "worker": store.worker_name(),  # also its records file's name in a sweep's store
        # the resource set the task's job was submitted for: the worker takes its calls only
        "resources": os.environ.get("SHEEPDOG_RESOURCE_SET", ""),
    }


def main(url: str, secret_file: str, fingerprint: str | None = None) -> int:
    if url.startswith(store.DETACHED_URL):  # a detached sweep's task: no client (store.run_detached)
        return store.run_detached(url[len(store.DETACHED_URL) :])
    try:
        return serve(url, secret_file, fingerprint)
    except ClientUnreachable as exc:  # the watchdog may not have seen it yet: same end
        sys.stderr.write(f"sheepdog worker: {exc}; exiting\n")
        return EXIT_CLIENT_UNREACHABLE


def _run_initializer(channel: Channel, worker_id: str, blob: bytes) -> bool:
    """Run the client's initializer; on an error, tell the client (no call can run here) and
    return False."""
    try:
        initializer, initargs = pickle.loads(blob)
        initializer(*initargs)
    except BaseException as exc:  # noqa: BLE001
        channel.call("/work", {"worker": worker_id, "results": [], "fatal": _dump_error(exc)})
        traceback.print_exc()
        return False
    return True


def _work_request(worker_id: str, wire: list[Any], request: int, retire: bool) -> dict[str, Any]:
    """The message of a ``/work`` request: the results, numbered (a retry keeps its number); a
    retiring worker's calls with no result go back to the queue, and it gets a stop."""
    message: dict[str, Any] = {"worker": worker_id, "results": wire, "request": request}
    if retire:
        message["retire"] = True
    return message


def serve(url: str, secret_file: str, fingerprint: str | None = None) -> int:
    with open(secret_file, "rb") as handle:
        secret = handle.read().strip()
    for stream in (sys.stdout, sys.stderr):  # keeps a call's print()s in order with its os.write()s
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    reach = Reach(url, os.path.join(os.path.dirname(secret_file), ROUTES_FILE))
    Watchdog(reach).start()
    channel = Channel(reach, secret, fingerprint)
    identity = worker_identity()
    worker_id = identity["worker"]
    hello = channel.call("/hello", identity)
    if hello.get("error"):
        sys.stderr.write(f"sheepdog worker: {hello['error']}\n")
        return 3
    if hello.get("disconnect_tolerance"):
        reach.set_tolerance(hello["disconnect_tolerance"])
    if hello.get("initializer") and not _run_initializer(channel, worker_id, hello["initializer"]):
        return 4
    heartbeat = Heartbeat(Channel(reach, secret, fingerprint), worker_id, hello.get("heartbeat", 5.0))
    heartbeat.start()
    functions: dict[str, Callable[..., Any]] = {}
    capture = Capture()
    results: list[protocol.Result] = []
    request = 0
    part_bytes = hello.get("part_bytes")
    budget = Budget.from_environment()
    bounded = budget if budget.bounded else None  # nothing to check per call without a limit
    retire = False
    # a sweep's worker whose results are all kept in its store leaves soon when its client is gone
    kept_patience = max(3 * float(hello.get("heartbeat", 5.0)), STORE_PATIENCE_SECONDS)
    kept_before = 0
    try:
        while True:
            if part_bytes:
                results = send_in_parts(channel, worker_id, results, part_bytes)
            request += 1  # a retry of the same request keeps its number
            wire = [r.wire() for r in results]
            kept = store.records_written()
            patience = kept_patience if kept and kept - kept_before == len(results) else None
            reply = channel.call("/work", _work_request(worker_id, wire, request, retire), None, patience)
            results = []
            kept_before = kept
            if reply.get("stop"):
                return 0
            for key, blob in reply.get("functions", {}).items():
                functions[key] = load_function(blob)
            if reply.get("items"):
                results = run_items(reply["items"], functions, capture, bounded)
                retire = len(results) < len(reply["items"])
    finally:
        # joined, not abandoned: a daemon thread inside an SSL call while the interpreter shuts
        # down can crash it (SIGBUS seen here), which would look like a lost task
        heartbeat.stopped.set()
        heartbeat.join(timeout=30)
        channel.close()
