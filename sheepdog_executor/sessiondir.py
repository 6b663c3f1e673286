"""The session directory on the head node: made as a new 0700 directory in a root only the user (and
root) can change, as OpenSSH's StrictModes checks the paths to ``authorized_keys``.

Whoever can rename or replace the session directory can swap the worker bundle the tasks run, and so
run code as the user: a root that another user owns or may write (a shared ``/tmp/shared``, mode 1777
or 777), or an ancestor of it that another user owns, is refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import secrets
import shlex
import socket
import time
from dataclasses import dataclass

from sheepdog_executor.errors import ConfigurationError
from sheepdog_executor.jobscript import check_no_control_characters
from sheepdog_executor.shell import Shell

_STICKY, _GROUP_OR_OTHERS_WRITE = 0o1000, 0o022
#: The file in a session directory that says who owns the session (see ``Owner``).
OWNER_RECORD = "owner"
#: Host names too common to tell two machines apart.
_ANONYMOUS_HOSTS = {"", "localhost", "localhost.localdomain"}


@dataclass(frozen=True)
class Owner:
    """Who owns a session, as its ``owner`` file records it: the cluster (scheduler and head node's
    host name) and the client (host name, boot id, pid, the pid's start time). A home directory shared
    by several clusters, or login nodes behind one alias, shows a session to every one of them; only
    this record says which of them can tell whether it is alive."""

    scheduler: str
    head_node: str
    client_host: str
    client_pid: int
    #: Linux's boot id of the client's machine ("" elsewhere): a host name alone may be shared.
    client_boot: str = ""
    #: The client process's start time in clock ticks since boot ("" where unknown): a pid is reused.
    client_start: str = ""

    @classmethod
    def parse(cls, line: str) -> Owner | None:
        """The record from its one JSON line, or None when it is not one."""
        try:
            data = json.loads(line)
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        except (ValueError, TypeError):
            return None

    def on_this_machine(self) -> bool:
        """Whether the client ran on the machine (and in the boot) this process runs in."""
        if self.client_host in _ANONYMOUS_HOSTS or self.client_host != socket.gethostname():
            return False
        return self.client_boot == _boot_id()

    def client_runs(self) -> bool:
        """Whether the client's process still runs (call only when ``on_this_machine``)."""
        try:
            os.kill(self.client_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process: not the client's
            return False
        return not self.client_start or _start_time(self.client_pid) in ("", self.client_start)

    def where(self) -> str:
        return f"{self.scheduler} on host {self.head_node}"


def this_client(scheduler: str) -> Owner:
    """The record of a session this process opens on ``scheduler`` (the head node is filled in there)."""
    pid = os.getpid()
    return Owner(scheduler, "", socket.gethostname(), pid, _boot_id(), _start_time(pid))


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat (after the command's closing parenthesis), "" where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def unsafe_part(uid: int, root: str, modes: list[tuple[int, int]]) -> str | None:
    """Why ``root`` (a canonical path) is not safe, or None. ``modes`` are (owner uid, mode) of
    ``root`` and then of each ancestor up to ``/``. The root itself must be the user's and writable
    by nobody else; an ancestor must be the user's or root's, and writable by others only if sticky
    (like ``/tmp``, where nobody can rename what is not theirs)."""
    path = root
    for depth, (owner, full_mode) in enumerate(modes):
        mode = full_mode & 0o7777
        writable = mode & _GROUP_OR_OTHERS_WRITE
        if depth == 0 and owner != uid:
            return f"{path} is owned by uid {owner}, not by you (uid {uid})"
        if depth == 0 and writable:
            return f"{path} is writable by group or others (mode {mode:o})"
        if depth > 0 and owner not in (uid, 0):
            return f"{path}, which contains it, is owned by uid {owner}, neither you (uid {uid}) nor root"
        if depth > 0 and writable and not mode & _STICKY:
            return f"{path}, which contains it, is writable by group or others (mode {mode:o}) and not sticky"
        path = posixpath.dirname(path)
    return None


def owner_and_mode(ls_line: str) -> tuple[int, int]:
    """(owner uid, mode bits with the directory bit) from a line of ``ls -ldn`` (POSIX, unlike
    ``stat``'s options): ``drwxrwxrwt 2 0 0 ...`` -> (0, 0o41777)."""
    fields = ls_line.split()
    if len(fields) < 3 or len(fields[0]) < 10 or not fields[2].isdigit() or not fields[2].isascii():
        raise ValueError(f"unexpected ls -ldn output {ls_line!r}")
    text = fields[0]
    mode = 0o40000 if text[0] == "d" else 0
    for index, char in enumerate(text[1:10]):
        if char not in "-ST":  # r, w, x, or s/t (set-id or sticky, and executable)
            mode |= 1 << (8 - index)
    if text[9] in "tT":
        mode |= _STICKY
    return int(fields[2]), mode


def _quoted_root(session_root: str) -> str:
    """``session_root`` for a shell line: "~" is expanded by the shell only when unquoted, so it is
    written as "$HOME" and the rest quoted."""
    tilde = session_root == "~" or session_root.startswith("~/")
    return ('"$HOME"' + shlex.quote(session_root[1:])) if tilde else shlex.quote(session_root)


def canonical_root(shell: Shell, session_root: str) -> str:
    """The canonical path of ``session_root`` on the head node (``~`` expanded, symbolic links
    resolved) without creating it: as given, "~" expanded, when it does not exist."""
    script = f'r={_quoted_root(session_root)}\ncd -P -- "$r" 2>/dev/null && pwd || printf "%s\\n" "$r"'
    found = shell.run(script, timeout=30).stdout.strip()
    return found.rstrip("/") or "/"


def prepare_root(shell: Shell, session_root: str) -> str:
    """Create ``session_root`` on the head node if missing (mode 0700) and return its canonical path
    (``~`` expanded, symbolic links resolved); ConfigurationError if another user could change it."""
    check_no_control_characters("session_root", session_root)
    script = (
        f"r={_quoted_root(session_root)}\n"
        'id -u\n[ -d "$r" ] || mkdir -p -m 700 -- "$r" || exit 3\n'
        'p=$(cd -P -- "$r" && pwd) || exit 3\necho "$p"\n'
        'while :; do ls -ldn -- "$p" || exit 3; [ "$p" = / ] && break; p=$(dirname -- "$p"); done'
    )
    done = shell.run(script, timeout=60)
    lines = done.stdout.splitlines()
    if done.returncode != 0 or len(lines) < 3 or not lines[0].isdigit():
        raise ConfigurationError(
            f"session_root={session_root!r}: cannot create or inspect it on {shell.description}: "
            f"{(done.stderr or done.stdout).strip()}; set session_root= to a directory you own"
        )
    uid, root = int(lines[0]), lines[1]
    try:
        modes = [owner_and_mode(line) for line in lines[2:]]
    except ValueError as exc:
        raise ConfigurationError(
            f"session_root={session_root!r}: cannot read its mode on {shell.description}: {exc}"
        ) from exc
    why = unsafe_part(uid, root, modes)
    if why is not None:
        raise ConfigurationError(
            f"session_root={session_root!r} is not safe: {why}; another user could replace the session "
            "directory and run code as you. Use a directory only you can write (the default "
            f"~/.sheepdog-executor), or make it so: chown $USER {root} and chmod go-w {root}"
        )
    return root


def make_session_dir(shell: Shell, root: str, prefix: str = "", owner: Owner | None = None) -> str:
    """Create a new session directory (``PREFIX``, a time stamp, random hex) under the canonical
    ``root``, mode 0700, failing if anything exists there already; check that it is a real directory
    the user owns; with ``owner``, write its ``owner`` record (the head node's name filled in there),
    in the same command. Return its path."""
    path = f"{root.rstrip('/')}/{prefix}{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    q = shlex.quote(path)
    record = ""
    if owner is not None:
        line = json.dumps(dataclasses.asdict(dataclasses.replace(owner, head_node="@HEAD@")))
        line = line.replace("%", "%%").replace('"@HEAD@"', '"%s"') + "\n"
        record = f' && printf {shlex.quote(line)} "$(uname -n)" > {shlex.quote(f"{path}/{OWNER_RECORD}")}'
    done = shell.run(f"mkdir -m 700 -- {q} && [ ! -L {q} ] && id -u && ls -ldn -- {q}{record}", timeout=60)
    lines = done.stdout.splitlines()
    try:
        made = len(lines) == 2 and owner_and_mode(lines[1]) == (int(lines[0]), 0o40700)
    except ValueError:
        made = False
    if done.returncode != 0 or not made:
        raise ConfigurationError(
            f"could not create the session directory {path} as a new directory of mode 700 owned by you "
            f"({(done.stderr or 'something else is there').strip()}); check session_root= ({root})"
        )
    return path
