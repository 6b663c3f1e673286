"""Tornado's HTTP server, hardened for an endpoint anyone on the network can connect to.

* Out of file descriptors (``EMFILE``/``ENFILE``), Tornado's accept handler raises, the listening
  socket stays readable and the IOLoop spins, logging a traceback per turn. Here accepting pauses
  instead, with a growing delay (up to a second), and one warning per minute says so.
* A connection that has not authenticated a request (see ``trust``) within
  ``FIRST_REQUEST_SECONDS`` of being accepted is closed, and of such connections at most
  ``MAX_SILENT_CONNECTIONS`` are kept (the oldest is closed for each new one): connections of people
  without the secret, idle or not, cannot hold the descriptors the workers need nor make the client
  hold more than that many header blocks (16 KiB each). A worker's keep-alive connection is trusted
  from its first signed request on and never closed for this.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import tornado.httpserver
import tornado.httputil
import tornado.ioloop
import tornado.iostream

log = logging.getLogger("sheepdog_executor")

#: How long a new connection may go without an authenticated request.
FIRST_REQUEST_SECONDS = 10.0
#: How many connections without an authenticated request are kept at most (the oldest goes first).
MAX_SILENT_CONNECTIONS = 256
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


def trust(stream: Any) -> None:
    """Exempt a connection from the deadline and the cap: it carried an authenticated request."""
    stream.sheepdog_trusted = True


class HTTPServer(tornado.httpserver.HTTPServer):
    """``tornado.httpserver.HTTPServer`` with the accept back-off, and the deadline and the cap for
    connections that have not authenticated a request."""

    def initialize(self, *args: Any, **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        #: Connections accepted in the last ``FIRST_REQUEST_SECONDS``, oldest first.
        self._silent: OrderedDict[int, tornado.iostream.IOStream] = OrderedDict()

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = _Accepting(sock, self._handle_connection).remove

    def handle_stream(self, stream: tornado.iostream.IOStream, address: tuple[Any, ...]) -> None:
        super().handle_stream(stream, address)
        silent = self._silent
        silent[id(stream)] = stream
        while len(silent) > MAX_SILENT_CONNECTIONS:
            oldest = silent.popitem(last=False)[1]
            if not getattr(oldest, "sheepdog_trusted", False):
                oldest.close()  # closing a closed stream does nothing
        tornado.ioloop.IOLoop.current().call_later(FIRST_REQUEST_SECONDS, self._deadline, stream)

    def _deadline(self, stream: tornado.iostream.IOStream) -> None:
        if self._silent.pop(id(stream), None) is not None and not getattr(stream, "sheepdog_trusted", False):
            stream.close()
