"""The client's HTTP endpoint, on a Tornado IOLoop in its own thread.

Workers POST signed, pickled messages: ``/hello``, ``/work`` (results in, next calls out; long-polls
while there is nothing to hand out) and ``/heartbeat``. A request whose MAC does not check out gets
403 and is never unpickled; every answer is signed for the request's nonce.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from datetime import timedelta
from typing import Any

import tornado.httpserver
import tornado.ioloop
import tornado.locks
import tornado.netutil
import tornado.web

from sheepdog_executor.dispatch import Dispatcher
from sheepdog_executor.remote import protocol

log = logging.getLogger("sheepdog_executor")

#: How long a /work request waits for calls before answering "nothing yet".
LONG_POLL_SECONDS = 20.0


class _Signed(tornado.web.RequestHandler):
    """Authenticates every request before its body is looked at; signs every answer."""

    endpoint: Endpoint
    nonce: str

    def initialize(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def prepare(self) -> None:
        request = self.request
        nonce = protocol.check_request(
            self.endpoint.secret,
            request.headers.get(protocol.AUTH_HEADER),
            request.method or "",
            request.path,
            request.body,
        )
        if nonce is None or not self.endpoint.fresh_nonce(nonce):
            self.endpoint.refused += 1
            raise tornado.web.HTTPError(403)
        self.nonce = nonce
        try:
            self.message: Any = protocol.loads(request.body)
        except Exception as exc:  # signed but unreadable: a bug or a worker of another version
            raise tornado.web.HTTPError(400) from exc
        if not isinstance(self.message, dict):
            raise tornado.web.HTTPError(400)

    def reply(self, message: dict[str, Any]) -> None:
        body = protocol.dumps(message)
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header(protocol.AUTH_HEADER, protocol.sign_response(self.endpoint.secret, self.nonce, body))
        self.finish(body)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.finish(f"{status_code}\n")

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if not isinstance(value, tornado.web.HTTPError):
            super().log_exception(typ, value, tb)


class _Hello(_Signed):
    def post(self) -> None:
        self.reply(self.endpoint.dispatcher.hello(self.message))


class _Heartbeat(_Signed):
    def post(self) -> None:
        known = self.endpoint.dispatcher.heartbeat_from(str(self.message.get("worker")))
        self.reply({"known": known})


class _Work(_Signed):
    async def post(self) -> None:
        dispatcher = self.endpoint.dispatcher
        worker = str(self.message.get("worker"))
        reply = dispatcher.exchange(worker, list(self.message.get("results", [])), self.message.get("fatal"))
        deadline = time.monotonic() + LONG_POLL_SECONDS
        while reply is None and time.monotonic() < deadline:
            await self.endpoint.work_available.wait(timeout=timedelta(seconds=0.5))
            reply = dispatcher.exchange(worker, [])
        self.reply(reply if reply is not None else {"items": []})


class Endpoint:
    """The Tornado application and its IOLoop thread."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        secret: bytes,
        address: str = "0.0.0.0",
        port: int = 0,
        max_body_size: int = 1024 * 1024 * 1024,
    ) -> None:
        self.dispatcher = dispatcher
        self.secret = secret
        self.refused = 0
        self._nonces: dict[str, float] = {}
        self._address, self._port, self._max_body = address, port, max_body_size
        self._loop: tornado.ioloop.IOLoop | None = None
        self._server: tornado.httpserver.HTTPServer | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sheepdog-endpoint", daemon=True)
        self.work_available: tornado.locks.Condition
        self.port = 0

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
                ]
            )
            sockets = tornado.netutil.bind_sockets(self._port, self._address, family=socket.AF_INET)
            self.port = sockets[0].getsockname()[1]
            self._server = tornado.httpserver.HTTPServer(
                app, max_body_size=self._max_body, idle_connection_timeout=3600
            )
            self._server.add_sockets(sockets)
        except BaseException as exc:  # noqa: BLE001 - reported to start()'s caller
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.start()
        self._loop.close(all_fds=True)

    def _notify_work(self) -> None:
        loop = self._loop
        if loop is not None:
            try:
                loop.add_callback(self.work_available.notify_all)
            except RuntimeError:  # loop closed during shutdown
                pass

    def fresh_nonce(self, nonce: str) -> bool:
        """True the first time a nonce is seen: a replayed request is refused."""
        now = time.monotonic()
        if nonce in self._nonces:
            return False
        self._nonces[nonce] = now
        if len(self._nonces) > 100_000:
            horizon = now - 2 * protocol.MAX_SKEW_SECONDS
            self._nonces = {n: t for n, t in self._nonces.items() if t > horizon}
        return True

    def stop(self) -> None:
        loop = self._loop
        if loop is None or not self._thread.is_alive():
            return

        async def _shutdown() -> None:
            if self._server is not None:
                self._server.stop()
                await self._server.close_all_connections()
            loop.stop()

        loop.add_callback(_shutdown)
        self._thread.join(timeout=10)
