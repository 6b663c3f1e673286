"""The session directory on the head node: made as a new 0700 directory in a root only the user (and
root) can change, as OpenSSH's StrictModes checks the paths to ``authorized_keys``.

Whoever can rename or replace the session directory can swap the worker bundle the tasks run, and so
run code as the user: a root that another user owns or may write (a shared ``/tmp/shared``, mode 1777
or 777), or an ancestor of it that another user owns, is refused before anything is written.
"""

from __future__ import annotations

import posixpath
import secrets
import shlex
import time

from sheepdog_executor.errors import ConfigurationError
from sheepdog_executor.jobscript import check_no_control_characters
from sheepdog_executor.shell import Shell

_STICKY, _GROUP_OR_OTHERS_WRITE = 0o1000, 0o022


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


def prepare_root(shell: Shell, session_root: str) -> str:
    """Create ``session_root`` on the head node if missing (mode 0700) and return its canonical path
    (``~`` expanded, symbolic links resolved); ConfigurationError if another user could change it."""
    check_no_control_characters("session_root", session_root)
    # "~" is expanded by the shell only when unquoted: expand it by hand, quote the rest
    tilde = session_root == "~" or session_root.startswith("~/")
    quoted = ('"$HOME"' + shlex.quote(session_root[1:])) if tilde else shlex.quote(session_root)
    script = (
        f"r={quoted}\n"
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


def make_session_dir(shell: Shell, root: str, prefix: str = "") -> str:
    """Create a new session directory (``PREFIX``, a time stamp, random hex) under the canonical
    ``root``, mode 0700, failing if anything exists there already; check that it is a real directory
    the user owns. Return its path."""
    path = f"{root.rstrip('/')}/{prefix}{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    q = shlex.quote(path)
    done = shell.run(f"mkdir -m 700 -- {q} && [ ! -L {q} ] && id -u && ls -ldn -- {q}", timeout=60)
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
