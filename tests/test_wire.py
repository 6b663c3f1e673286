"""The worker's side of the wire against whoever answers on its port: no cell, a hostile HTTP server on
loopback in this process. A worker reads nothing of an answer the client did not sign beyond
``protocol.UNSIGNED_READ_LIMIT``, whatever the answer claims, and its memory does not grow."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from pathlib import Path

import pytest

from sheepdog_executor.dispatch import Dispatcher
from sheepdog_executor.remote import protocol, worker
from sheepdog_executor.remote.reach import Reach
from sheepdog_executor.server import Endpoint
from sheepdog_executor.tls import make_certificate

SECRET = os.urandom(32).hex().encode()
CLAIMED = 2 * 1024**3  # what the hostile answers claim: 2 GiB
#: The hostile server stops sending after this much (so that a worker that reads everything, as
#: before, costs this test 256 MiB and not 2 GiB); a worker that stops at the cap never gets near it.
SENT_AT_MOST = 256 * 1024**2
#: What may leave the server although the worker stopped reading: the cap plus socket buffers.
SENT_LIMIT = 32 * 1024**2


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Hostile:
    """Answers every request on loopback with ``head`` and then streams zeros, up to
    ``SENT_AT_MOST`` bytes or until the reader goes away; counts the body bytes it got out."""

    def __init__(self, head: bytes, chunked: bool = False) -> None:
        self.head, self.chunked = head, chunked
        self.sent = 0
        self.done = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(30)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, name="hostile-server", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            self.done.set()
            return
        with conn:
            conn.settimeout(30)
            try:
                while b"\r\n\r\n" not in (request := conn.recv(65536)):  # headers; the body follows
                    if not request:
                        return
                conn.sendall(self.head)
                block = b"\0" * 65536
                if self.chunked:
                    block = b"10000\r\n" + block + b"\r\n"
                while self.sent < SENT_AT_MOST:
                    conn.sendall(block)
                    self.sent += len(block)
            except OSError:  # the worker closed the connection: what we hoped for
                pass
            finally:
                self.done.set()

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=30)


MADE_UP = f"{protocol.AUTH_HEADER}: {'0' * 64}:{'1' * 64}"
HEADS = {
    "unsigned 200": f"HTTP/1.1 200 OK\r\nContent-Length: {CLAIMED}\r\n{MADE_UP}\r\n\r\n",
    "no auth header": f"HTTP/1.1 200 OK\r\nContent-Length: {CLAIMED}\r\n\r\n",
    "error status": f"HTTP/1.1 500 Internal Server Error\r\nContent-Length: {CLAIMED}\r\n\r\n",
    "chunked": "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    "until close": "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
}


@pytest.mark.parametrize("kind", list(HEADS))
def test_an_unsigned_huge_answer_is_refused_having_read_at_most_the_cap(kind: str) -> None:
    hostile = Hostile(HEADS[kind].encode(), chunked=kind == "chunked")
    channel = worker.Channel(Reach(f"http://127.0.0.1:{hostile.port}"), SECRET)
    before = rss()
    try:
        with pytest.raises(worker.Refused, match="HTTP 500" if kind == "error status" else "not signed"):
            channel.call("/work", {"worker": "w", "results": []}, attempts=1)
        grown = rss() - before
        assert hostile.done.wait(30), "the worker kept the connection open"
    finally:
        channel.close()
        hostile.close()
    assert hostile.sent < SENT_LIMIT, f"{hostile.sent} bytes left the hostile server"
    assert grown < SENT_LIMIT, f"the worker grew by {grown} bytes"


def test_a_body_other_than_the_signed_one_is_refused() -> None:
    """A header signed for the request (as a relay passing traffic on could replay it only for the
    same nonce) with another body of the same length: refused once the body is read and hashed."""
    signed_body = protocol.dumps({"items": []})
    other = b"X" * len(signed_body)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(30)
    port = server.getsockname()[1]

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            auth = next(
                line.split(b": ", 1)[1].decode()
                for line in request.split(b"\r\n")
                if line.lower().startswith(protocol.AUTH_HEADER.lower().encode())
            )
            nonce = auth.split(":")[1]
            header = protocol.sign_response(SECRET, nonce, signed_body)
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(other)}\r\n{protocol.AUTH_HEADER}: {header}"
            conn.sendall(head.encode() + b"\r\n\r\n" + other)

    thread = threading.Thread(target=answer, name="replacing-server", daemon=True)
    thread.start()
    channel = worker.Channel(Reach(f"http://127.0.0.1:{port}"), SECRET)
    try:
        with pytest.raises(worker.Refused, match="not the one signed"):
            channel.call("/work", {"worker": "w", "results": []}, attempts=1)
    finally:
        channel.close()
        thread.join(timeout=30)
        server.close()


def test_response_header_covers_nonce_length_and_digest() -> None:
    body = b"reply"
    header = protocol.sign_response(SECRET, "n" * 32, body)
    digest = hashlib.sha256(body).hexdigest()
    assert protocol.check_response_headers(SECRET, "n" * 32, header, len(body)) == digest
    assert protocol.check_response_headers(SECRET, "m" * 32, header, len(body)) is None  # nonce
    assert protocol.check_response_headers(SECRET, "n" * 32, header, len(body) + 1) is None  # length
    forged = hashlib.sha256(b"other").hexdigest() + header[64:]
    assert protocol.check_response_headers(SECRET, "n" * 32, forged, len(body)) is None  # digest
    assert protocol.check_response_headers(b"other secret", "n" * 32, header, len(body)) is None
    for junk in (None, "", "é" * 129, header + "0", header.upper()):
        assert protocol.check_response_headers(SECRET, "n" * 32, junk, len(body)) is None


def test_the_tunnel_listener_speaks_tls_with_the_pinned_certificate_and_the_main_one_stays_plain() -> None:
    certificate = make_certificate()
    endpoint = Endpoint(Dispatcher(), SECRET, address="127.0.0.1", tunnel_ssl=certificate.server_context())
    endpoint.start()
    try:
        assert (endpoint.scheme, endpoint.tunnel_scheme) == ("http", "https")
        for url, fingerprint in (
            (f"https://127.0.0.1:{endpoint.tunnel_port}", certificate.fingerprint),
            (f"http://127.0.0.1:{endpoint.port}", None),
        ):
            channel = worker.Channel(url, SECRET, fingerprint)
            assert channel.call("/heartbeat", {"worker": "w"}, attempts=1) == {"known": False}
            channel.close()
        plain = worker.Channel(f"http://127.0.0.1:{endpoint.tunnel_port}", SECRET)
        with pytest.raises(OSError):  # plain HTTP to the tunnel's listener gets nowhere
            plain.call("/heartbeat", {}, attempts=1)
    finally:
        endpoint.stop()
