"""The worker channel against other users and the network, on the real cell: only holders of the
executor's secret exchange calls and results, the secret stays private, the endpoint answers bad
input with 4xx and changes nothing (fuzzed with hypothesis), TLS is pinned by fingerprint."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import os
import pickle
import pwd
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import read_line, spawn, ssh

from sheepdog_executor import (
    ConfigurationError,
    GridEngineExecutor,
    WorkerStartFailed,
    cli,
    httpserver,
    server,
)
from sheepdog_executor.remote import protocol, worker
from sheepdog_executor.testing import internals

pytestmark = pytest.mark.cluster

AUTH = protocol.AUTH_HEADER


def square(x: int) -> int:
    return x * x


def slow_square(x: int) -> int:
    time.sleep(3)
    return x * x


class Client:
    """Requests to an endpoint at ``url``, as anybody on the network could send them (``secret``:
    what a holder of the executor's secret signs with)."""

    def __init__(self, url: str, secret: bytes) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.tls = parts.scheme == "https"
        self.secret = secret

    @classmethod
    def of(cls, executor: GridEngineExecutor) -> Client:
        """A client of ``executor``'s endpoint, by the URL its workers use."""
        inside = internals(executor)
        return cls(inside.launch.url, inside.endpoint.secret)

    def socket(self, timeout: float = 30) -> socket.socket:
        """A connected raw socket, TLS-wrapped when the endpoint speaks TLS."""
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        if not self.tls:
            return sock
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context.wrap_socket(sock)

    def connect(self, timeout: float = 30) -> http.client.HTTPConnection:
        if self.tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=context)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, str | None]:
        """(status, body, auth header of the answer)."""
        conn = self.connect()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read(), response.getheader(AUTH)
        finally:
            conn.close()

    def signed(self, path: str, body: bytes) -> tuple[int, bytes, str]:
        """POST a body signed with the secret: (status, body, our auth header); a 200 must come
        signed for our nonce."""
        header, nonce = protocol.sign_request(self.secret, "POST", path, body)
        status, data, signature = self.request("POST", path, body, {AUTH: header})
        if status == 200:
            assert protocol.check_response(self.secret, nonce, data, signature)
        return status, data, header

    def raw(self, data: bytes, patience: float = 2.0) -> bytes:
        """Send bytes as they are and return all the endpoint answers; end of file is sent only
        when it waits for more (an incomplete request), so that it is never cut short by it."""
        with socket.create_connection((self.host, self.port), timeout=patience) as sock:
            sock.sendall(data)
            reply = b""
            try:
                while chunk := sock.recv(65536):
                    reply += chunk
            except TimeoutError:
                sock.settimeout(10)
                sock.shutdown(socket.SHUT_WR)
                try:
                    while chunk := sock.recv(65536):
                        reply += chunk
                except ConnectionResetError:
                    pass
            except ConnectionResetError:
                pass
            return reply


State = tuple[set[str], set[tuple[str, int]], int]


def state(executor: GridEngineExecutor) -> State:
    """What bad input must not change: known workers, tasks that said hello, unresolved calls."""
    inside = internals(executor)
    return {w["id"] for w in executor.status()["workers"]}, set(inside.tasks_seen), inside.outstanding()


def plausible_header(mac_byte: str = "0") -> str:
    """Right shape and a fresh timestamp, but no knowledge of the secret: a genuine header's shape
    with its MAC replaced."""
    shape = protocol.sign_request(os.urandom(32), "POST", "/work", b"")[0]
    return shape.rsplit(":", 1)[0] + ":" + mac_byte * 64


def head(method: str, path: str, *lines: str, signed: bool = False) -> bytes:
    """The head of a raw HTTP/1.1 request; ``signed`` adds a plausible (not valid) auth header."""
    if signed:
        lines += (f"{AUTH}: {plausible_header()}",)
    text = "\r\n".join([f"{method} {path} HTTP/1.1", *lines, "", ""])
    try:
        return text.encode("latin-1")  # as http.client sends headers, and as Tornado decodes them
    except UnicodeEncodeError:
        return text.encode()


def wait_for(condition: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class RunsCommand:
    """Unpickling this runs a shell command: what an attacker would post."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def forged_requests(secret: bytes, pwned: Path) -> list[tuple[str, bytes, dict[str, str]]]:
    """(path, body, headers) of requests nobody without ``secret`` can make count: unsigned, made-up,
    wrongly keyed, signed for another path or body, an hour old; they post results for calls 1 to 3,
    and a pickle that would create ``pwned`` if it were ever loaded."""
    forged = protocol.dumps(
        {"worker": "intruder", "results": [(i, 1, True, pickle.dumps(666), "", 0.0) for i in (1, 2, 3)]}
    )
    evil = pickle.dumps(RunsCommand(f"touch {shlex.quote(str(pwned))}"))
    wrong_key = os.urandom(32).hex().encode()
    hello_header, _ = protocol.sign_request(secret, "POST", "/hello", forged)
    good_header, _ = protocol.sign_request(secret, "POST", "/work", forged)
    stale_ts, nonce = str(int(time.time()) - 3600), os.urandom(16).hex()
    digest = hashlib.sha256(forged).hexdigest()
    stale_mac = protocol._request_mac(secret, "POST", "/work", stale_ts, nonce, len(forged), digest)
    return [
        ("/work", forged, {}),  # no header at all
        ("/work", evil, {}),  # a pickle that runs a command, unsigned
        ("/work", evil, {AUTH: plausible_header()}),  # ... with a made-up MAC
        ("/hello", evil, {AUTH: "garbage"}),
        ("/work", forged, {AUTH: protocol.sign_request(wrong_key, "POST", "/work", forged)[0]}),
        ("/work", forged, {AUTH: hello_header}),  # signed for another path
        ("/work", forged + b"x", {AUTH: good_header}),  # body changed after signing
        ("/work", forged, {AUTH: f"{stale_ts}:{nonce}:{digest}:{stale_mac}"}),  # an hour old
        ("/heartbeat", evil, {AUTH: plausible_header("f")}),
    ]


def refuse_forged_and_replayed(client: Client, pwned: Path) -> int:
    """Send ``forged_requests`` and a genuine request replayed byte for byte: each gets a 403 with
    no signature. Returns how many requests were refused."""
    attempts = forged_requests(client.secret, pwned)
    for path, body, headers in attempts:
        status, data, signature = client.request("POST", path, body, headers)
        assert status == 403, (path, headers, status, data)
        assert signature is None
    heartbeat = protocol.dumps({"worker": "nobody"})
    status, data, header = client.signed("/heartbeat", heartbeat)
    assert status == 200 and pickle.loads(data) == {"known": False}
    assert client.request("POST", "/heartbeat", heartbeat, {AUTH: header})[0] == 403
    return len(attempts) + 1


# -- authentication -----------------------------------------------------------------------------


def test_unauthenticated_forged_and_replayed_requests_get_403_and_resolve_nothing(
    make_executor: Callable[..., GridEngineExecutor], tmp_path: Path
) -> None:
    # a held job: no real worker can take the calls while we try to resolve them
    executor = make_executor(max_workers=1, qsub_args=["-h"])
    futures = [executor.submit(square, x) for x in range(3)]
    job = wait_for(lambda: executor.job_ids, what="the held job")[0]
    client = Client.of(executor)
    before, refused = state(executor), internals(executor).endpoint.refused
    pwned = tmp_path / "pwned"
    sent = refuse_forged_and_replayed(client, pwned)
    assert internals(executor).endpoint.refused == refused + sent
    assert state(executor) == before
    assert not any(future.done() for future in futures)
    assert not pwned.exists(), "an unauthenticated pickle was loaded"
    # the real workers still get the calls, and only their results count
    assert ssh(f"qrls {job}").returncode == 0
    assert [future.result(timeout=120) for future in futures] == [0, 1, 4]


def test_duplicate_replayed_and_foreign_results_are_ignored(
    make_executor: Callable[..., GridEngineExecutor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real worker (run here, in a thread) posts results; its requests are recorded and played
    again: byte for byte (403), signed afresh with a different value (accepted, ignored), and as a
    second worker that does not hold the call (ignored)."""
    monkeypatch.setattr(server, "LONG_POLL_SECONDS", 1.0)
    executor = make_executor(max_workers=1, qsub_args=["-h"], idle_timeout=120)
    client = Client.of(executor)
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(client.secret)
    recorded: list[tuple[str, bytes, str]] = []
    sign = protocol.sign_request

    def recording(secret: bytes, method: str, path: str, body: bytes) -> tuple[str, str]:
        header, nonce = sign(secret, method, path, body)
        recorded.append((path, body, header))
        return header, nonce

    monkeypatch.setattr(protocol, "sign_request", recording)
    first = executor.submit(square, 12)
    runner = threading.Thread(
        target=worker.main, args=(internals(executor).launch.url, str(secret_file)), daemon=True
    )
    runner.start()
    assert first.result(timeout=60) == 144
    path, body, header = next(r for r in recorded if r[0] == "/work" and protocol.loads(r[1])["results"])

    assert client.request("POST", path, body, {AUTH: header})[0] == 403  # replay
    message = protocol.loads(body)
    result = list(message["results"][0])
    result[3] = cloudpickle.dumps(-1)
    message["results"] = [tuple(result)]
    status, _, _ = client.signed("/work", protocol.dumps(message))
    assert status == 200  # a duplicate from the worker itself: accepted, and ignored
    assert first.result() == 144

    # a second signed-in worker posts a result for a call the real worker is running
    hello = {"worker": "other.1.1", "job": "other", "task": 1, "host": "x", "pid": 1, "python": [3, 11]}
    assert client.signed("/hello", protocol.dumps(hello))[0] == 200
    second = executor.submit(slow_square, 5)
    item = wait_for(lambda: list(internals(executor).held_calls()), what="the call")[0]
    wait_for(lambda: internals(executor).held_calls()[item] not in (None, "other.1.1"), what="taken")
    foreign = dict(message, worker="other.1.1", results=[(item, 1, True, cloudpickle.dumps(-5), "", 0.0)])
    assert client.signed("/work", protocol.dumps(foreign))[0] == 200
    assert not second.done()
    assert second.result(timeout=60) == 25
    monkeypatch.setattr(protocol, "sign_request", sign)
    executor.shutdown(wait=True)
    runner.join(timeout=30)
    assert not runner.is_alive()


# -- bad input ----------------------------------------------------------------------------------


def test_malformed_truncated_oversized_and_wrong_method_get_4xx(
    make_executor: Callable[..., GridEngineExecutor],
) -> None:
    executor = make_executor()
    check_malformed_requests(Client.of(executor), lambda: state(executor))
    assert list(executor.map(square, range(10), timeout=120)) == [x * x for x in range(10)]


def check_malformed_requests(client: Client, state: Callable[[], State]) -> None:
    """Malformed, truncated, oversized requests, wrong methods and paths: each gets a 4xx (or the
    connection closed), and ``state()`` is what it was."""
    before = state()
    status_of = client.request

    # malformed HTTP
    assert client.raw(b"\x16\x03\x01garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert client.raw(head("POST", "/work")).startswith(b"HTTP/1.1 400")  # no Host
    for length in ("-5", "12abc", "1, 2"):
        reply = client.raw(head("POST", "/work", "Host: x", f"Content-Length: {length}", signed=True))
        assert reply.startswith(b"HTTP/1.1 400"), (length, reply[:40])
    # truncated: the connection ends inside the body (signed: anything else is refused at once)
    auth = protocol.sign_request(client.secret, "POST", "/work", b"x" * 1000)[0]
    request = head("POST", "/work", "Host: x", "Content-Length: 1000", f"{AUTH}: {auth}") + b"x" * 10
    assert client.raw(request) == b""  # nobody left to answer; nothing kept
    body = protocol.dumps({"worker": "w", "results": []})
    header, _ = protocol.sign_request(client.secret, "POST", "/work", body)
    assert status_of("POST", "/work", body[:-3], {AUTH: header})[0] == 403  # signed whole, sent cut
    # oversized: refused from the headers, before any body byte is sent; signed for that length by
    # a holder of the secret, 413; by anybody else, 403
    for path, size in (("/hello", server.SMALL_BODY_LIMIT + 1), ("/heartbeat", 10**7), ("/work", 2**40)):
        auth = protocol.sign_headers(client.secret, "POST", path, size, "0" * 64)[0]
        reply = client.raw(head("POST", path, "Host: x", f"Content-Length: {size}", f"{AUTH}: {auth}"))
        assert reply.startswith(b"HTTP/1.1 413"), (path, reply[:40])
        reply = client.raw(head("POST", path, "Host: x", f"Content-Length: {size}", signed=True))
        assert reply.startswith(b"HTTP/1.1 403"), (path, reply[:40])
    reply = client.raw(head("POST", "/work", "Host: x", f"Content-Length: {2**40}"))
    assert reply.startswith(b"HTTP/1.1 403"), reply[:40]  # and without auth, 403 before anything
    big = os.urandom(server.SMALL_BODY_LIMIT + 10)
    assert client.signed("/hello", big)[0] == 413
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in [b"y" * 30000] * 4) + b"0\r\n\r\n"
    reply = client.raw(head("POST", "/hello", "Host: x", "Transfer-Encoding: chunked", signed=True) + chunked)
    assert reply[:12] in (b"HTTP/1.1 413", b"HTTP/1.1 411", b"HTTP/1.1 400"), reply[:40]
    # an oversized header block: the connection is closed, nothing answered
    assert client.raw(head("POST", "/work", "Host: x", f"X-Pad: {'p' * 40000}")) == b""
    # wrong methods and paths
    for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS"):
        assert status_of(method, "/work", b"", {AUTH: header})[0] == 405, method
    assert client.raw(head("BREW", "/work", "Host: x")).startswith(b"HTTP/1.1 4")
    for path in ("/", "/admin", "/work/", "/hello/../work", "/%00"):
        assert status_of("POST", path, body, {AUTH: header})[0] == 404, path
    assert state() == before

    # authenticated, but not a message: 400 (a worker of another version, or a bug)
    for path, bad in (
        ("/work", b"not a pickle"),
        ("/work", protocol.dumps(["a", "list"])),
        ("/work", protocol.dumps({"worker": 7})),
        ("/work", protocol.dumps({"worker": "w", "results": [(1, 2, 3)]})),
        ("/work", protocol.dumps({"worker": "w", "results": [("1", 1, True, b"", "")]})),
        ("/work", protocol.dumps({"worker": "w", "results": [], "fatal": "text"})),
        ("/hello", protocol.dumps({"worker": "w", "task": "1"})),
        ("/hello", protocol.dumps({"worker": "w", "python": ["3"]})),
        ("/heartbeat", protocol.dumps({})),
    ):
        assert client.signed(path, bad)[0] == 400, (path, bad)
    assert state() == before


def test_fuzzed_requests_get_4xx_and_the_endpoint_keeps_working(
    make_executor: Callable[..., GridEngineExecutor],
) -> None:
    executor = make_executor()
    fuzz_requests(Client.of(executor), lambda: state(executor), examples=400)
    assert list(executor.map(square, range(20), timeout=120)) == [x * x for x in range(20)]


def _request_strategies() -> tuple[Any, Any, Any, Any]:
    """Hypothesis strategies for requests of anybody: methods, paths, auth headers, bodies."""
    known_paths = ["/hello", "/work", "/heartbeat", "/", "/work/", "/hello?x=1", "/heartbeat#x"]
    paths = st.one_of(
        st.sampled_from(known_paths),
        st.text(max_size=40).map(lambda text: "/" + urllib.parse.quote(text)),
    )
    printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=120)
    auth = st.one_of(
        st.none(),
        printable,
        st.builds(
            lambda skew, nonce, mac: f"{int(time.time()) + skew}:{nonce}:{mac}",
            st.integers(-10_000, 10_000),
            st.text("0123456789abcdef", min_size=32, max_size=32),
            st.text("0123456789abcdef", min_size=64, max_size=64),
        ),
    )
    messages = st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats()
        | st.text(max_size=20)
        | st.binary(max_size=50),
        lambda inner: (
            st.lists(inner, max_size=5)
            | st.tuples(inner, inner)
            | st.dictionaries(st.sampled_from(["worker", "results", "fatal", "task", "python", "job"]), inner)
        ),
        max_leaves=20,
    )
    bodies = st.one_of(st.binary(max_size=4096), messages.map(protocol.dumps))
    methods = st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
    return methods, paths, auth, bodies


def _junk_header_strategies() -> tuple[Any, Any]:
    """Auth headers and lengths with what ``str.isdigit()`` and ``\\d`` take but ``int()`` or
    ``compare_digest`` do not: Unicode digits, non-ASCII."""
    tricky = "0123456789abcdef:²³¹٣०é\u00a0"
    junk_auth = st.one_of(
        st.text(tricky, max_size=180),
        st.builds(
            lambda ts, nonce, digest, mac: f"{ts}:{nonce}:{digest}:{mac}",
            st.one_of(st.just(str(int(time.time()))), st.text(tricky, min_size=1, max_size=12)),
            st.text(tricky, min_size=32, max_size=32),
            st.text(tricky, min_size=64, max_size=64),
            st.text(tricky, min_size=64, max_size=64),
        ),
    )
    junk_length = st.one_of(st.text("0123456789²³¹٣० ,+-", min_size=1, max_size=8), st.none())

    return junk_auth, junk_length


def fuzz_requests(client: Client, state: Callable[[], State], examples: int) -> None:
    """Fuzzed requests (hypothesis, about ``examples`` of each kind): without the secret, a 4xx
    and no change of ``state()``; signed by a holder of the secret, never a 5xx."""
    before = state()
    methods, paths, auth, bodies = _request_strategies()
    junk_auth, junk_length = _junk_header_strategies()
    fuzz = settings(
        max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )

    @fuzz
    @given(methods, paths, auth, bodies)
    def unauthenticated(method: str, path: str, header: str | None, body: bytes) -> None:
        headers = {AUTH: header} if header is not None else {}
        status, _, signature = client.request(method, path, body, headers)
        assert 400 <= status < 500 and signature is None, (method, path, header, status)

    @settings(fuzz, max_examples=examples // 2)
    @given(st.binary(min_size=1, max_size=2048))
    def raw_bytes(data: bytes) -> None:
        reply = client.raw(data, patience=0.05)  # mostly an unfinished request: end it soon
        assert reply == b"" or reply.startswith(b"HTTP/1.1 4"), reply[:60]

    @fuzz
    @given(st.sampled_from(["/hello", "/work", "/heartbeat"]), bodies)
    def signed_garbage(path: str, body: bytes) -> None:
        # holders of the secret may change state; even they never get a 5xx or stop the endpoint
        status = client.signed(path, body)[0]
        assert status == 200 or 400 <= status < 500, (path, status)

    @settings(fuzz, max_examples=examples // 2)
    @given(st.sampled_from(["/hello", "/work", "/heartbeat"]), junk_auth, junk_length)
    def junk_headers(path: str, header: str, length: str | None) -> None:
        lines = ["Host: x", f"{AUTH}: {header}"] + ([f"Content-Length: {length}"] if length else [])
        reply = client.raw(head("POST", path, *lines), patience=0.05)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 4"), (header, length, reply[:60])

    unauthenticated()
    raw_bytes()
    junk_headers()
    assert state() == before
    signed_garbage()


def rss() -> int:
    """This process's resident memory in bytes (the endpoint runs in it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.parametrize(
    ("tls", "callback"), [(False, "direct"), (True, "direct"), (True, "tunnel")], ids=["http", "tls", "relay"]
)
def test_gigabyte_bodies_with_a_made_up_signature_cost_the_client_no_memory(
    make_executor: Callable[..., GridEngineExecutor], tls: bool, callback: str
) -> None:
    """Four connections each declare and send 1 GiB to /work behind an auth header of the right shape
    and a fresh timestamp: the endpoint refuses them from the headers and never holds their bodies;
    a map running meanwhile is unaffected. Through the relay on the head node, too (the bytes then
    cross the client's SSH connection)."""
    executor = make_executor(tls=tls, callback=callback)
    client = Client.of(executor)
    list(executor.map(square, range(4), timeout=120))  # warm: workers up, buffers allocated
    zeros, gigabyte, limit = bytes(1 << 20), 1 << 30, 32 * 1024 * 1024
    stop = threading.Event()
    sent: list[int] = []

    def attack() -> None:
        total = 0
        try:
            with client.socket(timeout=30) as sock:
                sock.sendall(head("POST", "/work", "Host: x", f"Content-Length: {gigabyte}", signed=True))
                while total < gigabyte and not stop.is_set():
                    sock.sendall(zeros)
                    total += len(zeros)
        except OSError:
            pass  # refused and cut off: what should happen
        sent.append(total)

    before = peak = rss()
    attackers = [threading.Thread(target=attack, name=f"attacker-{i}") for i in range(4)]
    for thread in attackers:
        thread.start()
    results = executor.map(square, range(40), timeout=300)
    for thread in attackers:
        while thread.is_alive():
            thread.join(timeout=0.05)
            peak = max(peak, rss())
            if peak - before > limit:
                stop.set()  # the assertion below fails anyway; do not make the machine swap
    assert peak - before < limit, f"client RSS grew by {(peak - before) >> 20} MiB ({sent=})"
    assert list(results) == [x * x for x in range(40)]
    assert internals(executor).endpoint.refused >= 4


def test_unicode_digits_and_non_ascii_in_headers_get_4xx_and_no_traceback(
    make_executor: Callable[..., GridEngineExecutor], caplog: pytest.LogCaptureFixture
) -> None:
    """``str.isdigit()`` takes '²' and '٣' that ``int()`` does not; ``hmac.compare_digest`` raises on
    non-ASCII text: none of that may reach the user as a 500 or a traceback."""
    caplog.set_level(logging.DEBUG)
    executor = make_executor()
    client = Client.of(executor)
    genuine = plausible_header()
    ts, *middle, _ = genuine.split(":")

    def auth_with(stamp: str, mac: str) -> str:
        return ":".join([stamp, *middle, mac])

    for auth, length in (
        (auth_with("²", "0" * 64), "0"),  # a Unicode digit for the timestamp
        (auth_with(f"{ts}²", "0" * 64), "0"),
        (auth_with(ts, "é" * 64), "0"),  # a non-ASCII MAC
        (auth_with(ts, "٣" * 64), "0"),
        (genuine, "²"),  # a Unicode digit for the length
        (genuine, "1²"),
        (genuine, "٣"),
    ):
        reply = client.raw(head("POST", "/work", "Host: x", f"Content-Length: {length}", f"{AUTH}: {auth}"))
        assert reply.startswith(b"HTTP/1.1 4"), (auth, length, reply[:60])
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]
    assert list(executor.map(square, range(4), timeout=120)) == [0, 1, 4, 9]


def test_unauthenticated_connections_are_capped_and_closed_after_a_deadline(
    make_executor: Callable[..., GridEngineExecutor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections without an authenticated request: at most ``MAX_SILENT_CONNECTIONS`` are kept
    (the oldest closed for each new one), and each is closed ``FIRST_REQUEST_SECONDS`` after it was
    accepted (6 s here instead of 10); one that made a signed request stays open."""
    monkeypatch.setattr(httpserver, "FIRST_REQUEST_SECONDS", 6.0)
    executor = make_executor()
    client = Client.of(executor)
    trusted = client.connect()
    heartbeat = protocol.dumps({"worker": "nobody"})

    def signed_heartbeat() -> int:
        header, _ = protocol.sign_request(client.secret, "POST", "/heartbeat", heartbeat)
        trusted.request("POST", "/heartbeat", body=heartbeat, headers={AUTH: header})
        response = trusted.getresponse()
        response.read()
        return response.status

    assert signed_heartbeat() == 200
    cap = httpserver.MAX_SILENT_CONNECTIONS
    silent = [socket.create_connection((client.host, client.port), timeout=10) for _ in range(cap + 40)]
    try:
        for sock in silent:
            sock.setblocking(False)

        def closed_by_the_endpoint(sock: socket.socket) -> bool:
            try:
                return sock.recv(1) == b""
            except BlockingIOError:
                return False

        # before the deadline: these are closed because of the cap
        wait_for(lambda: all(map(closed_by_the_endpoint, silent[:40])), timeout=3, what="the oldest closed")
        assert not any(map(closed_by_the_endpoint, silent[-cap:]))
        wait_for(lambda: all(map(closed_by_the_endpoint, silent)), timeout=20, what="the deadline")
        assert signed_heartbeat() == 200  # the same connection, still open
        assert list(executor.map(square, range(10), timeout=120)) == [x * x for x in range(10)]
    finally:
        trusted.close()
        for sock in silent:
            sock.close()


#: A client with ``ulimit -n 1024``: prints its endpoint's URL; on a first line on stdin uses up all
#: its descriptors (as leaking user code would) and says how many; on a second frees them, runs a map
#: and prints its results.
FD_LIMITED_CLIENT = """
import json, os, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from sheepdog_executor import GridEngineExecutor
from sheepdog_executor.testing import internals
def square(x):
    return x * x
with GridEngineExecutor(host=sys.argv[1], max_workers=4, poll_interval=0.5, progress=False) as executor:
    print(json.dumps({"url": internals(executor).launch.url}), flush=True)
    sys.stdin.readline()
    hogged = []
    try:
        while True:
            hogged.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        print(json.dumps({"hogged": len(hogged)}), flush=True)
    sys.stdin.readline()
    for fd in hogged:
        os.close(fd)
    print(json.dumps({"results": list(executor.map(square, range(20), timeout=240))}), flush=True)
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_out_of_file_descriptors_the_endpoint_backs_off_quietly_and_a_map_completes(
    cell: str, tmp_path: Path
) -> None:
    """A client limited to 1,024 descriptors: 1,100 connections that never send a byte do not use
    them up (at most ``MAX_SILENT_CONNECTIONS`` are kept); when its own code has used them all up,
    accepting pauses instead of spinning, with one warning instead of a traceback per turn; a map
    then completes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    stderr = (tmp_path / "stderr").open("wb")
    child = spawn(
        [sys.executable, "-c", FD_LIMITED_CLIENT, cell],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    connections: list[socket.socket] = []

    def stderr_head() -> str:  # a client that spews may write hundreds of MB
        with (tmp_path / "stderr").open("rb") as handle:
            return handle.read(1 << 16).decode(errors="replace")

    def connect(count: int) -> None:
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(address)
            connections.append(sock)

    def quiet_and_idle() -> None:
        """The client neither spins nor writes tracebacks (measured over 3 s)."""
        before, started = cpu_seconds(child.pid), time.monotonic()
        time.sleep(3)
        used = (cpu_seconds(child.pid) - before) / (time.monotonic() - started)
        spewed = stderr_head()
        assert "Traceback" not in spewed and len(spewed) < 4096, spewed[:3000]  # one warning at most
        assert used < 0.1, f"the client used {used:.0%} of a CPU"

    try:
        assert child.stdout is not None and child.stdin is not None
        url = urllib.parse.urlsplit(json.loads(read_line(child, 120, "the client's endpoint"))["url"])
        address = (url.hostname or "127.0.0.1", url.port or 80)
        # 1,100 connections that send nothing (in steps the listen backlog takes)
        wait_for(lambda: connect(50) or len(connections) >= 1100, what="1,100 connections")
        wait_for(lambda: len(os.listdir(f"/proc/{child.pid}/fd")) > 200, what="connections accepted")
        quiet_and_idle()
        # the client's own code takes every descriptor; new connections find it out of them
        child.stdin.write("hog\n")
        child.stdin.flush()
        assert json.loads(read_line(child, 60, "the client's hog report"))["hogged"] > 0
        wait_for(lambda: connect(5) or "out of file descriptors" in stderr_head(), what="the warning")
        quiet_and_idle()
        child.stdin.write("go\n")
        child.stdin.flush()
        line = read_line(child, 300, "the client's results")
        assert json.loads(line)["results"] == [x * x for x in range(20)]
        assert child.wait(timeout=120) == 0
    finally:
        for sock in connections:
            sock.close()
        if child.poll() is None:
            child.kill()
            child.wait()
        stderr.close()
    text = (tmp_path / "stderr").read_text()
    assert text.count("out of file descriptors") <= 2 and "Traceback" not in text and len(text) < 4096, text


# -- the secret ---------------------------------------------------------------------------------


def test_secret_never_in_argv_qstat_environment_or_spool(
    make_executor: Callable[..., GridEngineExecutor],
) -> None:
    executor = make_executor(max_workers=2, job_name=f"sdsec-{uuid.uuid4().hex[:6]}")
    secret = internals(executor).endpoint.secret.decode()
    session = executor.session_dir
    futures = [executor.submit(slow_square, x) for x in range(2)]
    job = wait_for(lambda: executor.job_ids, what="the job")[0]
    spooled = f"/var/spool/gridengine/execd/localhost/job_scripts/{job}"
    wait_for(lambda: os.path.exists(spooled), what="the job script in the execd spool")
    wait_for(lambda: executor.status()["workers"], what="a running worker")

    qstat = ssh(f"qstat -j {job}")
    assert qstat.returncode == 0 and job in qstat.stdout
    assert secret not in qstat.stdout + qstat.stderr
    # the spooled job script is world-readable here (0755, sgeadmin): it may hold paths, not secrets
    script = Path(spooled).read_text()
    assert f"{session}/secret" in script and secret not in script
    mode = os.stat(spooled).st_mode & 0o777
    assert mode & 0o002 == 0, oct(mode)  # at least not writable by others
    # nothing anywhere in the spool (qmaster's database, execd's job dirs and environment files)
    for root, _, files in os.walk("/var/spool/gridengine"):
        for name in files:
            path = os.path.join(root, name)
            try:
                assert secret.encode() not in Path(path).read_bytes(), path
            except (FileNotFoundError, PermissionError):
                pass
    # no process on the machine has it in its command line or environment
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for part in ("cmdline", "environ"):
            try:
                assert secret.encode() not in Path(f"/proc/{pid}/{part}").read_bytes(), (pid, part)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
    # the secret file: 0600 in a 0700 directory, owned by the user
    modes = ssh(f"stat -c '%a %U' {shlex.quote(session)} {shlex.quote(session)}/secret").stdout.split("\n")
    assert modes[0].split()[0] == "700" and modes[1].split()[0] == "600", modes
    assert [future.result(timeout=120) for future in futures] == [0, 1]


# -- a shared session root ----------------------------------------------------------------------

OTHER_USER = os.environ.get("SHEEPDOG_TEST_OTHER_USER", "sdother")


@pytest.fixture
def shared_tmp(cell: str) -> Iterator[Path]:
    """A directory of this test under /tmp on the head node (this machine; made here as root)."""
    try:
        other = pwd.getpwnam(OTHER_USER)
    except KeyError:
        pytest.fail(f"no user {OTHER_USER}: run scripts/test-cell.sh as root")
    me = pwd.getpwnam(ssh("id -un").stdout.strip())
    base = Path(f"/tmp/sdsec-{uuid.uuid4().hex[:8]}")
    base.mkdir(mode=0o755)
    base.chmod(0o755)
    for name, owner, mode in (("shared", other, 0o1777), ("open", me, 0o777), ("mine", me, 0o700)):
        (base / name).mkdir()
        os.chown(base / name, owner.pw_uid, owner.pw_gid)
        (base / name).chmod(mode)
    # the user's own 0700 directory, but inside the other user's 1777 one: they may rename it
    (base / "shared" / "mine").mkdir()
    os.chown(base / "shared" / "mine", me.pw_uid, me.pw_gid)
    (base / "shared" / "mine").chmod(0o700)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_a_session_root_another_user_could_change_is_refused(cell: str, shared_tmp: Path) -> None:
    for root, why in (
        (shared_tmp / "shared", r"is owned by uid \d+, not by you"),  # another user's 1777 directory
        (shared_tmp / "open", r"is writable by group or others \(mode 777\)"),
        (shared_tmp / "shared" / "mine", r"shared, which contains it, is owned by uid \d+, neither you"),
    ):
        with pytest.raises(ConfigurationError, match=why) as info:
            GridEngineExecutor(host=cell, session_root=str(root))
        assert str(root) in str(info.value) and "chmod go-w" in str(info.value)
        assert [p.name for p in root.iterdir()] == (["mine"] if root.name == "shared" else [])  # nothing made
    # the user's own 0700 directory under a root-owned one is fine
    with GridEngineExecutor(host=cell, session_root=str(shared_tmp / "mine"), max_workers=1) as executor:
        assert executor.session_dir.startswith(f"{shared_tmp}/mine/")
        assert executor.submit(square, 7).result(timeout=120) == 49


def test_a_bundle_changed_after_the_client_wrote_it_is_not_run(
    make_executor: Callable[..., GridEngineExecutor], cell: str
) -> None:
    executor = make_executor(max_workers=1, qsub_args=["-h"])
    future = executor.submit(square, 5)
    job = wait_for(lambda: executor.job_ids, what="the held job")[0]
    session = executor.session_dir
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("__main__.py", f"open({f'{session}/pwned'!r}, 'w').close()\n")
    replaced = subprocess.run(
        ["ssh", "-o", "BatchMode=yes", cell, f"cat > {shlex.quote(session)}/bundle.zip"],
        input=evil.getvalue(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert replaced.returncode == 0, replaced.stderr
    assert ssh(f"qrls {job}").returncode == 0
    with pytest.raises(WorkerStartFailed, match="is not the one this client wrote") as info:
        future.result(timeout=120)
    assert "refusing to run it" in str(info.value)
    assert ssh(f"test -e {shlex.quote(session)}/pwned").returncode == 1, "the tampered bundle ran"


# -- TLS ----------------------------------------------------------------------------------------


def test_tls_map_works_and_a_wrong_fingerprint_is_refused(
    make_executor: Callable[..., GridEngineExecutor],
) -> None:
    executor = make_executor(tls=True)
    launch = internals(executor).launch
    assert launch.url.startswith("https://")
    assert launch.fingerprint is not None and len(launch.fingerprint) == 64
    assert list(executor.map(square, range(30), timeout=120)) == [x * x for x in range(30)]
    # the certificate served is the one pinned
    client = Client.of(executor)
    conn = client.connect()
    conn.connect()
    der = conn.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    conn.close()
    assert hashlib.sha256(der).hexdigest() == launch.fingerprint
    # plain HTTP to the TLS endpoint gets nowhere
    reply = client.raw(b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert b"200" not in reply[:20]
    # a worker started on the cell with the right secret but a wrong fingerprint refuses to talk
    wrong = "0" * 64
    run = ssh(
        f"python3 {shlex.quote(launch.bundle_path)} {shlex.quote(launch.url)} "
        f"{shlex.quote(launch.secret_path)} {wrong}",
        timeout=120,
    )
    assert run.returncode != 0
    assert "not the client's" in run.stderr, run.stderr[-500:]
    assert ("local", 1) not in internals(executor).tasks_seen  # it never said hello
    # the same worker with the right fingerprint is accepted (and sent home: no work)
    run = ssh(
        f"python3 {shlex.quote(launch.bundle_path)} {shlex.quote(launch.url)} "
        f"{shlex.quote(launch.secret_path)} {launch.fingerprint}",
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-500:]
    assert ("local", 1) in internals(executor).tasks_seen


# -- other users' jobs -------------------------------------------------------------------------


def test_adopting_a_cut_off_qsub_reads_only_the_users_own_jobs(
    make_executor: Callable[..., GridEngineExecutor], monkeypatch: pytest.MonkeyPatch
) -> None:
    executor = make_executor(max_workers=1, qsub_args=["-h"])
    future = executor.submit(square, 3)
    job = wait_for(lambda: executor.job_ids, what="the held job")[0]
    scheduler = internals(executor).scheduler
    commands: list[str] = []
    run = scheduler.run

    def recording(command: str, **kwargs: Any) -> Any:
        commands.append(command)
        return run(command, **kwargs)

    monkeypatch.setattr(scheduler, "run", recording)
    assert scheduler.find_jobs(internals(executor).launch) == [job]
    assert any("qstat -xml -u" in c for c in commands) and not any('qstat -j "*"' in c for c in commands)
    assert ssh(f"qrls {job}").returncode == 0
    assert future.result(timeout=120) == 9


def test_doctor_refuses_a_session_root_another_user_could_change(
    cell: str, shared_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The doctor's test job runs from a directory under the session root as well."""
    monkeypatch.setenv("SHEEPDOG_SESSION_ROOT", str(shared_tmp / "shared"))
    assert cli.main(["doctor", cell]) != 0
    out = capsys.readouterr().out
    assert re.search(r"FAIL +python .*session_root=.* is not safe", out), out
    assert [p.name for p in (shared_tmp / "shared").iterdir()] == ["mine"]


# -- another user of the head node on the relay's old port -------------------------------------

#: Another user's server on the relay's old port (binding it as soon as the relay's connections let
#: go of it). ``big``: answers every request with 200, a made-up signature and a body said to be
#: 2 GiB, streaming zeros (1 GiB at most). ``pass``: passes the traffic through to the port given on
#: its stdin (the new relay), reading it: each distinct ``sdsecret-NNNNN`` seen counts. Prints
#: ``bound`` once bound, then ``answered BYTES`` per answer ended, or ``connected 1`` and ``closed 1``
#: per connection and ``read N`` when N were seen.
HIJACK = r"""
import re, socket, sys, threading, time
mode, port = sys.argv[1], int(sys.argv[2])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
for _ in range(300):
    try:
        s.bind(("", port))
        break
    except OSError:
        time.sleep(0.1)
s.listen(64)
print("bound", flush=True)
target, known, seen, said = [0], threading.Event(), set(), threading.Lock()

def say(line):
    with said:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

def big(conn):
    sent = 0
    try:
        while b"\r\n\r\n" not in conn.recv(65536):
            pass
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Sheepdog-Auth: %s:%s\r\n\r\n"
                     % (2 << 30, b"0" * 64, b"1" * 64))
        block = bytes(1 << 20)
        while sent < 1 << 30:
            conn.sendall(block)
            sent += len(block)
    except OSError:
        pass
    conn.close()
    say("answered %d" % sent)

def pump(a, b):
    tail = b""
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            count = len(seen)
            seen.update(re.findall(rb"sdsecret-\d{5}", tail + data))
            tail = data[-20:]
            if len(seen) != count:
                say("read %d" % len(seen))
            b.sendall(data)
    except OSError:
        pass
    for sock in (a, b):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

def passing(conn):
    say("connected 1")
    known.wait()
    up = socket.create_connection(("127.0.0.1", target[0]))
    back = threading.Thread(target=pump, args=(up, conn), daemon=True)
    back.start()
    pump(conn, up)
    back.join()
    say("closed 1")

def told():
    target[0] = int(sys.stdin.readline())
    known.set()

threading.Thread(target=told, daemon=True).start()
s.settimeout(300)
while True:
    conn = s.accept()[0]
    threading.Thread(target={"big": big, "pass": passing}[mode], args=(conn,), daemon=True).start()
"""


class Hijacker:
    """``HIJACK`` run as ``OTHER_USER`` on the head node (this machine), with its lines collected."""

    def __init__(self, mode: str, port: int) -> None:
        self.process = subprocess.Popen(
            ["setpriv", f"--reuid={OTHER_USER}", f"--regid={OTHER_USER}", "--clear-groups"]
            + ["/usr/bin/python3", "-c", HIJACK, mode, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.lines: list[str] = []
        threading.Thread(target=self._collect, name="hijack-lines", daemon=True).start()

    def _collect(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.strip())

    def said(self, prefix: str) -> list[str]:
        return [line.split()[1] for line in self.lines if line.startswith(prefix)]

    def tell(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)


def listening(port: int) -> bool:
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=30)
    return bool(out.stdout.strip())


def hijack_after_a_drop(
    executor: GridEngineExecutor, mode: str, until: Callable[[Hijacker], bool]
) -> Hijacker:
    """Drop the executor's SSH connection, and start ``HIJACK`` on the relay's old port before the
    tunnel can be re-made; the connection stays down until ``until(hijacker)`` (60 s at most)."""
    session = internals(executor)
    old_port = session.routes[-1][2]
    with session.shell._lock:  # no reconnect (hence no new relay) until the port is taken
        session.shell._client.get_transport().close()
        wait_for(lambda: not listening(old_port), 30, "the relay to end with the connection")
        hijacker = Hijacker(mode, old_port)
        try:
            wait_for(lambda: "bound" in hijacker.lines, 60, "the other user to bind the old port")
            deadline = time.monotonic() + 60
            while not until(hijacker) and time.monotonic() < deadline:
                time.sleep(0.2)
        except BaseException:
            hijacker.stop()
            raise
    return hijacker


def slow_secret(x: int) -> str:
    time.sleep(0.1)
    return f"sdsecret-{x:05d}"


def worker_peak_rss(session_dir: str) -> dict[int, int]:
    """Peak resident memory (VmHWM, bytes) of each of the session's live worker processes."""
    peaks = {}
    for entry in Path("/proc").iterdir():
        try:
            if f"{session_dir}/bundle.zip".encode() not in (entry / "cmdline").read_bytes():
                continue
            status = (entry / "status").read_text()
        except (OSError, ValueError):
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks[int(entry.name)] = int(line.split()[1]) * 1024
    return peaks


def test_large_unsigned_answers_on_the_relays_old_port_cost_a_worker_no_memory(
    make_executor: Callable[..., GridEngineExecutor],
) -> None:
    """After an SSH drop, another user of the head node binds the relay's old port and answers the
    workers with bodies said to be 2 GiB: a worker reads 64 KiB of each and stays small (before:
    it read each whole, and its peak memory passed 1 GB), and the map finishes on the new relay.
    Plain HTTP (``tls=False``): with TLS the handshake alone would refuse them."""
    executor = make_executor(callback="tunnel", tls=False, max_workers=2, idle_timeout=60)
    results = executor.map(slow_secret, range(200))
    wait_for(lambda: len(executor.status()["workers"]) == 2, 120, "two workers running")
    peaks: dict[int, int] = {}

    def answered_three(hijacker: Hijacker) -> bool:
        peaks.update(worker_peak_rss(executor.session_dir))  # a worker that grew may be killed
        return len(hijacker.said("answered")) >= 3

    hijacker = hijack_after_a_drop(executor, "big", answered_three)
    try:
        assert list(results) == [f"sdsecret-{x:05d}" for x in range(200)]
        peaks.update(worker_peak_rss(executor.session_dir))
    finally:
        hijacker.stop()
    answered = [int(n) for n in hijacker.said("answered")]
    print(f"hostile answers: {len(answered)}, bytes sent {answered}; workers' peak RSS {peaks}")
    assert answered and peaks
    assert max(peaks.values()) < 100 * 1024**2, peaks


def test_another_user_passing_the_relay_traffic_through_reads_no_result(
    make_executor: Callable[..., GridEngineExecutor],
) -> None:
    """After an SSH drop, another user of the head node binds the relay's old port and passes the
    workers' traffic through to the new relay, reading it: by default (TLS on the routes through
    the head node) not one pickled result is readable there, and the workers leave the old port
    for the one the routes file names. Before: 241 of 400 were read in plain text."""
    executor = make_executor(callback="tunnel", max_workers=4, idle_timeout=60)  # they stay
    session = internals(executor)
    old_port = session.routes[-1][2]
    results = executor.map(slow_secret, range(400))
    wait_for(lambda: executor.status()["workers"], 120, "workers running")
    # the workers come to the old port while the connection is down (held there until told)
    hijacker = hijack_after_a_drop(executor, "pass", lambda h: bool(h.said("connected")))
    try:
        internals(executor).shell.run("true")  # reconnect now: the relay is re-made on another port
        wait_for(lambda: session.routes[-1][2] != old_port, 60, "the relay re-made on another port")
        hijacker.tell(str(session.routes[-1][2]))
        assert list(results) == [f"sdsecret-{x:05d}" for x in range(400)]
        # and the workers left the old port for the new relay (their connections there closed)
        left = lambda: len(hijacker.said("closed")) == len(hijacker.said("connected"))  # noqa: E731
        wait_for(left, 30, "the workers to leave the old port")
    finally:
        hijacker.stop()
    read = max([int(n) for n in hijacker.said("read")] or [0])
    connected = len(hijacker.said("connected"))
    print(f"results read by the other user: {read} of 400, over {connected} connection(s) passed through")
    assert connected, "no worker came to the old port: the test tested nothing"
    assert read == 0
