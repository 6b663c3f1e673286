"""Runs on the head node, started over the executor's SSH connection; stdlib only, Python 3.6+.

``relay TARGET_PORT LISTEN_PORT``: listen on every interface (LISTEN_PORT, 0 for any) and pass each
connection through to ``127.0.0.1:TARGET_PORT``, the loopback end of the SSH reverse forward that sshd
binds when GatewayPorts is off. Prints ``sheepdog-relay HOST PORT PID`` once listening; exits when its
stdin closes, that is when the SSH channel or connection that started it goes away.

``probe HOST PORT TOKEN``: connect to HOST:PORT and send TOKEN; prints ``ok`` or ``fail REASON``.
The client, listening there, checks that the token arrived.

Only bytes pass through here: requests stay signed (and with TLS, encrypted) end to end.
"""

import os
import socket
import sys
import threading


def pipe(source: socket.socket, target: socket.socket) -> None:
    """Copy one direction until end of file, then pass the end of file on."""
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            target.sendall(data)
    except OSError:
        pass
    finally:
        try:
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def serve(client: socket.socket, target_port: int) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", target_port), timeout=30)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    for sock in (client, upstream):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=pipe, args=(upstream, client), name="relay-back")
    back.daemon = True
    back.start()
    pipe(client, upstream)
    back.join()
    client.close()
    upstream.close()


def watch_stdin() -> None:
    """The client holds our stdin open: its end of file means the session is over."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        os._exit(0)


def relay(target_port: int, listen_port: int) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("", listen_port))
    server.listen(128)
    watcher = threading.Thread(target=watch_stdin, name="relay-stdin")
    watcher.daemon = True
    watcher.start()
    sys.stdout.write(f"sheepdog-relay {socket.gethostname()} {server.getsockname()[1]} {os.getpid()}\n")
    sys.stdout.flush()
    while True:
        client, _ = server.accept()
        worker = threading.Thread(target=serve, args=(client, target_port), name="relay-conn")
        worker.daemon = True
        worker.start()


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
