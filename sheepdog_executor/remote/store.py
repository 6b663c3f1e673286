"""A sweep's store on the cluster: the results its calls returned, kept by the workers as they finish.

A sweep (``sweep="NAME"``) has a directory of its own under the session root, mode 0700:
``key`` (0600, the HMAC key of its records), ``lease`` (the id of the run that owns the sweep now:
the last client that opened it) and ``records/``, one append-only file per worker
(``JOB.TASK.PID.log``): no file per call on the shared filesystem. Each record is one ASCII line,
``KIND KEY RUN PAYLOAD MAC``: KIND ``S`` (the call started), ``R`` (it returned: PAYLOAD is its
pickled value in base64), ``E`` (it raised: not kept) or ``A`` (not run: the sweep has a newer
run); KEY is the call's key (its function's code and its arguments, hashed by the client), RUN the
run that handed it out, MAC an HMAC-SHA256 of the rest under ``key``. The client checks every MAC
before it unpickles anything. Stdlib only: this runs on the nodes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import pickle
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

KEY_FILE = "key"
LEASE_FILE = "lease"
RECORDS = "records"
#: Record kinds: started, returned (kept), raised (not kept), abandoned (not run: superseded).
STARTED, RETURNED, RAISED, ABANDONED = "S", "R", "E", "A"
#: The exit status of a worker that leaves (as one whose client is unreachable: see ``reach``).
EXIT_SUPERSEDED = 75
_LINE = re.compile(r"([SREA]) ([0-9a-f]{64}) ([A-Za-z0-9._-]{1,80}) ([A-Za-z0-9+/=]+|-) ([0-9a-f]{64})")
_PROTOCOL = 5


class Record(NamedTuple):
    kind: str
    key: str
    run: str
    #: The pickled value of an ``R`` record, else b"".
    data: bytes


class StoreRef(NamedTuple):
    """Where a call's result is kept: the sweep's directory and the run the call belongs to."""

    directory: str
    run: str


def mac(key: bytes, kind: str, call: str, run: str, payload: str) -> str:
    return hmac.new(key, f"{kind} {call} {run} {payload}".encode(), hashlib.sha256).hexdigest()


def line(key: bytes, kind: str, call: str, run: str, data: bytes = b"") -> bytes:
    """One record, as written to a worker's file."""
    payload = base64.b64encode(data).decode() if data else "-"
    return f"{kind} {call} {run} {payload} {mac(key, kind, call, run, payload)}\n".encode()


class BadRecord(ValueError):
    """A complete record that is malformed or whose MAC does not check out."""


def parse(key: bytes, text: str) -> Record:
    """A record line (without its newline), checked: BadRecord unless its MAC is right."""
    match = _LINE.fullmatch(text)
    if match is None:
        raise BadRecord("not a record")
    kind, call, run, payload, given = match.groups()
    if not hmac.compare_digest(mac(key, kind, call, run, payload), given):
        raise BadRecord("its MAC does not match the sweep's key")
    try:
        data = base64.b64decode(payload, validate=True) if payload != "-" else b""
    except ValueError as exc:
        raise BadRecord("its payload is not base64") from exc
    return Record(kind, call, run, data)


def sections(text: str) -> Iterator[tuple[str, list[str]]]:
    """(file name, complete lines) of each ``#F NAME`` section of a store listing (see
    ``sweepstore.LISTING``): each file is followed by one newline, so its last line is "" when it
    ends with a full record, else a record cut short by a worker that died writing it (dropped)."""
    name, lines = "", list[str]()
    for text_line in text.removesuffix("\n").split("\n"):
        if text_line.startswith("#F "):
            if name:
                yield name, lines[:-1]
            name, lines = text_line[3:], []
        elif name:
            lines.append(text_line)
    if name:
        yield name, lines[:-1]


# -- the node side --------------------------------------------------------------------------------
_keys: dict[str, bytes] = {}
_leases: dict[str, tuple[tuple[int, int, int], str]] = {}
_written = 0
_stores: set[StoreRef] = set()


def superseded() -> bool:
    """Whether a sweep this process kept results of has a newer run now (its client is gone, or
    another one took it over): a worker waiting for its client then leaves at once."""
    try:
        return any(_lease(store.directory) != store.run for store in _stores)
    except OSError:
        return False


def records_written() -> int:
    """How many results this process kept so far (a worker leaves early when all of its are)."""
    return _written


def worker_name() -> str:
    """This worker's id, ``JOB.TASK.PID``, from the variables every scheduler's job script sets."""
    job = os.environ.get("SHEEPDOG_JOB_ID") or "local"
    task = os.environ.get("SHEEPDOG_TASK_ID", "1")
    return f"{job}.{task if task.isdigit() else '1'}.{os.getpid()}"


def _key(directory: str) -> bytes:
    key = _keys.get(directory)
    if key is None:
        with open(os.path.join(directory, KEY_FILE), "rb") as handle:
            key = _keys[directory] = handle.read().strip()
    return key


def _lease(directory: str) -> str:
    """The run that owns the sweep now: the lease file, read again only when it changed."""
    path = os.path.join(directory, LEASE_FILE)
    info = os.stat(path)
    stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
    known = _leases.get(directory)
    if known is not None and known[0] == stamp:
        return known[1]
    with open(path, encoding="ascii") as handle:
        owner = handle.read().strip()
    _leases[directory] = (stamp, owner)
    return owner


def _append(store: StoreRef, record: bytes) -> bool:
    """Append a record to this worker's file, opened and closed each time (so that the head node
    sees it over NFS); a write that fails is taken back whole (the file stays whole records)."""
    path = os.path.join(store.directory, RECORDS, worker_name() + ".log")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as exc:
        sys.stderr.write(f"sheepdog worker: cannot keep a result in {path}: {exc}\n")
        return False
    size = os.fstat(fd).st_size
    try:
        view = memoryview(record)
        while view:
            view = view[os.write(fd, view) :]
        return True
    except OSError as exc:
        sys.stderr.write(f"sheepdog worker: cannot keep a result in {path}: {exc}\n")
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass
        return False
    finally:
        os.close(fd)


def kept_call(fn: Callable[..., Any], store: StoreRef, call: str, args: Any, kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` as call ``call`` of a sweep, keeping its value in the store.

    Started first, then the lease checked: a run that takes the sweep over after this check reads
    the ``S`` record and waits for this call, so no call runs in two runs. A worker whose run lost
    the sweep to a newer one leaves (its client is gone, or another took over)."""
    global _written
    key = _key(store.directory)
    _stores.add(store)
    _append(store, line(key, STARTED, call, store.run))
    if _lease(store.directory) != store.run:
        _append(store, line(key, ABANDONED, call, store.run))
        sys.stderr.write("sheepdog worker: a newer run of this sweep took it over; leaving\n")
        sys.stderr.flush()
        os._exit(EXIT_SUPERSEDED)
    try:
        value = fn(*args, **kwargs)
    except BaseException:
        _append(store, line(key, RAISED, call, store.run))
        raise
    try:
        data = pickle.dumps(value, protocol=_PROTOCOL)
    except Exception:  # noqa: BLE001 - a value only cloudpickle can pickle
        import cloudpickle

        data = cloudpickle.dumps(value, protocol=_PROTOCOL)
    if _append(store, line(key, RETURNED, call, store.run, data)):
        _written += 1
    return value


# -- detached: the calls a client handed to the cluster (``Executor.detach``) ---------------------
#: Under the sweep's directory: each detached run's queue (``detached/RUN``), the claims of its
#: chunks (``claims-RUN/CHUNK``) and its tasks' bundle and logs (``jobs-RUN/``).
DETACHED = "detached"
#: The URL a detached task's worker is started with, instead of a client's: ``sweep:QUEUE``.
DETACHED_URL = "sweep:"


def sign_queue(key: bytes, blob: bytes) -> bytes:
    """A detached queue as written: its MAC on the first line, then the pickled queue."""
    return hmac.new(key, blob, hashlib.sha256).hexdigest().encode() + b"\n" + blob


def read_queue(key: bytes, data: bytes) -> dict[str, Any]:
    """A detached queue, unpickled only once its MAC checked out (BadRecord otherwise)."""
    given, _, blob = data.partition(b"\n")
    if not hmac.compare_digest(hmac.new(key, blob, hashlib.sha256).hexdigest().encode(), given):
        raise BadRecord("the queue's MAC does not match the sweep's key")
    queue: dict[str, Any] = pickle.loads(blob)
    return queue


def run_detached(queue_path: str) -> int:
    """A detached task's worker: claim chunks of the queue (a file created exclusively per chunk,
    on the shared filesystem) and run their calls, each kept in the store by ``kept_call``, until
    none is left; no client is needed. Leaves when a newer run takes the sweep over."""
    from sheepdog_executor.remote.worker import load_function

    directory = os.path.dirname(os.path.dirname(queue_path))
    with open(queue_path, "rb") as handle:
        queue = read_queue(_key(directory), handle.read())
    claims = os.path.join(directory, f"claims-{queue['run']}")
    functions: dict[str, Callable[..., Any]] = {}
    calls, chunk = queue["calls"], int(queue["chunk"])
    for number, start in enumerate(range(0, len(calls), chunk)):
        try:
            os.close(os.open(os.path.join(claims, str(number)), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            continue  # another task has it
        for _, fn_key, payload in calls[start : start + chunk]:
            if fn_key not in functions:
                functions[fn_key] = load_function(queue["functions"][fn_key])
            args, kwargs = pickle.loads(payload)
            try:
                functions[fn_key](*args, **kwargs)  # kept_call: the store has its value
            except BaseException:  # noqa: BLE001, S110 - raised: recorded as such, not kept
                pass
    return 0
