"""How the workers reach the client's endpoint: directly, or through the executor's SSH connection.

``direct``: the nodes connect to the client's own address. ``tunnel``: the endpoint listens on this
machine's loopback only, so nothing here is open to the network; sshd on the head node forwards one of
its loopback ports back over the SSH connection (``Transport.request_port_forward``), and a small relay
started over the same connection (``remote/relay.py``) makes that port reachable from the nodes. The
relay is used whatever sshd's GatewayPorts says, so there is one path to get right. ``auto`` has the
head node try to connect to this machine: when it cannot, the workers come through the tunnel; when
it can, they are offered both routes, direct first (the compute nodes may not reach this machine even
when the head node does), and each takes the first that answers (``remote/reach.py``).

Other users share the head node: by default the tunnel delivers to the endpoint's TLS listener
(``Endpoint.tunnel_port``), whose certificate the workers pin, so the relay passes only TLS.

One thread here (``_Pump``) and one in the relay move the bytes of every connection, with
``selectors`` (no descriptor-number limit, unlike ``select()``): a thousand workers cost no more
threads than ten, on the client or on the head node.

When the SSH connection is re-made, forward and relay are re-made too: on their old ports when free,
else on any (someone else may have taken the port meanwhile); the session's routes file then tells
the workers where to go.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import secrets
import selectors
import shlex
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sheepdog_executor.background import in_background, settle
from sheepdog_executor.errors import ConfigurationError, ConnectionFailed
from sheepdog_executor.options import CALLBACK_MODES
from sheepdog_executor.shell import Shell, SSHShell, open_session, shutdown_write

if TYPE_CHECKING:
    from sheepdog_executor.server import Endpoint

log = logging.getLogger("sheepdog_executor")

#: Start the head node's Python (relay and probe are stdlib only, 3.6+).
_PYTHON = (
    'PY=$(command -v python3 || command -v python) || { echo "no python3 on the head node" >&2; exit 127; }; '
    'exec "$PY" -u -c'
)


@functools.cache
def _relay_source() -> bytes:
    return (Path(__file__).with_name("remote") / "relay.py").read_bytes()


def _remote_python(*args: object) -> tuple[str, bytes]:
    """The command that runs ``remote/relay.py`` on the head node with these arguments, and its
    stdin: the code comes first on stdin (a short command line in ``ps``), the rest is the relay's."""
    code = _relay_source()
    bootstrap = f"import sys; exec(sys.stdin.buffer.read({len(code)}))  # sheepdog-executor"
    return " ".join([_PYTHON, shlex.quote(bootstrap), *(shlex.quote(str(a)) for a in args)]), code


@dataclass(frozen=True)
class Route:
    """How the workers reach the endpoint: ``mode`` is "direct" or "tunnel"."""

    mode: str
    #: This machine's address as the nodes would use it (direct), and the port asked for.
    address: str
    port: int = 0
    #: Why the nodes cannot connect directly, when a probe found out.
    why: str = ""
    #: Direct, with the tunnel offered as a second route (auto, when the head node reached us).
    fallback: bool = False
    #: The tunnel, and its opening, started while the probe ran (auto), not yet delivering.
    early: tuple[Tunnel, Future[tuple[str, int]]] | None = field(default=None, compare=False, repr=False)

    @property
    def through_head_node(self) -> bool:
        """Whether the workers may be offered a route through the head node's relay, a machine
        other users share."""
        return self.mode == "tunnel" or self.fallback

    @property
    def listen_address(self) -> str:
        """Where the endpoint listens: behind a tunnel, on loopback only."""
        return self.address if self.mode == "direct" else "127.0.0.1"

    @property
    def listen_port(self) -> int:
        return self.port if self.mode == "direct" else 0

    def open(
        self, shell: Shell, endpoint: Endpoint, on_moved: Callable[[str, int, bool], None] | None = None
    ) -> list[tuple[str, str, int]]:
        """The routes the workers may take, best first: (label, host, port) each. A tunnel is closed
        when the endpoint stops; ``on_moved(host, port, moved)`` is called each time it was re-made."""
        routes = []
        if self.mode == "direct":
            routes.append(("direct", self.address, endpoint.port))
            if not self.fallback:
                return routes
        assert isinstance(shell, SSHShell)
        tunnel, opening = self.early or (Tunnel(shell), None)
        if endpoint.tunnel_port:  # the endpoint's TLS listener on loopback, for routes through here
            tunnel.deliver_to("127.0.0.1", endpoint.tunnel_port, on_moved)
        else:
            tunnel.deliver_to(self.listen_address, endpoint.port, on_moved)
        endpoint.on_stop.append(tunnel.close)
        try:
            host, port = opening.result() if opening is not None else tunnel.open()
        except ConnectionFailed as exc:
            if routes:  # auto: the head node reached us directly; the nodes will have to as well
                log.warning("no tunnel as a second route (the nodes must connect directly): %s", exc)
                return routes
            if self.why:
                raise ConnectionFailed(
                    f"the nodes cannot connect to this machine directly ({self.why}), and {exc}"
                ) from exc
            raise
        log.info(
            "workers reach this client through the SSH connection: relay %s:%d on the head node%s",
            host,
            port,
            f" (direct connection impossible: {self.why})" if self.why else "",
        )
        return [*routes, ("tunnel", host, port)]

    def discard(self) -> None:
        """Close the tunnel started early, when ``open`` will not be called (the set-up failed)."""
        if self.early is not None:
            _close_early(*self.early)


def choose_route(shell: Shell, callback: str, address: str, port: int = 0) -> Route:
    """Decide how the workers will reach this client; ``auto`` probes from the head node, while the
    tunnel it offers either way (as the route, or as the second one) is being opened."""
    if callback not in CALLBACK_MODES:
        modes = ", ".join(map(repr, CALLBACK_MODES))
        raise ConfigurationError(f"callback must be one of {modes}, not {callback!r}")
    if not isinstance(shell, SSHShell):
        if callback == "tunnel":
            raise ConfigurationError("callback='tunnel' needs an SSH connection: pass host=")
        return Route("direct", address, port)
    if callback != "auto":
        return Route(callback, address, port)
    tunnel = Tunnel(shell)
    early = tunnel, in_background(tunnel.open, "sheepdog-tunnel-open")
    try:
        why = probe_direct(shell, address, port)
    except BaseException:
        _close_early(*early)
        raise
    if why is None:
        return Route("direct", address, port, fallback=True, early=early)
    return Route("tunnel", address, port, why, early=early)


def _close_early(tunnel: Tunnel, opening: Future[tuple[str, int]]) -> None:
    settle([opening])  # else it could finish opening after the close
    tunnel.close()


def probe_direct(shell: SSHShell, address: str, port: int = 0, timeout: float = 5.0) -> str | None:
    """None when the head node can open a connection to ``address:port`` on this machine, else why not.

    Listens there for a moment and has the head node send a random token: only its arrival here counts,
    so another machine answering at the same address (another network's 10.x) is not mistaken for us.
    """
    try:
        listener = socket.create_server((address, port))
    except OSError as exc:
        return f"cannot listen on {address}:{port} here: {exc}"
    token = secrets.token_hex(16).encode()
    arrived = threading.Event()
    done = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(timeout)
                data = b""
                try:
                    while len(data) < len(token) and (chunk := conn.recv(len(token) - len(data))):
                        data += chunk
                except OSError:
                    continue
                if data == token:
                    arrived.set()
                    return

    thread = threading.Thread(target=accept, name="sheepdog-probe", daemon=True)
    thread.start()
    try:
        bound = listener.getsockname()[1]
        command, code = _remote_python("probe", address, bound, token.decode())
        answer = shell.run(command, stdin=code, timeout=timeout + 30)
        said = answer.stdout.strip() or answer.stderr.strip() or f"exit {answer.returncode}"
        said = said.splitlines()[-1]
        if said == "ok":
            arrived.wait(timeout)
    finally:
        done.set()
        thread.join()
        listener.close()
    if arrived.is_set():
        return None
    if said == "ok":
        return f"the head node connected to {address}:{bound} but not to this machine"
    return f"the head node cannot connect to {address}:{bound}: {said.removeprefix('fail ')}"


class Tunnel:
    """A reverse forward from the head node's loopback to the endpoint here (``deliver_to``), and the
    relay that makes it reachable from the nodes; re-made when SSH reconnects, on the same ports if free."""

    def __init__(self, shell: SSHShell) -> None:
        self._shell = shell
        self._local = ("127.0.0.1", 0)  # no port: not delivering yet (see deliver_to)
        self._on_moved: Callable[[str, int, bool], None] | None = None
        self._relay_pid = 0  # on the head node: ended when the tunnel is re-made over a new connection
        self._transport: Any = None
        self._relay: Any = None  # the channel the relay runs in: closing it ends the relay
        self._forwarded = 0  # the forward's port on the head node's loopback
        self.host = ""
        self.port = 0  # the relay's port, which the nodes connect to
        self._closed = threading.Event()
        self._pump = _Pump(lambda: self._local)
        self._watcher = threading.Thread(target=self._watch, name="sheepdog-tunnel", daemon=True)

    def deliver_to(
        self, local_host: str, local_port: int, on_moved: Callable[[str, int, bool], None] | None = None
    ) -> None:
        """Where connections through the tunnel go (the endpoint), and whom to tell when it moved."""
        self._local = (local_host, local_port)
        self._on_moved = on_moved

    def open(self) -> tuple[str, int]:
        """Set up forward and relay; return the relay's (host, port)."""
        self._establish(self._shell.transport())
        self._pump.start()
        self._watcher.start()
        return self.host, self.port

    def _establish(self, transport: Any) -> None:
        import paramiko

        try:
            try:
                forwarded = transport.request_port_forward(
                    "127.0.0.1", self._forwarded, handler=self._incoming
                )
            except paramiko.SSHException:
                if not self._forwarded:
                    raise
                # the old port is still held (by the old connection, or someone else): any port
                forwarded = transport.request_port_forward("127.0.0.1", 0, handler=self._incoming)
        except paramiko.SSHException as exc:
            raise ConnectionFailed(
                f"the SSH server of {self._shell.description} refused to forward a port back to this "
                f"client ({exc}): its sshd_config may say AllowTcpForwarding no (or DisableForwarding "
                "yes). Ask its admins to allow remote forwarding, or use callback='direct' if the "
                "nodes can connect to this machine"
            ) from exc
        try:
            relay, host, port = self._start_relay(transport, forwarded)
        except BaseException:
            _quietly(transport.cancel_port_forward, "127.0.0.1", forwarded)
            raise
        self._transport, self._relay, self._forwarded = transport, relay, forwarded
        self.host, self.port = host, port

    def _start_relay(self, transport: Any, forwarded: int) -> tuple[Any, str, int]:
        """The relay on its old port, or on any free one when that is taken."""
        try:
            return self._start_relay_on(transport, forwarded, self.port)
        except ConnectionFailed as exc:
            if not self.port:
                raise
            log.warning("%s; starting it on another port", exc)
            return self._start_relay_on(transport, forwarded, 0)

    def _start_relay_on(self, transport: Any, forwarded: int, port: int) -> tuple[Any, str, int]:
        channel = open_session(transport, 30)
        channel.settimeout(30)
        command, code = _remote_python("relay", forwarded, port)
        channel.exec_command(command)
        channel.sendall(code)  # and never more: the relay ends when its stdin does
        line = b""
        try:
            while not line.endswith(b"\n") and (byte := channel.recv(1)):
                line += byte
        except TimeoutError:
            pass
        words = line.decode(errors="replace").split()
        if len(words) != 4 or words[0] != "sheepdog-relay" or not (words[2] + words[3]).isdigit():
            error = b""
            try:
                error = channel.makefile_stderr("rb").read()
            except OSError:
                pass
            channel.close()
            said = error.decode(errors="replace").strip().splitlines() or [line.decode(errors="replace")]
            raise ConnectionFailed(
                f"could not start the tunnel's relay on {self._shell.description}: {said[-1] or 'no answer'}"
            )
        channel.settimeout(None)
        self._relay_pid = int(words[3])
        return channel, words[1], int(words[2])

    # -- connections from the nodes -----------------------------------------------------------
    def _incoming(self, channel: Any, origin: tuple[str, int], server: tuple[str, int]) -> None:
        """Called on paramiko's transport thread for every connection to the forwarded port."""
        self._pump.add(channel)

    # -- keeping it up -------------------------------------------------------------------------
    def _watch(self) -> None:
        """Re-make forward and relay, on the same ports, after a reconnect or if the relay died."""
        complained = False
        while not self._closed.wait(2.0) and not self._shell.closed:
            transport = self._shell.transport(reconnect=False)
            if transport is None or (transport is self._transport and not self._relay.exit_status_ready()):
                continue
            before = (self.host, self.port)
            try:
                if transport is self._transport:  # same connection, the relay ended: start another
                    self._relay, self.host, self.port = self._start_relay(transport, self._forwarded)
                else:
                    old = self._relay
                    # the old relay lives on until sshd notices the old connection is gone: end it
                    self._end_old_relay()
                    self._establish(transport)
                    _quietly(old.close)
                log.info("tunnel re-opened: relay %s:%d", self.host, self.port)
                complained = False
                if self._on_moved is not None:
                    self._on_moved(self.host, self.port, (self.host, self.port) != before)
            except Exception as exc:  # noqa: BLE001 - try again on the next round
                if not complained:
                    log.warning("could not re-open the tunnel (will keep trying): %s", exc)
                    complained = True

    def _end_old_relay(self) -> None:
        if self._relay_pid:
            pid = int(self._relay_pid)
            self._shell.run(f"grep -qs sheepdog-executor /proc/{pid}/cmdline && kill {pid}; true", timeout=30)

    def close(self) -> None:
        """End the relay and the forward and every connection through them. Safe to call twice."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._pump.close()
        if self._relay is not None:
            _quietly(self._relay.close)
        transport = self._transport
        if transport is not None and transport.is_active():
            _quietly(transport.cancel_port_forward, "127.0.0.1", self._forwarded)
        if self._watcher.is_alive() and threading.current_thread() is not self._watcher:
            self._watcher.join(timeout=10)


#: Bytes a connection holds in each direction: reading its source waits until they are passed on.
_CHUNK = 65536
#: How long a connection to the endpoint may take to open.
_CONNECT_SECONDS = 10.0
#: How often a channel whose SSH window is full is tried again (paramiko signals no window opening).
_WINDOW_POLL = 0.01


class _Link:
    """One connection through the tunnel: the SSH channel from the head node, the socket to the endpoint."""

    def __init__(self, channel: Any, sock: socket.socket) -> None:
        self.channel = channel
        self.channel_fd: int = channel.fileno()  # paramiko's pipe, readable when the channel is
        self.sock = sock
        self.born = time.monotonic()
        self.connected = False
        self.to_sock = b""  # read from the channel, not yet written to the endpoint
        self.to_channel = b""
        self.channel_eof = False  # the worker's side said end of file
        self.sock_eof = False
        self.sock_shut = False  # the end of file passed on to the endpoint
        self.channel_shut = False
        self.closed = False


class _Pump:
    """Moves the bytes of every connection through the tunnel on one thread: ``selectors`` (epoll,
    no descriptor-number limit) on the sockets and on the channels' ``fileno()``, so a thousand
    workers cost no more threads than ten. Each direction holds at most ``_CHUNK`` bytes: a slow
    reader on either side holds its source back (the SSH window does the rest)."""

    def __init__(self, local: Callable[[], tuple[str, int]]) -> None:
        self._local = local
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._incoming: collections.deque[Any] = collections.deque()  # from paramiko's thread
        self._links: set[_Link] = set()
        self._connecting: dict[_Link, None] = {}  # oldest first
        self._blocked: set[_Link] = set()  # with bytes for a channel whose window is full
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sheepdog-tunnel-pump", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, channel: Any) -> None:
        """A new connection through the forward (called on paramiko's transport thread)."""
        self._incoming.append(channel)
        self._wake()
        if self._closing.is_set() and not self._thread.is_alive():
            while self._incoming:  # too late: closed meanwhile
                _quietly(self._incoming.popleft().close)

    def close(self) -> None:
        """End every connection, and the thread. Safe to call twice."""
        self._closing.set()
        self._wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        elif not self._thread.is_alive():
            self._close_all()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # full: a wake-up is pending anyway; closed: nothing to wake

    def _run(self) -> None:
        try:
            while not self._closing.is_set():
                for key, mask in self._selector.select(self._timeout()):
                    if key.data is None:
                        _drain(self._wake_r)
                    else:
                        self._move(key.data, key.fd, mask)
                self._accept()
                for link in list(self._blocked):
                    if link.channel.send_ready():
                        self._move(link, link.channel_fd, 0)
                self._expire()
        except Exception:  # pragma: no cover - a bug here must not pass silently
            log.exception("the tunnel's pump failed: its connections are closed")
        finally:
            self._close_all()

    def _close_all(self) -> None:
        for link in list(self._links):
            self._close(link)
        while self._incoming:
            _quietly(self._incoming.popleft().close)
        for resource in (self._selector, self._wake_r, self._wake_w):
            resource.close()

    def _timeout(self) -> float | None:
        if self._blocked:
            return _WINDOW_POLL
        if self._connecting:
            return max(0.0, next(iter(self._connecting)).born + _CONNECT_SECONDS - time.monotonic())
        return None

    def _accept(self) -> None:
        while self._incoming:
            channel = self._incoming.popleft()
            host, port = self._local()
            try:
                if not port:
                    raise ConnectionRefusedError("the endpoint is not started yet")
                family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                log.debug("tunnel: endpoint unreachable: %s", exc)
                _quietly(channel.close)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            channel.settimeout(0.0)
            link = _Link(channel, sock)
            self._links.add(link)
            if sock.connect_ex(address) not in (0, errno.EINPROGRESS):
                self._close(link)
                continue
            self._connecting[link] = None
            self._selector.register(sock, selectors.EVENT_WRITE, link)

    def _move(self, link: _Link, fd: int, mask: int) -> None:
        if link.closed:
            return
        try:
            if fd != link.channel_fd and not link.connected:
                error = link.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise ConnectionRefusedError(error, os.strerror(error))
                link.connected = True
                del self._connecting[link]
            elif mask & selectors.EVENT_READ:
                self._read(link, fd)
            self._flush(link)
        except Exception as exc:  # noqa: BLE001 - OSError, EOFError, paramiko's: this connection only
            log.debug("tunnel connection ended: %s", exc)
            self._close(link)
            return
        if link.channel_eof and link.sock_eof and not link.to_sock and not link.to_channel:
            self._close(link)
        else:
            self._listen(link)

    def _read(self, link: _Link, fd: int) -> None:
        if fd == link.channel_fd:
            try:
                data = link.channel.recv(_CHUNK)
            except TimeoutError:  # the pipe said readable, the buffer was empty after all
                return
            link.to_sock = data
            link.channel_eof = not data
        else:
            try:
                data = link.sock.recv(_CHUNK)
            except BlockingIOError:
                return
            link.to_channel = data
            link.sock_eof = not data

    def _flush(self, link: _Link) -> None:
        """Write what is pending, as far as each side takes it; pass an end of file on."""
        if link.connected and link.to_sock:
            try:
                link.to_sock = link.to_sock[link.sock.send(link.to_sock) :]
            except BlockingIOError:
                pass
        if link.connected and link.channel_eof and not link.to_sock and not link.sock_shut:
            link.sock.shutdown(socket.SHUT_WR)
            link.sock_shut = True
        while link.to_channel:
            try:
                sent = link.channel.send(link.to_channel)
            except TimeoutError:  # the SSH window is full
                break
            if not sent:
                raise EOFError("the channel is closed")
            link.to_channel = link.to_channel[sent:]
        if link.to_channel:
            self._blocked.add(link)
            return
        self._blocked.discard(link)
        if link.sock_eof and not link.channel_shut:
            shutdown_write(link.channel)
            link.channel_shut = True

    def _listen(self, link: _Link) -> None:
        """Wait for what can move next: read a side only when nothing of its is pending."""
        sock = 0
        if not link.connected or link.to_sock:
            sock |= selectors.EVENT_WRITE
        if link.connected and not link.sock_eof and not link.to_channel:
            sock |= selectors.EVENT_READ
        self._want(link.sock, sock, link)
        channel = selectors.EVENT_READ if link.connected and not link.channel_eof and not link.to_sock else 0
        self._want(link.channel_fd, channel, link)

    def _want(self, fileobj: Any, events: int, link: _Link) -> None:
        try:
            registered = self._selector.get_key(fileobj).events
        except KeyError:
            registered = 0
        if events == registered:
            return
        if not events:
            self._selector.unregister(fileobj)
        elif not registered:
            self._selector.register(fileobj, events, link)
        else:
            self._selector.modify(fileobj, events, link)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._connecting and (oldest := next(iter(self._connecting))).born + _CONNECT_SECONDS <= now:
            log.debug("tunnel: the endpoint did not accept a connection within %.0f s", _CONNECT_SECONDS)
            self._close(oldest)

    def _close(self, link: _Link) -> None:
        if link.closed:
            return
        link.closed = True
        self._links.discard(link)
        self._connecting.pop(link, None)
        self._blocked.discard(link)
        for fileobj in (link.sock, link.channel_fd):  # before the channel closes its pipe
            try:
                self._selector.unregister(fileobj)
            except (KeyError, ValueError):
                pass
        link.sock.close()
        _quietly(link.channel.close)


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass


def _quietly(action: Any, *args: Any) -> None:
    try:
        action(*args)
    except Exception as exc:  # noqa: BLE001 - tearing down: the other side may be gone already
        log.debug("tunnel teardown: %s", exc)
