"""Runs on the head node, started over the executor's SSH connection; stdlib only, Python 3.6+.

``relay TARGET_PORT LISTEN_PORT``: listen on every interface (LISTEN_PORT, 0 for any) and pass each
connection through to ``127.0.0.1:TARGET_PORT``, the loopback end of the SSH reverse forward that sshd
binds when GatewayPorts is off. Prints ``sheepdog-relay HOST PORT PID`` once listening; exits when its
stdin closes, that is when the SSH channel or connection that started it goes away.

One thread moves the bytes of every connection (``selectors``: epoll, no descriptor-number limit), so a
thousand workers cost the head node no more threads than ten. Other users share the head node and
the relay cannot authenticate anyone (requests are signed end to end, and with TLS encrypted): a
connection is passed on only once it sent something (a worker speaks first), so idle ones cost the
client nothing; of those that have sent nothing, at most ``MAX_SILENT`` are kept, the oldest closed
first, and each is closed ``SILENT_SECONDS`` after it was accepted. Out of descriptors, the oldest
silent connection makes room. A slow reader is not buffered for: each direction holds at most
``CHUNK`` bytes, and reading its source waits until they are passed on.

``probe HOST PORT TOKEN``: connect to HOST:PORT and send TOKEN; prints ``ok`` or ``fail REASON``.
The client, listening there, checks that the token arrived.
"""

import collections
import errno
import os
import selectors
import socket
import sys
import time

CHUNK = 65536
MAX_SILENT = 512
SILENT_SECONDS = 30.0
CONNECT_SECONDS = 30.0


class Link:
    """One worker's connection (``client``) and its way to the forward (``upstream``)."""

    def __init__(self, client):
        self.client = client
        self.upstream = None
        self.connected = False
        self.born = time.monotonic()
        self.to_upstream = b""  # read from the client, not yet written upstream
        self.to_client = b""
        self.client_eof = False  # the client said end of file (passed on once its bytes are)
        self.upstream_eof = False
        self.closed = False


class Relay:
    def __init__(self, server, target_port):
        self.server = server
        self.target = ("127.0.0.1", target_port)
        self.selector = selectors.DefaultSelector()
        self.silent = collections.OrderedDict()  # Link -> None, oldest first
        self.connecting = collections.OrderedDict()  # Link -> None, oldest first
        self.accepting = True
        self.paused_until = 0.0
        server.setblocking(False)
        self.selector.register(server, selectors.EVENT_READ, None)
        self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")

    def run(self):
        while True:
            timeout = None
            for waiting, patience in ((self.silent, SILENT_SECONDS), (self.connecting, CONNECT_SECONDS)):
                if waiting:
                    left = max(0.0, next(iter(waiting)).born + patience - time.monotonic())
                    timeout = left if timeout is None else min(timeout, left)
            if not self.accepting:
                timeout = min(timeout if timeout is not None else 1.0, 0.1)
            for key, mask in self.selector.select(timeout):
                if key.data is None:
                    self.accept()
                elif key.data == "stdin":
                    if not os.read(key.fd, 4096):
                        os._exit(0)  # the client's SSH channel is gone: so is the session
                else:
                    self.move(key.data, key.fileobj, mask)
            now = time.monotonic()
            for waiting, patience in ((self.silent, SILENT_SECONDS), (self.connecting, CONNECT_SECONDS)):
                while waiting and next(iter(waiting)).born + patience <= now:
                    self.close(next(iter(waiting)))
            if not self.accepting and now >= self.paused_until:
                self.accepting = True
                self.selector.register(self.server, selectors.EVENT_READ, None)

    def accept(self):
        for _ in range(256):  # then let the connections already here move
            try:
                client, _ = self.server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if self.silent:  # make room: the oldest that said nothing goes
                        self.close(next(iter(self.silent)))
                        continue
                    self.accepting = False  # the backlog keeps them meanwhile
                    self.paused_until = time.monotonic() + 0.1
                    self.selector.unregister(self.server)
                return
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = Link(client)
            self.silent[link] = None
            self.selector.register(client, selectors.EVENT_READ, link)
            while len(self.silent) > MAX_SILENT:
                self.close(next(iter(self.silent)))

    def connect(self, link):
        """Start the connection to the forward: the client has spoken."""
        self.silent.pop(link, None)
        try:
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            if not self.silent:
                self.close(link)
                return
            self.close(next(iter(self.silent)))  # out of descriptors: the oldest silent one goes
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        link.upstream = upstream
        upstream.setblocking(False)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link.born = time.monotonic()
        if upstream.connect_ex(self.target) not in (0, errno.EINPROGRESS):
            self.close(link)
            return
        self.connecting[link] = None
        self.selector.register(upstream, selectors.EVENT_WRITE, link)

    def move(self, link, sock, mask):
        if link.closed:
            return
        try:
            if sock is link.upstream and not link.connected:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    self.close(link)
                    return
                link.connected = True
                self.connecting.pop(link, None)
            elif mask & selectors.EVENT_READ:
                self.read(link, sock)
            self.flush(link)
        except OSError:
            self.close(link)
            return
        if link.client_eof and link.upstream_eof and not link.to_client and not link.to_upstream:
            self.close(link)
        elif not link.closed:
            self.listen(link)

    def read(self, link, sock):
        try:
            data = sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        if sock is link.client:
            if data:
                link.to_upstream = data
            else:
                link.client_eof = True
            if link.upstream is None:
                if not data:  # said nothing and left
                    self.close(link)
                    return
                self.connect(link)
        elif data:
            link.to_client = data
        else:
            link.upstream_eof = True

    def flush(self, link):
        """Write what is pending, as far as each side takes it; pass an end of file on."""
        if link.closed:
            return
        if link.connected:
            if link.to_upstream:
                link.to_upstream = link.to_upstream[send(link.upstream, link.to_upstream) :]
            if link.client_eof and not link.to_upstream:
                shut(link.upstream)
        if link.to_client:
            link.to_client = link.to_client[send(link.client, link.to_client) :]
        if link.upstream_eof and not link.to_client:
            shut(link.client)

    def listen(self, link):
        """Wait for what can move next: read a side only when nothing of its is pending."""
        client = 0
        if not link.client_eof and not link.to_upstream:
            client |= selectors.EVENT_READ
        if link.to_client:
            client |= selectors.EVENT_WRITE
        self.update(link.client, client, link)
        if link.upstream is not None:
            upstream = 0
            if not link.connected or link.to_upstream:
                upstream |= selectors.EVENT_WRITE
            if link.connected and not link.upstream_eof and not link.to_client:
                upstream |= selectors.EVENT_READ
            self.update(link.upstream, upstream, link)

    def update(self, sock, events, link):
        try:
            registered = self.selector.get_key(sock).events
        except KeyError:
            registered = 0
        if events == registered:
            return
        if not events:
            self.selector.unregister(sock)
        elif not registered:
            self.selector.register(sock, events, link)
        else:
            self.selector.modify(sock, events, link)

    def close(self, link):
        if link.closed:
            return
        link.closed = True
        self.silent.pop(link, None)
        self.connecting.pop(link, None)
        for sock in (link.client, link.upstream):
            if sock is None:
                continue
            try:
                self.selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()


def send(sock, data):
    """How much of ``data`` the socket took (none when its buffer is full)."""
    try:
        return sock.send(data)
    except (BlockingIOError, InterruptedError):
        return 0


def shut(sock):
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def more_descriptors():
    """As many descriptors as the head node lets this user have (the soft limit may be 1024)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def relay(target_port: int, listen_port: int) -> None:
    more_descriptors()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("", listen_port))
    server.listen(1024)
    sys.stdout.write(f"sheepdog-relay {socket.gethostname()} {server.getsockname()[1]} {os.getpid()}\n")
    sys.stdout.flush()
    Relay(server, target_port).run()


def probe(host: str, port: int, token: str) -> None:
    try:
        sock = socket.create_connection((host, port), timeout=5)
        sock.sendall(token.encode())
        sock.close()
        sys.stdout.write("ok\n")
    except OSError as exc:
        sys.stdout.write(f"fail {exc}\n")


if __name__ == "__main__":
    if sys.argv[1] == "relay":
        relay(int(sys.argv[2]), int(sys.argv[3]))
    else:
        probe(sys.argv[2], int(sys.argv[3]), sys.argv[4])
