"""The client's HTTP endpoint, on a Tornado IOLoop in its own thread.

Workers POST signed, pickled messages: ``/hello``, ``/work`` (results in, next calls out; long-polls
while there is nothing to hand out) and ``/heartbeat``. A request whose MAC does not check out gets
403 and is never unpickled; every answer is signed for the request's nonce.

Bad input only ever gets a 4xx and changes nothing: a request's MAC (over its length and body
digest) is checked from its headers before its body is read, so the body of a request that is not
authenticated is never kept (at most 64 KiB of it is read), bodies are capped per path (413), a wrong
method gets 405, an unknown path 404, an authenticated message of the wrong shape 400. With an
``ssl.SSLContext`` the endpoint speaks TLS; with ``tunnel_ssl`` only a second listener on loopback
does, the one the SSH tunnel delivers to.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import pickle
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import tornado.httpserver
import tornado.ioloop
import tornado.locks
import tornado.netutil
import tornado.web

from sheepdog_executor import httpserver
from sheepdog_executor.away import TICK_SECONDS
from sheepdog_executor.dispatch import Dispatcher
from sheepdog_executor.errors import ConfigurationError, RemoteCallError
from sheepdog_executor.httpserver import HTTPServer
from sheepdog_executor.remote import protocol
from sheepdog_executor.remote.protocol import Error, Result

log = logging.getLogger("sheepdog_executor")

#: How long a /work request waits for calls before answering "nothing yet".
LONG_POLL_SECONDS = 20.0


#: Body cap of /hello and /heartbeat (and of anything else): their messages are tiny.
SMALL_BODY_LIMIT = 64 * 1024
#: A worker sends a pickled result larger than this (or one that would take its /work body past
#: it) to /part in pieces of at most this size, joined here: results of any size travel, and no
#: request carries more than this. Read when an Endpoint is made (tests make it smaller).
RESULT_PART_BYTES = 64 * 1024 * 1024
#: Parts of a result whose worker never sent the rest (it died meanwhile) are dropped after this.
PARTS_KEPT_SECONDS = 3600.0


def available_memory() -> int:
    """Bytes of memory this machine can still give (MemAvailable; else the free pages)."""
    try:
        with open("/proc/meminfo", "rb") as meminfo:
            for line in meminfo:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ResultParts:
    """Results that arrive in parts (``/part``), joined into one buffer each until the worker's
    ``/work`` names them: client memory is the pickled result's size, plus one part in flight.

    A result's claimed size is checked against ``limit()`` (default: the memory still available
    here, less what buffers already promised but not yet filled) before its buffer is made; one
    beyond is refused, and its call fails saying why. A lost worker's parts are freed at once
    (``forget``). Called from the endpoint's thread and the job manager's: hence the lock."""

    def __init__(self, limit: Callable[[], int] | None = None) -> None:
        self._limit = limit or available_memory
        self._lock = threading.Lock()
        #: (worker, item, attempt) -> (buffer, {offset: length received}, last part's time)
        self._results: dict[tuple[str, int, int], tuple[bytearray, dict[int, int], float]] = {}
        #: results refused as too large -> why (for the call's error)
        self._refused: dict[tuple[str, int, int], str] = {}
        #: workers declared lost: a part they still send is not kept
        self._lost: set[str] = set()

    def add(self, worker: str, item: int, attempt: int, offset: int, total: int, data: bytes) -> bool:
        """Keep one part; False when it does not fit the result it belongs to, the result is larger
        than the limit, or its worker was declared lost."""
        now = time.monotonic()
        key = (worker, item, attempt)
        with self._lock:
            if worker in self._lost or key in self._refused:
                return False
            if key not in self._results:
                self._results = {k: v for k, v in self._results.items() if now - v[2] < PARTS_KEPT_SECONDS}
                promised = sum(len(b) - sum(r.values()) for b, r, _ in self._results.values())
                room = self._limit() - promised
                if total > room:  # refused before anything is allocated
                    self._refused[key] = (
                        f"sheepdog: the call's result ({total} bytes pickled) is larger than the client "
                        f"can take ({max(room, 0)} bytes of memory available there); return less "
                        "(e.g. write a large result to a shared file and return its path)"
                    )
                    return False
                self._results[key] = (bytearray(total), {}, now)
            buffer, received, _ = self._results[key]
            if len(buffer) != total or offset + len(data) > total:
                return False
            buffer[offset : offset + len(data)] = data
            received[offset] = len(data)  # a part sent again (its answer was lost) counts once
            self._results[key] = (buffer, received, now)
            return True

    def join(self, worker: str, result: Result) -> Result:
        """``result`` with its value joined from its parts when it says it was sent in parts
        (``parted``: the pickled size), or with an error saying what did not arrive."""
        if not result.parted:
            return result
        total = result.parted
        key = (worker, result.item, result.attempt)
        with self._lock:
            buffer, received, _ = self._results.pop(key, (bytearray(), {}, 0.0))
            refused = self._refused.pop(key, None)
        if len(buffer) == total and sum(received.values()) == total:
            return result._replace(data=buffer, parted=0)
        text = refused or (
            f"sheepdog: the call's result ({total} bytes pickled) reached the client incomplete "
            f"({sum(received.values())} bytes)"
        )
        error = Error(pickle.dumps(RemoteCallError(text)), text, "sheepdog_executor.RemoteCallError", text)
        return result._replace(ok=False, data=pickle.dumps(tuple(error)), parted=0)

    def forget(self, worker: str) -> None:
        """Free the parts of a worker declared lost; parts it still sends are not kept."""
        with self._lock:
            self._lost.add(worker)
            self._results = {k: v for k, v in self._results.items() if k[0] != worker}
            self._refused = {k: v for k, v in self._refused.items() if k[0] != worker}

    def held(self) -> int:
        """Bytes of the buffers held for results not yet joined."""
        with self._lock:
            return sum(len(buffer) for buffer, _, _ in self._results.values())


class _Quiet(tornado.web.RequestHandler):
    """Errors are a bare status line: no banner, no traceback, no log line per refused request."""

    def set_default_headers(self) -> None:
        self.clear_header("Server")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.finish(f"{status_code}\n")

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if not isinstance(value, tornado.web.HTTPError):
            super().log_exception(typ, value, tb)


class _Signed(_Quiet):
    """Authenticates every request from its headers before reading its body; signs every answer.

    ``prepare`` checks the auth header's MAC, which covers the method, path, declared Content-Length
    and the body's SHA-256, and the nonce, before any body byte is read: a request that fails gets
    403 and at most ``SMALL_BODY_LIMIT`` of its body is read (dropped as it comes, then the connection
    is closed); one that declares more than the path allows gets 413. Only then is the body streamed
    in, hashed as it arrives, and refused (403) if it is not the body that was signed.
    """

    endpoint: Endpoint
    nonce: str
    message: dict[str, Any]

    def initialize(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._chunks: list[bytes] = []
        self._size = 0
        self._length = 0
        self._digest = ""
        self._hash = hashlib.sha256()

    def body_limit(self) -> int:
        return SMALL_BODY_LIMIT

    def prepare(self) -> None:
        connection = self.request.connection
        connection.set_max_body_size(SMALL_BODY_LIMIT)  # type: ignore[union-attr] # until verified
        if self.request.method != "POST":
            raise tornado.web.HTTPError(405)
        headers = self.request.headers
        length = protocol.parse_length(headers.get("Content-Length"))
        if length is None:  # absent (chunked), several, or not ASCII digits
            raise tornado.web.HTTPError(411 if "Content-Length" not in headers else 400)
        auth = protocol.check_request_headers(
            self.endpoint.secret, headers.get(protocol.AUTH_HEADER), "POST", self.request.path, length
        )
        if auth is None or not self.endpoint.fresh_nonce(auth.nonce):
            self.endpoint.refused += 1
            raise tornado.web.HTTPError(403)
        httpserver.trust(connection.stream)  # type: ignore[union-attr]
        if length > self.body_limit():
            raise tornado.web.HTTPError(413)
        self.nonce, self._digest, self._length = auth.nonce, auth.digest, length
        connection.set_max_body_size(length)  # type: ignore[union-attr]

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._length:  # cannot happen with a Content-Length; kept as a guard
            raise tornado.web.HTTPError(413)
        self._hash.update(chunk)
        self._chunks.append(chunk)

    def authenticate(self, valid: Any) -> None:
        """Check the body against the signed digest (403), unpickle (400) and check the shape (400)."""
        body = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        self._chunks = []
        if self._size != self._length or not hmac.compare_digest(self._hash.hexdigest(), self._digest):
            self.endpoint.refused += 1
            raise tornado.web.HTTPError(403)
        try:
            message = protocol.loads(body)
        except Exception as exc:  # signed but unreadable: a bug or a worker of another version
            raise tornado.web.HTTPError(400) from exc
        if not isinstance(message, dict) or not valid(message):
            raise tornado.web.HTTPError(400)
        self.message = message

    def reply(self, message: dict[str, Any]) -> None:
        body = protocol.dumps(message)
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header(protocol.AUTH_HEADER, protocol.sign_response(self.endpoint.secret, self.nonce, body))
        self.finish(body)


def _is_worker(message: dict[str, Any]) -> bool:
    return isinstance(message.get("worker"), str)


def _is_hello(message: dict[str, Any]) -> bool:
    python = message.get("python", [])
    return (
        _is_worker(message)
        and isinstance(message.get("job", ""), (str, int))
        and type(message.get("task", 0)) is int
        and isinstance(message.get("host", ""), str)
        and isinstance(message.get("resources", ""), str)
        and isinstance(python, (list, tuple))
        and all(type(v) is int for v in python)
    )


def _is_part(message: dict[str, Any]) -> bool:
    fields = [message.get(name) for name in ("item", "attempt", "offset", "total")]
    return (
        _is_worker(message)
        and all(type(value) is int and value >= 0 for value in fields)
        and type(message.get("data")) is bytes
    )


def _is_work(message: dict[str, Any]) -> bool:
    """A /work message of good shape; its results are read into ``protocol.Result`` on the way."""
    results = message.get("results", [])
    if not (_is_worker(message) and isinstance(message.get("fatal"), (bytes, type(None)))):
        return False
    if type(message.get("request", 0)) is not int:
        return False
    if type(message.get("retire", False)) is not bool:
        return False
    if not isinstance(results, list):
        return False
    parsed = [protocol.parse_result(r) for r in results]
    if None in parsed:
        return False
    message["results"] = parsed
    return True


@tornado.web.stream_request_body
class _Hello(_Signed):
    def post(self) -> None:
        self.authenticate(_is_hello)
        reply = self.endpoint.dispatcher.hello(self.message)
        self.reply({**reply, "part_bytes": self.endpoint.part_bytes})


@tornado.web.stream_request_body
class _Part(_Signed):
    """One part of a result too large for one request (see ``RESULT_PART_BYTES``)."""

    def body_limit(self) -> int:
        return self.endpoint.part_bytes + SMALL_BODY_LIMIT

    def post(self) -> None:
        self.authenticate(_is_part)
        m = self.message
        parts = self.endpoint.parts
        kept = parts.add(m["worker"], m["item"], m["attempt"], m["offset"], m["total"], m["data"])
        # signed, unlike a 413, which a worker would take for someone else's port and retry
        self.reply({"kept": kept})


@tornado.web.stream_request_body
class _Heartbeat(_Signed):
    def post(self) -> None:
        self.authenticate(_is_worker)
        known = self.endpoint.dispatcher.heartbeat_from(self.message["worker"])
        self.reply({"known": known})


@tornado.web.stream_request_body
class _Work(_Signed):
    _gone = False

    def body_limit(self) -> int:
        return self.endpoint.max_body_size

    def on_connection_close(self) -> None:
        self._gone = True

    async def post(self) -> None:
        self.authenticate(_is_work)
        dispatcher = self.endpoint.dispatcher
        worker = self.message["worker"]
        results = [self.endpoint.parts.join(worker, r) for r in self.message.get("results", [])]
        request = self.message.get("request")
        retire = self.message.get("retire", False)
        reply = dispatcher.exchange(worker, results, self.message.get("fatal"), request, retire)
        deadline = time.monotonic() + LONG_POLL_SECONDS
        # stop waiting when the worker's connection is gone (a dropped tunnel, a killed task):
        # calls handed to a reply nobody reads would wait for a worker that never gets them
        while reply is None and not self._gone and time.monotonic() < deadline:
            await self.endpoint.work_available.wait(timeout=timedelta(seconds=0.5))
            if not self._gone:
                reply = dispatcher.exchange(worker, [])
        if not self._gone:
            self.reply(reply if reply is not None else {"items": []})


class _NotFound(_Quiet):
    """Every other path."""

    def prepare(self) -> None:
        raise tornado.web.HTTPError(404)


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """Requests go to our logger: at DEBUG (one per worker exchange would flood INFO), refused ones
    counted at DEBUG too (a scan must not flood the user's log), server errors at ERROR."""
    status = handler.get_status()
    request = handler.request
    level = logging.ERROR if status >= 500 else logging.DEBUG
    log.log(
        level,
        "endpoint %d %s %s (%s) %.1f ms",
        status,
        request.method,
        request.path,
        request.remote_ip,
        1000 * request.request_time(),
    )


class Endpoint:
    """The Tornado application and its IOLoop thread."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        secret: bytes,
        address: str = "0.0.0.0",
        port: int = 0,
        max_body_size: int = 1024 * 1024 * 1024,
        ssl_context: ssl.SSLContext | None = None,
        routes: Sequence[tuple[Any, ...]] = (),
        tunnel_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.secret = secret
        #: Largest /work body (a worker's results); other paths take at most ``SMALL_BODY_LIMIT``.
        self.max_body_size = max_body_size
        #: Results larger than this come in parts of this size (told to workers in /hello).
        self.part_bytes = RESULT_PART_BYTES
        self.parts = ResultParts()
        self.refused = 0
        #: Called after the endpoint stopped, e.g. to close the tunnel that reaches it.
        self.on_stop: list[Callable[[], None]] = []
        self._nonces: dict[str, float] = {}
        self._pruned = time.monotonic()
        self._address, self._port, self._ssl = address, port, ssl_context
        #: With ``tunnel_ssl``, a second listener on loopback that speaks TLS, for the tunnel to
        #: deliver to (``tunnel_port``): the routes through the head node are encrypted even when
        #: the main listener (direct route, status page) is not.
        self._tunnel_ssl = tunnel_ssl
        self.tunnel_port = 0
        self._tunnel_server: HTTPServer | None = None
        #: More (pattern, handler, kwargs) for the Application, e.g. the status page's.
        self._routes = list(routes)
        self._loop: tornado.ioloop.IOLoop | None = None
        self._server: HTTPServer | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sheepdog-endpoint", daemon=True)
        self.work_available: tornado.locks.Condition
        self._wake_pending = False
        self.port = 0

    @property
    def scheme(self) -> str:
        return "https" if self._ssl is not None else "http"

    @property
    def tunnel_scheme(self) -> str:
        """The scheme of the routes through the tunnel (to ``tunnel_port`` when there is one)."""
        return "https" if self._tunnel_ssl is not None else self.scheme

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error
        dispatcher = self.dispatcher
        dispatcher.on_work = self._notify_work

    def _run(self) -> None:
        asyncio.set_event_loop(asyncio.new_event_loop())
        self._loop = tornado.ioloop.IOLoop.current()
        try:
            self.work_available = tornado.locks.Condition()
            app = tornado.web.Application(
                [
                    (r"/hello", _Hello, {"endpoint": self}),
                    (r"/work", _Work, {"endpoint": self}),
                    (r"/heartbeat", _Heartbeat, {"endpoint": self}),
                    (r"/part", _Part, {"endpoint": self}),
                    *self._routes,
                ],
                default_handler_class=_NotFound,
                log_function=_log_request,
            )
            try:
                sockets = tornado.netutil.bind_sockets(self._port, self._address, family=socket.AF_INET)
            except OSError as exc:
                raise ConfigurationError(
                    f"the endpoint cannot listen on {self._address}:{self._port} ({exc.strerror}); "
                    "set callback_address= to an address of this machine that the nodes can reach "
                    "(or callback_port= to a free port), or use callback='tunnel'"
                ) from exc
            self.port = sockets[0].getsockname()[1]
            self._server = self._http_server(app, self._ssl)
            self._server.add_sockets(sockets)
            if self._tunnel_ssl is not None:
                tunnel_sockets = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
                self.tunnel_port = tunnel_sockets[0].getsockname()[1]
                self._tunnel_server = self._http_server(app, self._tunnel_ssl)
                self._tunnel_server.add_sockets(tunnel_sockets)
        except BaseException as exc:  # noqa: BLE001 - reported to start()'s caller
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        # workers are heard in this loop: its ticks tell the job managers when it could not hear
        tornado.ioloop.PeriodicCallback(self.dispatcher.registry.hearing.tick, TICK_SECONDS * 1000).start()
        self._loop.start()
        self._loop.close(all_fds=True)

    @staticmethod
    def _http_server(app: tornado.web.Application, context: ssl.SSLContext | None) -> HTTPServer:
        return HTTPServer(
            app,
            ssl_options=context,
            max_body_size=SMALL_BODY_LIMIT,  # raised per request for /work
            max_header_size=16 * 1024,
            body_timeout=600,
            idle_connection_timeout=3600,
        )

    def _notify_work(self) -> None:
        """Wake the long-polling workers; many submits in a row cost one wake-up, not one each."""
        loop = self._loop
        if loop is None or self._wake_pending:
            return
        self._wake_pending = True
        try:
            loop.add_callback(self._wake_workers)
        except RuntimeError:  # loop closed during shutdown
            pass

    def _wake_workers(self) -> None:
        self._wake_pending = False
        self.work_available.notify_all()

    def fresh_nonce(self, nonce: str) -> bool:
        """True the first time a nonce is seen: a replayed request is refused."""
        now = time.monotonic()
        if nonce in self._nonces:
            return False
        self._nonces[nonce] = now
        if now - self._pruned > 60:  # older nonces carry timestamps check_request refuses anyway
            horizon = now - 2 * protocol.MAX_SKEW_SECONDS
            self._nonces = {n: t for n, t in self._nonces.items() if t > horizon}
            self._pruned = now
        return True

    def stop(self) -> None:
        loop = self._loop
        if loop is None or not self._thread.is_alive():
            return

        async def _shutdown() -> None:
            for server in (self._server, self._tunnel_server):
                if server is not None:
                    server.stop()
                    await server.close_all_connections()
            loop.stop()

        loop.add_callback(_shutdown)
        self._thread.join(timeout=10)
        for callback in self.on_stop:
            try:
                callback()
            except Exception as exc:  # noqa: BLE001 - the endpoint is down; what follows is best effort
                log.warning("after stopping the endpoint: %s", exc)
