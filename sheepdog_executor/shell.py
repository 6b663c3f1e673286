"""Run commands on the head node and put files there: over SSH (paramiko) or on this machine.

``SSHShell`` honours ``~/.ssh/config`` (HostName, User, Port, IdentityFile, ProxyJump), checks host
keys against known_hosts and reconnects with backoff when the connection drops.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from sheepdog_executor.errors import CommandTimedOut, ConnectionFailed, DiskFull, UnknownHostKey

log = logging.getLogger("sheepdog_executor")
# paramiko logs a failed handshake (e.g. a port that accepts TCP but speaks no SSH) at ERROR from its
# own thread; with no handler anywhere, Python's last-resort handler prints that on stderr although
# we raise a ConnectionFailed saying the same. A NullHandler keeps it off stderr; an application that
# configures logging still receives paramiko's records through the root logger.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


#: A command bounded by ``bounded`` gets this much less time on the head node than the client
#: waits, so that the head node ends it (and its exit status arrives) before the client gives up.
BOUND_MARGIN = 5.0
#: The exit status of a command that coreutils' ``timeout`` ended.
TIMED_OUT = 124
#: How long a connection whose command hung has to run ``true`` to show that it is healthy.
PROBE_SECONDS = 10.0

#: Sessions (commands, file transfers) open at once on one connection: OpenSSH's sshd refuses more
#: than 10 (MaxSessions), counting for a moment those just closed, and the tunnel's relay holds one.
MAX_SESSIONS = 6


@dataclass(frozen=True)
class Completed:
    """What a command did: its exit status and output."""

    command: str
    returncode: int
    stdout: str
    stderr: str


def bounded(script: str, timeout: float) -> str:
    """``script`` under coreutils' ``timeout`` on the head node: ended there (TERM, then KILL to its
    whole process group) ``BOUND_MARGIN`` seconds before a client waiting ``timeout`` seconds gives
    up, so that a hung command is not left running; it then exits with ``TIMED_OUT``. Run by the
    same shell as the lines around it would be (the login shell over SSH), as it is where
    ``timeout`` is missing."""
    quoted = shlex.quote(script)
    seconds = bound_seconds(timeout)
    return (
        "s=$(readlink /proc/$$/exe 2>/dev/null) || s=/bin/sh\n"
        f'if command -v timeout >/dev/null 2>&1; then exec timeout -k 2 {seconds} "$s" -c {quoted} ; '
        f'else exec "$s" -c {quoted} ; fi'
    )


def bound_seconds(timeout: float) -> int:
    """How long ``bounded`` lets a command run on the head node when the client waits ``timeout``."""
    return max(1, int(timeout - BOUND_MARGIN))


class Shell:
    """A place to run scheduler commands: the head node over SSH, or this machine."""

    description = "this machine"

    def run(
        self, command: str, *, stdin: bytes = b"", timeout: float = 120.0, retry: bool = True
    ) -> Completed:
        """Run ``command`` with /bin/sh; ``retry=False`` for commands that must not run twice."""
        raise NotImplementedError

    def put(self, path: str, data: bytes, mode: int = 0o600, *, replace: bool = False) -> None:
        """Write a file that only its owner can read (mode is applied before any byte is written);
        with ``replace``, written as ``PATH.new`` and renamed over ``path``: a reader sees the old
        file or the new one, never a part."""
        raise NotImplementedError

    def callback_address(self) -> str:
        """The address of this client as seen from the cluster side of the connection."""
        raise NotImplementedError

    def free_bytes(self, path: str) -> int | None:
        """The bytes free (for the user) on the filesystem of ``path`` or of its nearest existing
        directory, or None when ``df`` does not say."""
        script = (
            f"d={shlex.quote(path)}\n"
            'while [ ! -d "$d" ] && [ "$d" != / ]; do d=$(dirname -- "$d"); done\ndf -Pk -- "$d"'
        )
        try:
            done = self.run(script, timeout=30)
        except ConnectionFailed:
            return None
        fields = done.stdout.strip().splitlines()[-1:][0].split() if done.stdout.strip() else []
        return int(fields[3]) * 1024 if len(fields) >= 4 and fields[3].isdigit() else None

    def disk_full(self, path: str) -> DiskFull:
        """The error for a write to ``path`` that met a full disk, with the bytes free there."""
        return DiskFull(path, self.free_bytes(os.path.dirname(path) or "."))

    def close(self) -> None:
        pass


class LocalShell(Shell):
    """Commands run here, with /bin/sh: the client is on the head node (``host=None``)."""

    def run(
        self, command: str, *, stdin: bytes = b"", timeout: float = 120.0, retry: bool = True
    ) -> Completed:
        log.debug("local$ %s", command)
        proc = subprocess.run(
            ["/bin/sh", "-c", command], input=stdin, capture_output=True, timeout=timeout, check=False
        )
        return Completed(
            command,
            proc.returncode,
            proc.stdout.decode(errors="replace"),
            proc.stderr.decode(errors="replace"),
        )

    def put(self, path: str, data: bytes, mode: int = 0o600, *, replace: bool = False) -> None:
        final = Path(os.path.expanduser(path))
        target = final.with_name(final.name + ".new") if replace else final
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), mode)
                handle.write(data)
        except OSError as exc:
            if _is_no_space(exc):
                raise self.disk_full(str(target)) from exc
            raise
        if replace:
            os.replace(target, final)

    def callback_address(self) -> str:
        return _address_towards("8.8.8.8") or socket.gethostbyname(socket.gethostname())

    def free_bytes(self, path: str) -> int | None:
        directory = Path(os.path.expanduser(path))
        while not directory.is_dir() and directory != directory.parent:
            directory = directory.parent
        try:
            stat = os.statvfs(directory)
        except OSError:
            return None
        return stat.f_bavail * stat.f_frsize


class _ShortWrite(OSError):
    """The server has fewer bytes of a file than were sent (it dropped a write)."""


def _is_no_space(error: BaseException) -> bool:
    """Whether ``error`` says the disk or the quota is full (locally, or in a remote tool's text)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(error) for text in ("No space left on device", "Disk quota exceeded"))


def _address_towards(peer: str) -> str | None:
    """The local address the kernel would use to reach ``peer`` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((peer, 9))
            return str(probe.getsockname()[0])
    except OSError:
        return None


@dataclass(frozen=True)
class SSHTarget:
    """Where and how to log in, after ~/.ssh/config and explicit arguments are combined."""

    alias: str
    hostname: str
    port: int
    user: str | None
    key_filenames: tuple[str, ...]
    proxy_jump: str | None
    connect_timeout: float
    config_path: str = "~/.ssh/config"

    def jump_target(self) -> SSHTarget | None:
        """The host to hop through (ProxyJump), itself hopping through the hops before it."""
        if not self.proxy_jump or self.proxy_jump.lower() == "none":
            return None
        *earlier, last = self.proxy_jump.split(",")
        user, _, rest = last.rpartition("@")
        host, _, port = rest.partition(":")
        target = SSHTarget.resolve(
            host,
            user=user or None,
            port=int(port) if port else None,
            config_path=self.config_path,
            connect_timeout=self.connect_timeout,
        )
        return dataclasses.replace(target, proxy_jump=",".join(earlier) or target.proxy_jump)

    @classmethod
    def resolve(
        cls,
        host: str,
        *,
        user: str | None = None,
        port: int | None = None,
        key_filename: str | None = None,
        config_path: str = "~/.ssh/config",
        connect_timeout: float = 15.0,
    ) -> SSHTarget:
        import paramiko

        entry: dict[str, Any] = {"hostname": host}
        config_file = os.path.expanduser(config_path)
        if os.path.exists(config_file):
            entry = dict(paramiko.SSHConfig.from_path(config_file).lookup(host))
        keys = [key_filename] if key_filename else list(entry.get("identityfile", []))
        return cls(
            alias=host,
            hostname=entry.get("hostname", host),
            port=int(port or entry.get("port", 22)),
            user=user or entry.get("user"),
            key_filenames=tuple(os.path.expanduser(k) for k in keys),
            proxy_jump=entry.get("proxyjump"),
            connect_timeout=connect_timeout,
            config_path=config_path,
        )


class SSHShell(Shell):
    """Commands run on the head node over one paramiko connection, re-opened when it drops."""

    def __init__(self, target: SSHTarget, *, reconnect_timeout: float = 60.0) -> None:
        self.target = target
        self.description = f"{target.alias} ({target.user or ''}@{target.hostname}:{target.port})"
        self._reconnect_timeout = reconnect_timeout
        self._lock = threading.Lock()
        self._client: Any = None
        self._jump: SSHShell | None = None
        self._closed = False
        #: Commands and file transfers may run at the same time, each in a session of its own
        self._sessions = threading.BoundedSemaphore(MAX_SESSIONS)
        self._connect()

    # -- connection -------------------------------------------------------------------------
    def _connect(self) -> None:
        import paramiko

        t = self.target
        client = paramiko.SSHClient()
        client.load_system_host_keys()
        known = os.path.expanduser("~/.ssh/known_hosts")
        if os.path.exists(known):
            client.load_host_keys(known)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        sock = None
        jump = t.jump_target()
        if jump is not None:
            if self._jump is None:
                self._jump = SSHShell(jump, reconnect_timeout=self._reconnect_timeout)
            transport = self._jump._usable_transport()
            sock = transport.open_channel("direct-tcpip", (t.hostname, t.port), ("127.0.0.1", 0))
        try:
            if sock is None:
                sock = _tcp_connection(t.hostname, t.port, t.connect_timeout)
            client.connect(
                t.hostname,
                port=t.port,
                username=t.user,
                key_filename=list(t.key_filenames) or None,  # type: ignore[arg-type]
                sock=sock,
                timeout=t.connect_timeout,
                banner_timeout=t.connect_timeout,
                auth_timeout=t.connect_timeout,
                allow_agent=True,
                look_for_keys=not t.key_filenames,
            )
        except paramiko.SSHException as exc:
            transport = client.get_transport()
            client.close()
            self._raise_ssh_failure(transport, exc)
        except (OSError, EOFError) as exc:
            raise ConnectionFailed(
                f"cannot reach {self.description}: {exc}; check the host name and port "
                f"(`ssh {t.alias}` should work from this machine)"
            ) from exc
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(15)
        self._client = client
        log.debug("connected to %s", self.description)

    def _raise_ssh_failure(self, transport: Any, exc: Exception) -> NoReturn:
        """The SSH handshake failed: raise what happened and what to change (no banner, an unknown
        host key, authentication, anything else)."""
        import paramiko

        t = self.target
        if transport is not None and not transport.remote_version:
            raise ConnectionFailed(
                f"{self.description} accepted the TCP connection but sent no SSH banner within "
                f"{t.connect_timeout:g} s: is an SSH server listening on port {t.port} of "
                f"{t.hostname}? Check the host name and port (`ssh {t.alias}` should work from "
                "this machine), or raise connect_timeout= for a slow server"
            ) from None
        if "not found in known_hosts" in str(exc):
            raise UnknownHostKey(
                f"the host key of {self.description} is not in ~/.ssh/known_hosts; log in once "
                f"with `ssh {t.alias}` (or `ssh-keyscan -p {t.port} {t.hostname} >> "
                f"~/.ssh/known_hosts`) after checking its fingerprint"
            ) from exc
        if isinstance(exc, paramiko.AuthenticationException):
            raise ConnectionFailed(
                f"SSH authentication to {self.description} failed ({exc}); check the user and "
                f"IdentityFile for {t.alias} in ~/.ssh/config, or pass user= / key_filename="
            ) from exc
        raise ConnectionFailed(f"SSH to {self.description} failed: {exc}") from exc

    def _reconnect(self, error: BaseException) -> None:
        deadline = time.monotonic() + self._reconnect_timeout
        delay = 0.5
        while True:
            if self._closed or time.monotonic() > deadline:
                raise ConnectionFailed(
                    f"lost the SSH connection to {self.description} ({error}) and could not "
                    f"re-open it within {self._reconnect_timeout:.0f} s"
                ) from error
            log.warning("SSH connection to %s lost (%s); reconnecting", self.description, error)
            try:
                self._connect()
                return
            except ConnectionFailed as exc:
                if isinstance(exc, UnknownHostKey):
                    raise
                error = exc
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    @property
    def closed(self) -> bool:
        return self._closed

    def transport(self, reconnect: bool = True) -> Any:
        """The paramiko Transport of the connection (for port forwarding): re-opened first when it
        dropped, or with ``reconnect=False`` None when it is down."""
        if reconnect:
            return self._usable_transport()
        with self._lock:
            transport = self._client.get_transport() if self._client else None
            return transport if transport is not None and transport.is_active() else None

    def _usable_transport(self) -> Any:
        with self._lock:
            transport = self._client.get_transport() if self._client else None
            if transport is None or not transport.is_active():
                self._reconnect(ConnectionError("transport closed"))
                transport = self._client.get_transport()
            return transport

    # -- commands ---------------------------------------------------------------------------
    def run(
        self, command: str, *, stdin: bytes = b"", timeout: float = 120.0, retry: bool = True
    ) -> Completed:
        import paramiko

        log.debug("%s$ %s", self.target.alias, command)
        attempts = 2 if retry else 1
        for attempt in range(attempts):
            transport = channel = None
            try:
                with self._sessions:
                    transport = self._usable_transport()
                    channel = open_session(transport, timeout)
                    channel.settimeout(timeout)
                    channel.exec_command(command)
                    if stdin:
                        channel.sendall(stdin)
                    shutdown_write(channel)
                    out, err = _drain(channel)
                    code = channel.recv_exit_status()
                    channel.close()
                return Completed(command, code, out.decode(errors="replace"), err.decode(errors="replace"))
            except (paramiko.SSHException, EOFError, OSError) as exc:
                if channel is not None:
                    channel.close()
                if transport is not None and (isinstance(exc, TimeoutError) or "Timeout" in str(exc)):
                    if _answers(transport):  # the command hung, not the connection: keep it
                        raise CommandTimedOut(
                            f"a command on {self.description} did not end within {timeout:.0f} s "
                            f"(the connection answers): {command.splitlines()[-1][:200]}"
                        ) from exc
                    # no answer in time: the connection may be dead without knowing it (the laptop
                    # went offline, or changed networks); the next command opens a new one
                    self._drop(transport)
                if attempt == attempts - 1 or self._closed:
                    raise ConnectionFailed(f"command on {self.description} failed: {exc}") from exc
                # the next attempt re-opens the connection if it is down (not merely a failed channel)
        raise AssertionError("unreachable")

    def _drop(self, transport: Any) -> None:
        """Close the connection of ``transport`` if it is still the current one."""
        with self._lock:
            if self._client is not None and self._client.get_transport() is transport:
                log.warning("SSH connection to %s does not answer; closing it", self.description)
                self._client.close()

    def put(self, path: str, data: bytes, mode: int = 0o600, *, replace: bool = False) -> None:
        target = f"{path}.new" if replace else path
        try:
            try:
                renamed = self._put(target, data, mode, path if replace else None)
            except FileNotFoundError:  # its directory is missing: made 0700, as LocalShell.put makes it
                self.run(f"mkdir -p -m 700 {shlex.quote(os.path.dirname(path))}")
                renamed = self._put(target, data, mode, path if replace else None)
        except OSError as exc:  # SFTP says only "Failure" for a full disk: df tells
            if isinstance(exc, (FileNotFoundError, PermissionError, ConnectionError, TimeoutError)):
                raise
            full = self.disk_full(target)
            short = full.free is not None and full.free < len(data)
            if isinstance(exc, _ShortWrite) or _is_no_space(exc) or short:
                raise full from exc
            raise
        if replace and not renamed:  # an SFTP server without OpenSSH's posix-rename
            self.run(f"mv -f {shlex.quote(target)} {shlex.quote(path)}")

    def _put(self, path: str, data: bytes, mode: int, rename_to: str | None) -> bool:
        """Write ``path`` over SFTP, then rename it to ``rename_to`` if given; False when the server
        could not rename it so (its rename refuses to replace a file)."""
        import paramiko

        with self._sessions:
            channel = open_session(self._usable_transport(), 30.0)
            channel.invoke_subsystem("sftp")
            sftp = paramiko.SFTPClient(channel)
            try:
                # create empty, restrict, then write: the content never sits in a readable file
                with sftp.open(path, "wb") as handle:
                    handle.chmod(mode)
                    handle.set_pipelined(True)
                    handle.write(data)
                    handle.flush()
                    # paramiko drops the answers to pipelined writes, errors too (a full disk, a
                    # quota): the size the server reports (one round trip) shows a short write
                    written = handle.stat().st_size
                if written != len(data):
                    raise _ShortWrite(f"{written} of {len(data)} bytes written")
                if rename_to is not None:
                    try:
                        sftp.posix_rename(path, rename_to)
                    except OSError:
                        return False
                return True
            finally:
                sftp.close()

    def callback_address(self) -> str:
        transport = self._usable_transport()
        return (
            str(transport.sock.getsockname()[0])
            if isinstance(transport.sock, socket.socket)
            else (_address_towards(self.target.hostname) or "127.0.0.1")
        )

    def close(self) -> None:
        self._closed = True
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
        if self._jump is not None:
            self._jump.close()


def open_session(transport: Any, timeout: float, patience: float = 10.0) -> Any:
    """A new session (channel) on ``transport``. sshd refuses one beyond its MaxSessions (10 by
    default, fewer at some sites), counting for a moment those just closed: then again, once
    another ended, for up to ``patience`` seconds. (With channels opened at once, paramiko may
    report the refusal as a plain "Unable to open channel.", its reason taken by another.)"""
    import paramiko

    deadline = time.monotonic() + min(patience, timeout)
    delay = 0.01
    while True:
        try:
            return transport.open_session(timeout=timeout)
        except paramiko.SSHException:
            if not transport.is_active() or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _answers(transport: Any) -> bool:
    """Whether the connection of ``transport`` still runs a command (``true``) within
    ``PROBE_SECONDS``: one command that hung says nothing of the connection."""
    try:
        channel = open_session(transport, PROBE_SECONDS, patience=PROBE_SECONDS / 2)
    except Exception:  # noqa: BLE001 - any failure here means: not healthy
        return False
    try:
        channel.settimeout(PROBE_SECONDS)
        channel.exec_command("true")
        return bool(channel.status_event.wait(PROBE_SECONDS))
    except Exception:  # noqa: BLE001
        return False
    finally:
        channel.close()


def shutdown_write(channel: Any) -> None:
    """``channel.shutdown_write()`` without paramiko's race (paramiko issues 1115, 1705): it makes
    the EOF under the channel's lock but sends it after, so its own thread, closing the channel of a
    command that ended meanwhile, may send the close first; OpenSSH then ends the whole connection
    ("ieof packet referred to nonexistent channel"). Here the lock is held until the EOF is sent."""
    with channel.lock:
        message = channel._send_eof()
        if message is not None and channel.transport is not None:
            channel.transport._send_user_message(message)


def _tcp_connection(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection with Nagle's algorithm off. SSH sends small packets in a row (a channel's
    request, then its EOF), and with Nagle each waited for the delayed ACK of the one before: about
    40 ms per command, and half of the handshake's time, on any link."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _drain(channel: Any) -> tuple[bytes, bytes]:
    """Read a finished command's output; stderr is small enough to sit in paramiko's buffer."""
    out = channel.makefile("rb").read()
    err = channel.makefile_stderr("rb").read()
    return out, err


#: The executor options (``options.ExecutorOptions``) that say how to reach the head node, and
#: ``SSHTarget.resolve``'s name of each.
SSH_OPTIONS = {
    "user": "user",
    "port": "port",
    "key_filename": "key_filename",
    "ssh_config": "config_path",
    "connect_timeout": "connect_timeout",
}


def connect(host: str | None, options: Mapping[str, Any]) -> Shell:
    """The shell to the head node from an executor's options: SSH, or this machine with ``host=None``."""
    if host is None:
        return LocalShell()
    arguments = {SSH_OPTIONS[k]: v for k, v in options.items() if k in SSH_OPTIONS and v is not None}
    return SSHShell(SSHTarget.resolve(host, **arguments))
