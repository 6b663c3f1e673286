"""The worker: runs in each array task, pulls calls from the client's endpoint and posts results back.

Started as ``python bundle.zip URL SECRET_FILE`` (see ``__main__.py`` in the bundle). It says hello
(its Python version, host and task), runs the initializer, then loops: post the results it has and
receive the next calls, until the client tells it to stop. A thread sends heartbeats meanwhile.
"""

from __future__ import annotations

import http.client
import io
import os
import pickle
import socket
import ssl
import sys
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

from sheepdog_executor.remote import protocol

#: At most this much of a call's captured stdout/stderr travels back with its result.
OUTPUT_LIMIT = 64 * 1024


class Refused(Exception):
    """The client answered, but not with a signed body: wrong secret, or not our client."""


class Channel:
    """Signed HTTP requests to the client's endpoint over one keep-alive connection."""

    def __init__(self, url: str, secret: bytes, fingerprint: str | None = None) -> None:
        parts = urllib.parse.urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._tls = parts.scheme == "https"
        self._fingerprint = fingerprint
        self._secret = secret
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def _connect(self) -> http.client.HTTPConnection:
        if self._tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # pinned by fingerprint below instead
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self._host, self._port, timeout=120, context=context
            )
            conn.connect()
            der = conn.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
            import hashlib

            if hashlib.sha256(der or b"").hexdigest() != self._fingerprint:
                conn.close()
                raise Refused("the endpoint's TLS certificate is not the client's")
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=120)
            conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
        return conn

    def call(self, path: str, message: Any, attempts: int = 5) -> Any:
        body = protocol.dumps(message)
        with self._lock:
            for attempt in range(attempts):
                try:
                    if self._conn is None:
                        self._conn = self._connect()
                    header, nonce = protocol.sign_request(self._secret, "POST", path, body)
                    self._conn.request(
                        "POST",
                        path,
                        body=body,
                        headers={protocol.AUTH_HEADER: header, "Content-Type": "application/octet-stream"},
                    )
                    response = self._conn.getresponse()
                    data = response.read()
                except (OSError, http.client.HTTPException):
                    if self._conn is not None:
                        self._conn.close()
                    self._conn = None
                    if attempt == attempts - 1:
                        raise
                    time.sleep(min(2**attempt, 10))
                    continue
                if response.status != 200:
                    raise Refused(f"{path}: HTTP {response.status} {data[:200]!r}")
                if not protocol.check_response(
                    self._secret, nonce, data, response.getheader(protocol.AUTH_HEADER)
                ):
                    raise Refused(f"{path}: response not signed with our secret")
                return protocol.loads(data)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _tail(text: str) -> str:
    return text if len(text) <= OUTPUT_LIMIT else "[...]\n" + text[-OUTPUT_LIMIT:]


def run_item(fn: Callable[..., Any], kind: str, payload: bytes) -> tuple[bool, bytes, str]:
    """Run one call (or one chunk of calls); return (ok, pickled value or error, captured output)."""
    captured = io.StringIO()
    try:
        arguments = pickle.loads(payload)
        with redirect_stdout(captured), redirect_stderr(captured):
            if kind == "chunk":
                value: Any = [fn(*args, **kwargs) for args, kwargs in arguments]
            else:
                args, kwargs = arguments
                value = fn(*args, **kwargs)
        return True, _dump_value(value), _tail(captured.getvalue())
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - everything else a call raises goes back to the client
        return False, _dump_error(exc), _tail(captured.getvalue())


def load_function(blob: bytes) -> Callable[..., Any]:
    """Unpickle a function; one that cannot be loaded here becomes a function raising why."""
    try:
        return pickle.loads(blob)  # type: ignore[no-any-return]
    except Exception as exc:  # noqa: BLE001 - e.g. a module the nodes do not have
        exc.add_note(
            "sheepdog: the function could not be unpickled on the node; a module it needs is not "
            "importable there: install it on the nodes, or make it importable (setup=, python=)"
        )
        error = exc

        def unloadable(*args: Any, **kwargs: Any) -> Any:
            raise error

        return unloadable


def _dump_value(value: Any) -> bytes:
    import cloudpickle

    return cloudpickle.dumps(value, protocol=protocol.PICKLE_PROTOCOL)


def _dump_error(exc: BaseException) -> bytes:
    import cloudpickle

    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    exc.__traceback__ = None
    try:
        return cloudpickle.dumps((exc, tb), protocol=protocol.PICKLE_PROTOCOL)
    except Exception:  # the exception itself does not pickle: send its text
        return cloudpickle.dumps((None, tb), protocol=protocol.PICKLE_PROTOCOL)


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
    job = os.environ.get("JOB_ID") or os.environ.get("SHEEPDOG_JOB_ID", "local")
    task = os.environ.get("SGE_TASK_ID", os.environ.get("SHEEPDOG_TASK_ID", "1"))
    task = task if task.isdigit() else "1"
    return {
        "job": job,
        "task": int(task),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "python": list(sys.version_info[:3]),
        "worker": f"{job}.{task}.{os.getpid()}",
    }


def main(url: str, secret_file: str, fingerprint: str | None = None) -> int:
    with open(secret_file, "rb") as handle:
        secret = handle.read().strip()
    channel = Channel(url, secret, fingerprint)
    identity = worker_identity()
    worker_id = identity["worker"]
    hello = channel.call("/hello", identity)
    if hello.get("error"):
        sys.stderr.write(f"sheepdog worker: {hello['error']}\n")
        return 3
    if hello.get("initializer"):
        try:
            initializer, initargs = pickle.loads(hello["initializer"])
            initializer(*initargs)
        except BaseException as exc:  # noqa: BLE001
            channel.call("/work", {"worker": worker_id, "results": [], "fatal": _dump_error(exc)})
            traceback.print_exc()
            return 4
    heartbeat = Heartbeat(Channel(url, secret, fingerprint), worker_id, hello.get("heartbeat", 5.0))
    heartbeat.start()
    functions: dict[str, Callable[..., Any]] = {}
    results: list[tuple[int, int, bool, bytes, str, float]] = []
    try:
        while True:
            reply = channel.call("/work", {"worker": worker_id, "results": results})
            results = []
            if reply.get("stop"):
                return 0
            for key, blob in reply.get("functions", {}).items():
                functions[key] = load_function(blob)
            for item_id, attempt, fn_key, kind, payload in reply.get("items", []):
                started = time.perf_counter()
                ok, data, output = run_item(functions[fn_key], kind, payload)
                results.append((item_id, attempt, ok, data, output, time.perf_counter() - started))
    finally:
        # joined, not abandoned: a daemon thread inside an SSL call while the interpreter shuts
        # down can crash it (SIGBUS seen here), which would look like a lost task
        heartbeat.stopped.set()
        heartbeat.join(timeout=30)
        channel.close()
