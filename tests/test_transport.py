"""The tunnel and the relay move bytes on a fixed number of threads, past descriptor 1023, and
whatever another user of the head node holds open on the relay.

The head node of the cell is this machine: the relay's threads are read in ``/proc``, and another
user's process runs here with ``setpriv`` (as in test_security.py).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import NODE_PYTHON, read_line, spawn, wait_until
from test_security import OTHER_USER
from test_tunnel import _relay_pid

from sheepdog_executor import GridEngineExecutor
from sheepdog_executor.testing import internals
from sheepdog_executor.tunnel import Tunnel

cluster = pytest.mark.cluster


def square(x: int) -> int:
    return x * x


#: A client whose own code holds more than 1,100 open files before it makes its executor (so
#: every descriptor the tunnel uses is above 1023), then maps through the tunnel.
MANY_FILES_CLIENT = """
import json, os, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
assert max(held) > 1100
from sheepdog_executor import GridEngineExecutor
from sheepdog_executor.tunnel import Tunnel
options = json.loads(sys.argv[2])
with GridEngineExecutor(host=sys.argv[1], **options) as executor:
    results = list(executor.map(abs, range(-20, 0), timeout=120))
print(json.dumps({"held": len(held), "highest": max(held), "results": results}), flush=True)
"""


@cluster
def test_a_client_holding_1100_files_maps_through_the_tunnel(cell: str) -> None:
    """Before: the tunnel's ``select()`` failed on every connection (descriptors above 1023)."""
    options = {"callback": "tunnel", "max_workers": 2, "poll_interval": 0.5, "progress": False}
    options["python"] = NODE_PYTHON
    client = spawn(
        [sys.executable, "-c", MANY_FILES_CLIENT, cell, json.dumps(options)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        report = json.loads(read_line(client, 200, "the client's results"))
    finally:
        client.kill()
        client.wait(timeout=30)
    assert report["highest"] > 1100
    assert report["results"] == list(range(20, 0, -1))


#: Another user of the head node: opens ARGV[3] connections to the relay at ARGV[1]:ARGV[2], says
#: ``holding N``, and holds them without a word until its stdin closes.
IDLE_HOLDER = """
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
address = (sys.argv[1], int(sys.argv[2]))
held = [socket.create_connection(address, timeout=30) for _ in range(int(sys.argv[3]))]
print("holding", len(held), flush=True)
sys.stdin.read()
"""


@cluster
def test_another_user_holding_1100_idle_connections_to_the_relay_stops_no_map(
    make_executor: Callable[..., GridEngineExecutor],
) -> None:
    """Before: 1,021 idle connections of another user stopped a map at 0 of 600 calls."""
    executor = make_executor(callback="tunnel", max_workers=2)
    _, host, port = internals(executor).routes[-1]
    holder = spawn(
        ["setpriv", f"--reuid={OTHER_USER}", f"--regid={OTHER_USER}", "--clear-groups"]
        + ["/usr/bin/python3", "-c", IDLE_HOLDER, host, str(port), "1100"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        assert read_line(holder, 60, "the other user's connections").split() == ["holding", "1100"]
        assert list(executor.map(square, range(600), timeout=180)) == [x * x for x in range(600)]
    finally:
        holder.kill()
        holder.wait(timeout=30)


#: Connections from the head node through the relay and the tunnel, as a worker makes them: each
#: a keep-alive HTTPS connection (the certificate pinned) with a signed heartbeat, held open. Opens
#: connections up to each count read on stdin, says ``open N``; says ``answered N`` after a second
#: heartbeat on each; ends when stdin does.
CONNECTIONS = """
import sys
bundle, url, secret_file, fingerprint = sys.argv[1:5]
sys.path.insert(0, bundle)
from sheepdog_executor.remote.worker import Channel
secret = open(secret_file, "rb").read().strip()
channels = []
for line in sys.stdin:
    for _ in range(int(line) - len(channels)):
        channels.append(Channel(url, secret, fingerprint))
        assert channels[-1].call("/heartbeat", {"worker": "probe"}, attempts=3) == {"known": False}
    print("open", len(channels), flush=True)
answered = [c.call("/heartbeat", {"worker": "probe"}, attempts=3) for c in channels]
print("answered", answered.count({"known": False}), flush=True)
"""


def thread_count(pid: int) -> int:
    """The fewest threads ``pid`` had over a second (threads that come and go are not counted)."""
    counts = []
    for _ in range(6):
        counts.append(len(os.listdir(f"/proc/{pid}/task")))
        time.sleep(0.2)
    return min(counts)


@cluster
def test_threads_are_the_same_for_10_and_300_connections(
    make_executor: Callable[..., GridEngineExecutor], cell: str
) -> None:
    """Before: one client thread per connection through the tunnel, two in the relay."""
    executor = make_executor(callback="tunnel", max_workers=1, idle_timeout=60)
    session = internals(executor)
    launch = session.launch
    assert list(executor.map(square, range(10), timeout=120)) == [x * x for x in range(10)]
    relay = _relay_pid(session.routes[-1][2])
    assert relay is not None
    relay_pid = int(relay.removeprefix("pid="))
    args = [launch.bundle_path, launch.url, launch.secret_path, launch.fingerprint or ""]
    command = f"exec python3 -c {shlex.quote(CONNECTIONS)} " + " ".join(map(shlex.quote, args))
    connections = spawn(
        ["ssh", "-o", "BatchMode=yes", cell, command],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    counts: dict[int, tuple[int, int]] = {}
    try:
        assert connections.stdin is not None
        for n in (10, 300):
            connections.stdin.write(f"{n}\n")
            connections.stdin.flush()
            assert read_line(connections, 120, f"{n} connections open").split() == ["open", str(n)]
            results = executor.map(square, range(20), timeout=120)  # a map meanwhile
            counts[n] = (thread_count(os.getpid()), thread_count(relay_pid))
            assert list(results) == [x * x for x in range(20)]
            # the connections really are open through the relay (two descriptors each there)
            assert len(os.listdir(f"/proc/{relay_pid}/fd")) > 2 * n
        connections.stdin.close()
        assert read_line(connections, 120, "answers on every connection").split() == ["answered", "300"]
    finally:
        connections.kill()
        connections.wait(timeout=30)
    print(f"threads (client, relay): {counts}")
    assert counts[10] == counts[300]
    assert counts[300][1] == 1  # the relay's one thread


# -- the relay alone, on this machine (no cell) ---------------------------------------------------

#: The relay with its limits lowered: MAX_SILENT 20, SILENT_SECONDS 2.
RELAY = """
import sys
from sheepdog_executor.remote import relay
relay.MAX_SILENT, relay.SILENT_SECONDS = 20, 2.0
relay.relay(int(sys.argv[1]), 0)
"""


class Upstream:
    """A server on loopback standing for the SSH forward: echoes, or (``reading=False``) takes
    connections and never reads them, sending ``send`` bytes to each instead."""

    def __init__(self, reading: bool = True, send: int = 0) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.reading, self.send = reading, send
        self.sent = 0
        threading.Thread(target=self._serve, name="upstream", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), name="upstream-conn", daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            if not self.reading:
                block = bytes(1 << 16)
                while self.sent < self.send:
                    self.sent += conn.send(block)
                time.sleep(30)
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass
        conn.close()


@pytest.fixture
def local_relay() -> Iterator[Callable[[int], tuple[subprocess.Popen[str], int]]]:
    """Starts the relay (limits lowered) towards a port here: (process, its port)."""
    started: list[subprocess.Popen[str]] = []

    def start(target: int) -> tuple[subprocess.Popen[str], int]:
        process = spawn(
            [sys.executable, "-c", RELAY, str(target)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        started.append(process)
        return process, int(read_line(process, 30, "the relay's address").split()[2])

    yield start
    for process in started:
        process.kill()
        process.wait(timeout=30)


def closed_by_the_relay(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_the_relay_keeps_few_silent_connections_and_passes_the_speaking_ones(
    local_relay: Callable[[int], tuple[subprocess.Popen[str], int]],
) -> None:
    """Of the connections that sent nothing at most MAX_SILENT are kept, the oldest closed first,
    each SILENT_SECONDS after it came; one that spoke is passed on and kept; all on one thread."""
    upstream = Upstream()
    relay, port = local_relay(upstream.port)
    spoke = socket.create_connection(("127.0.0.1", port), timeout=10)
    spoke.sendall(b"hello")
    assert spoke.recv(5) == b"hello"
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(40)]
    for sock in silent:
        sock.setblocking(False)
    try:
        wait_until(lambda: all(map(closed_by_the_relay, silent[:20])), 5, "the oldest 20 closed")
        assert not any(map(closed_by_the_relay, silent[20:]))
        assert len(os.listdir(f"/proc/{relay.pid}/task")) == 1
        wait_until(lambda: all(map(closed_by_the_relay, silent)), 10, "the silent ones closed in time")
        spoke.sendall(b"still here")
        assert spoke.recv(10) == b"still here"
    finally:
        for sock in [spoke, *silent]:
            sock.close()
    relay.stdin.close()  # type: ignore[union-attr]
    assert relay.wait(timeout=10) == 0  # it ends with its stdin (its SSH channel)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_the_relay_buffers_nothing_for_a_slow_reader(
    local_relay: Callable[[int], tuple[subprocess.Popen[str], int]],
) -> None:
    """A side that does not read holds the other back: the relay keeps at most 64 KiB per
    direction, whatever is sent at it (here 200 MB each way)."""
    upstream = Upstream(reading=False, send=200 << 20)
    relay, port = local_relay(upstream.port)
    before = rss(relay.pid)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setblocking(False)
    sent, block, deadline = 0, bytes(1 << 16), time.monotonic() + 3
    try:
        while time.monotonic() < deadline and sent < 200 << 20:
            try:
                sent += sock.send(block)
            except BlockingIOError:
                time.sleep(0.01)
        grown = rss(relay.pid) - before
    finally:
        sock.close()
    print(
        f"sent {sent >> 10} KiB and {upstream.sent >> 10} KiB back, none read; relay grew {grown >> 10} KiB"
    )
    assert sent < 100 << 20 and upstream.sent < 100 << 20  # held back: socket buffers only
    assert grown < 4 << 20


@cluster
def test_the_tunnel_buffers_nothing_for_a_slow_reader(
    make_executor: Callable[..., GridEngineExecutor],
) -> None:
    """Through a tunnel of the executor's SSH connection, to a server here that never reads, and
    back from it to a connection on the head node that never reads: the client keeps a bounded
    amount (64 KiB a direction, the SSH window in paramiko's buffer), whatever is offered."""
    executor = make_executor(callback="tunnel", max_workers=1)
    upstream = Upstream(reading=False, send=200 << 20)
    tunnel = Tunnel(internals(executor).shell)  # type: ignore[arg-type]
    tunnel.deliver_to("127.0.0.1", upstream.port)
    _, port = tunnel.open()
    try:
        before = rss(os.getpid())
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)  # the head node is here
        sock.setblocking(False)
        sent, block, deadline = 0, bytes(1 << 16), time.monotonic() + 5
        while time.monotonic() < deadline and sent < 200 << 20:
            try:
                sent += sock.send(block)
            except BlockingIOError:
                time.sleep(0.01)
        grown = rss(os.getpid()) - before
        sock.close()
    finally:
        tunnel.close()
    print(f"sent {sent >> 10} KiB and {upstream.sent >> 10} KiB back, none read; grew {grown >> 10} KiB")
    assert sent < 100 << 20 and upstream.sent < 100 << 20  # held back: socket buffers, SSH window
    assert grown < 16 << 20
