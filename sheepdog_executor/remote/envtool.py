"""Synced environments on the head node: probe the nodes' Python, build an environment, list, remove.

Runs with the nodes' interpreter before any environment exists, so it uses the standard library only
(and syntax every Python 3.8 reads). The client sends it over SSH (``python - COMMAND ...`` with this
file on stdin, or a copy in a staging directory) and reads one JSON line it prints last.

An environment is ``ENVS/KEY``: a venv made from this interpreter, with ``.sheepdog-env.json`` in it.
It is built in ``ENVS/.build-KEY-*`` under an exclusive ``flock`` of ``ENVS/KEY.lock`` and renamed into
place only when complete, so a half-built environment is never used and two builders of the same key
build it once (the second waits for the lock, then finds it ready).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

MARKER = ".sheepdog-env.json"
#: Uploads of a client that died during a build are removed by a later build after this long.
STALE_SECONDS = 24 * 3600
#: Lines of pip's output kept for an error message.
TAIL_LINES = 40


def _say(result):
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def _ready(path):
    return os.path.isfile(os.path.join(path, MARKER)) and os.path.exists(os.path.join(path, "bin", "python"))


def _ready_names(envs):
    try:
        names = os.listdir(envs)
    except OSError:
        return []
    return sorted(n for n in names if not n.startswith(".") and _ready(os.path.join(envs, n)))


def probe(envs):
    """This interpreter (what pip needs to pick wheels for it) and the environments ready in ENVS."""
    libc, libc_version = platform.libc_ver()
    _say(
        {
            "python": "{}.{}.{}".format(*sys.version_info[:3]),
            "implementation": sys.implementation.name,
            "executable": sys.executable,
            "platform": sysconfig.get_platform(),
            "machine": platform.machine(),
            "libc": [libc, libc_version],
            "ready": _ready_names(envs),
        }
    )
    return 0


#: What pip or venv print when the disk, or the user's quota, is full.
NO_SPACE = (f"[Errno {errno.ENOSPC}]", f"[Errno {errno.EDQUOT}]", "No space left on device")


class NoSpace(Exception):
    """A step of a build met a full disk (or quota) under ``path``."""

    def __init__(self, path):
        super().__init__(path)
        self.path = path


def _free(path):
    """Bytes free for this user on the filesystem of ``path`` (or of its nearest existing parent)."""
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def _checked(envs, code, output):
    """(code, output) of a step, or NoSpace when its output says the disk was full."""
    if code != 0 and any(text in output for text in NO_SPACE):
        raise NoSpace(envs)
    return code, output


def _run(argv):
    """Run a command; (exit status, the tail of its output)."""
    proc = subprocess.run(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False
    )
    lines = proc.stdout.decode("utf-8", "replace").splitlines()
    return proc.returncode, "\n".join(lines[-TAIL_LINES:])


def _pip(python):
    """(pip command for the venv of ``python``, exit status, output): a pip of this interpreter (or
    of the one it is a venv of) that can install into another (pip 22.3+: ``--python``), which saves
    seeding pip into the venv; else pip installed into the venv by ensurepip."""
    for base in dict.fromkeys([sys.executable, getattr(sys, "_base_executable", sys.executable)]):
        code, output = _run([base, "-m", "pip", "--version"])
        version = output.split()[1].split(".") if code == 0 and output.startswith("pip ") else []
        if len(version) >= 2 and version[0].isdigit() and version[1].isdigit():
            if (int(version[0]), int(version[1])) >= (22, 3):
                return [base, "-m", "pip", "--python", python], 0, ""
    code, output = _run([python, "-m", "ensurepip", "--default-pip"])
    return [python, "-m", "pip"], code, output


def _relocate(tmp, final):
    """Point the venv's scripts (pip's shebangs, activate) at the path it is renamed to."""
    bindir = os.path.join(tmp, "bin")
    old, new = tmp.encode(), final.encode()
    for name in os.listdir(bindir):
        path = os.path.join(bindir, name)
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, "rb") as handle:
            data = handle.read()
        if old in data:
            with open(path, "wb") as handle:
                handle.write(data.replace(old, new))


def _clear_leftovers(envs, key, final):
    """Remove what is here without the lock's holder: left over from a build that died."""
    for name in os.listdir(envs):
        path = os.path.join(envs, name)
        if name.startswith(".build-" + key + "-") or (
            name.startswith((".staging-", ".trash-")) and time.time() - os.path.getmtime(path) > STALE_SECONDS
        ):
            shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(final):
        shutil.rmtree(final, ignore_errors=True)


def _install(envs, tmp, spec):
    """Make a venv in TMP and install the spec into it: None, or the message that says what failed."""
    code, output = _checked(envs, *_run([sys.executable, "-m", "venv", "--without-pip", tmp]))
    if code == 0:
        pip, code, output = _pip(os.path.join(tmp, "bin", "python"))
        _checked(envs, code, output)
    if code != 0:
        return {"status": "venv-failed", "output": output}
    pip += ["install", "--no-deps", "--no-input", "--disable-pip-version-check"]
    pip += ["--no-warn-script-location"]
    if spec["mode"] == "index":
        pip += ["--prefer-binary", "--retries", "1", "--timeout", "20"]
    else:
        pip += ["--no-index", "--find-links", spec["wheel_dir"]]
    wheels = [os.path.join(spec["wheel_dir"], name) for name in spec["wheels"]]
    # after "--": pip reads no requirement as an option (-r FILE, --index-url=...)
    code, output = _checked(envs, *_run(pip + ["--"] + spec["requirements"] + wheels))
    if code != 0:
        return {"status": "install-failed", "output": output}
    return None


def build(envs, key, spec_file):
    """Build ENVS/KEY from the spec (JSON: mode "index" or "wheels", requirements, wheels, summary)."""
    with open(spec_file) as handle:
        spec = json.load(handle)
    os.makedirs(envs, exist_ok=True)
    final = os.path.join(envs, key)
    started = time.time()
    with open(os.path.join(envs, key + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except OSError:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another client builds it: wait, then use theirs
            waited = True
        if _ready(final):
            _say({"status": "ready", "built": False, "waited": waited})
            return 0
        _clear_leftovers(envs, key, final)
        tmp = tempfile.mkdtemp(prefix=".build-" + key + "-", dir=envs)
        try:
            failed = _install(envs, tmp, spec)
            if failed is not None:
                _say(failed)
                return 0
            _relocate(tmp, final)
            summary = dict(spec.get("summary", {}))
            summary.update(
                {"key": key, "created": time.time(), "python": sys.executable, "mode": spec["mode"]}
            )
            with open(os.path.join(tmp, MARKER), "w") as handle:
                json.dump(summary, handle, indent=1)
            os.rename(tmp, final)
        finally:
            if os.path.isdir(tmp):  # not renamed into place: a failed build is never kept
                shutil.rmtree(tmp, ignore_errors=True)
    _say({"status": "ready", "built": True, "waited": waited, "seconds": round(time.time() - started, 1)})
    return 0


def list_envs(envs):
    """The ready environments, with what their marker says and whether one is being built."""
    found = []
    for name in _ready_names(envs):
        try:
            with open(os.path.join(envs, name, MARKER)) as handle:
                summary = json.load(handle)
        except (OSError, ValueError):
            summary = {}
        found.append({"name": name, "summary": summary})
    _say({"envs": found})
    return 0


def remove(envs, names):
    """Remove environments; one whose lock is held (being built) is left alone."""
    removed, busy = [], []
    for name in names:
        if name.startswith(".") or "/" in name:
            continue
        lock_path = os.path.join(envs, name + ".lock")
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                busy.append(name)
                continue
            path = os.path.join(envs, name)
            if os.path.lexists(path):
                trash = tempfile.mkdtemp(prefix=".trash-", dir=envs)
                os.rename(path, os.path.join(trash, name))  # gone from view at once, then deleted
                shutil.rmtree(trash, ignore_errors=True)
                removed.append(name)
    _say({"removed": removed, "busy": busy})
    return 0


def main(argv):
    """Run a command; a full disk (or quota) met on the way is an answer of its own."""
    try:
        return _command(argv)
    except (OSError, NoSpace) as exc:
        if isinstance(exc, OSError) and exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        path = exc.path if isinstance(exc, NoSpace) else (exc.filename or argv[1])
        _say({"status": "no-space", "path": path, "free": _free(path)})
        return 0


def _command(argv):
    command, envs = argv[0], argv[1]
    if command == "probe":
        return probe(envs)
    if command == "build":
        return build(envs, argv[2], argv[3])
    if command == "list":
        return list_envs(envs)
    if command == "remove":
        return remove(envs, argv[2:])
    sys.stderr.write(f"envtool: unknown command {command!r}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
