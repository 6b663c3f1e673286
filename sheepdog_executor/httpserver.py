"""Tornado's HTTP server, hardened for an endpoint anyone on the network can connect to.

* Out of file descriptors (``EMFILE``/``ENFILE``), Tornado's accept handler raises, the listening
  socket stays readable and the IOLoop spins, logging a traceback per turn. Here accepting pauses
  instead, with a growing delay (up to a second), and one warning per minute says so.
* A connection that has not sent a request's headers within ``FIRST_REQUEST_SECONDS`` of being
  accepted is closed, so that idle ("half-open") connections cannot hold the descriptors the workers
  need. Keep-alive connections of workers, once they sent a request, are not affected.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import tornado.httpserver
import tornado.httputil
import tornado.ioloop
import tornado.iostream

log = logging.getLogger("sheepdog_executor")

#: How long a new connection may stay silent before its first request's headers are in.
FIRST_REQUEST_SECONDS = 10.0
#: At most one warning about running out of descriptors per this many seconds.
WARN_INTERVAL_SECONDS = 60.0
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_BACKLOG = 128


class _Accepting:
    """The accept handler of one listening socket: like ``tornado.netutil.add_accept_handler``, but
    it stops reading the socket for a while when the process is out of file descriptors."""

    def __init__(self, sock: socket.socket, callback: Callable[[socket.socket, Any], None]) -> None:
        self.sock, self.callback = sock, callback
        self.loop = tornado.ioloop.IOLoop.current()
        self.removed = False
        self.delay = 0.0
        self.refusals = 0
        self.warned = -WARN_INTERVAL_SECONDS
        self.loop.add_handler(sock, self._accept, tornado.ioloop.IOLoop.READ)

    def _accept(self, fd: Any, events: int) -> None:
        for _ in range(_BACKLOG):
            if self.removed:
                return
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in _OUT_OF_DESCRIPTORS:
                    raise
                self._pause(exc)
                return
            self.delay = 0.0
            self.callback(connection, address)

    def _pause(self, exc: OSError) -> None:
        """Stop reading the listening socket, and read it again after a delay that doubles while
        descriptors stay short (0.05 s to 1 s)."""
        self.refusals += 1
        now = time.monotonic()
        if now - self.warned >= WARN_INTERVAL_SECONDS:
            log.warning(
                "endpoint: out of file descriptors (%s): new connections wait (%d time(s) in the last "
                "%d s); raise the limit (ulimit -n) if this is not an attack",
                errno.errorcode.get(exc.errno or 0, exc.errno),
                self.refusals,
                WARN_INTERVAL_SECONDS,
            )
            self.warned, self.refusals = now, 0
        self.delay = min(max(self.delay * 2, 0.05), 1.0)
        self.loop.remove_handler(self.sock)
        self.loop.call_later(self.delay, self._resume)

    def _resume(self) -> None:
        if not self.removed:
            self.loop.add_handler(self.sock, self._accept, tornado.ioloop.IOLoop.READ)

    def remove(self) -> None:
        if not self.removed:
            self.removed = True
            self.loop.remove_handler(self.sock)


class _Marks(tornado.httputil.HTTPMessageDelegate):
    """Passes a request on, noting on its stream that a request arrived (see ``HTTPServer``)."""

    def __init__(self, inner: tornado.httputil.HTTPMessageDelegate, stream: Any) -> None:
        self.inner, self.stream = inner, stream

    def headers_received(
        self,
        start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
        headers: tornado.httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        self.stream.sheepdog_requested = True
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        self.inner.finish()

    def on_connection_close(self) -> None:
        self.inner.on_connection_close()


class HTTPServer(tornado.httpserver.HTTPServer):
    """``tornado.httpserver.HTTPServer`` with the accept back-off and the first-request deadline."""

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = _Accepting(sock, self._handle_connection).remove

    def handle_stream(self, stream: tornado.iostream.IOStream, address: tuple[Any, ...]) -> None:
        super().handle_stream(stream, address)
        tornado.ioloop.IOLoop.current().call_later(FIRST_REQUEST_SECONDS, _close_if_silent, stream)

    def start_request(
        self, server_conn: object, request_conn: tornado.httputil.HTTPConnection
    ) -> tornado.httputil.HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        stream = getattr(request_conn, "stream", None)
        if stream is None or getattr(stream, "sheepdog_requested", False):
            return delegate  # a keep-alive connection that was marked already: nothing more to do
        return _Marks(delegate, stream)


def _close_if_silent(stream: tornado.iostream.IOStream) -> None:
    if not getattr(stream, "sheepdog_requested", False) and not stream.closed():
        stream.close()
