"""What crosses the wire between client and workers: signed requests and responses, pickled bodies.

Every request carries ``X-Sheepdog-Auth: TS:NONCE:DIGEST:MAC`` where DIGEST is the body's SHA-256 and
MAC an HMAC-SHA256, keyed by the executor's secret, over the method, path, timestamp, nonce, body length
and DIGEST: the endpoint checks it from the headers alone, before it reads a body. Every response
carries ``X-Sheepdog-Auth: DIGEST:MAC``, a MAC over the request's nonce, the response body's length and
its SHA-256: a worker checks it against the Content-Length before it reads the body, so it reads nothing
of a body the client did not sign beyond ``UNSIGNED_READ_LIMIT``, and hashes the body as it reads it.
Bodies are pickles and are only ever loaded after their MAC and digest checked out.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import re
import time
from typing import Any, NamedTuple

AUTH_HEADER = "X-Sheepdog-Auth"
PICKLE_PROTOCOL = 5
#: At most this much of an answer whose signature does not check out (or of any non-200 answer) is
#: read, and dropped, before its connection is closed: whoever answers costs a worker no more.
UNSIGNED_READ_LIMIT = 64 * 1024
#: How far a request's timestamp may be from the client's clock (clock skew between nodes and laptop).
MAX_SKEW_SECONDS = 600


def _mac(secret: bytes, *parts: bytes) -> str:
    return hmac.new(secret, b"\x00".join(parts), hashlib.sha256).hexdigest()


#: ``TS:NONCE:DIGEST:MAC``, ASCII only: decimal seconds, 16 random bytes, the body's SHA-256 and the
#: HMAC, in lowercase hex. Explicit ``[0-9]``, not ``\d`` or ``str.isdigit``: those take ``²`` and ``٣``.
_AUTH = re.compile(r"([0-9]{1,12}):([0-9a-f]{32}):([0-9a-f]{64}):([0-9a-f]{64})")
#: A response's ``DIGEST:MAC``: the body's SHA-256 and the HMAC, in lowercase hex.
_RESPONSE_AUTH = re.compile(r"([0-9a-f]{64}):([0-9a-f]{64})")
#: A Content-Length as HTTP writes it: ASCII digits only.
_LENGTH = re.compile(r"[0-9]{1,18}")


class RequestAuth(NamedTuple):
    """The parts of a request's auth header, once its MAC checked out against the headers."""

    nonce: str
    #: SHA-256 (hex) the body must have; checked as the body streams in.
    digest: str


def _request_mac(secret: bytes, method: str, path: str, ts: str, nonce: str, length: int, digest: str) -> str:
    fields = (method, path, ts, nonce, str(length), digest)
    return _mac(secret, *(field.encode() for field in fields))


def sign_request(secret: bytes, method: str, path: str, body: bytes) -> tuple[str, str]:
    """Return (header value, nonce) for a request whose body is ``body``."""
    return sign_headers(secret, method, path, len(body), hashlib.sha256(body).hexdigest())


def sign_headers(secret: bytes, method: str, path: str, length: int, digest: str) -> tuple[str, str]:
    """Return (header value, nonce) for a request of ``length`` bytes whose SHA-256 is ``digest``."""
    ts = str(int(time.time()))
    nonce = os.urandom(16).hex()
    mac = _request_mac(secret, method, path, ts, nonce, length, digest)
    return f"{ts}:{nonce}:{digest}:{mac}", nonce


def parse_length(value: str | None) -> int | None:
    """A Content-Length header's value, or None when it is absent or not plain ASCII digits."""
    return int(value) if value is not None and _LENGTH.fullmatch(value) else None


def check_request_headers(
    secret: bytes, header: str | None, method: str, path: str, length: int, now: float | None = None
) -> RequestAuth | None:
    """Check a request's auth header against its method, path and declared body length, before any
    body byte is read: the MAC covers the length and the body's digest, so a request that passes
    here can only bring the body its signer sent (the caller checks the digest as it streams in)."""
    match = _AUTH.fullmatch(header) if header and len(header) < 200 else None
    if match is None:
        return None
    ts, nonce, digest, mac = match.groups()
    if abs((time.time() if now is None else now) - int(ts)) > MAX_SKEW_SECONDS:
        return None
    expected = _request_mac(secret, method, path, ts, nonce, length, digest)
    return RequestAuth(nonce, digest) if hmac.compare_digest(expected, mac) else None


def check_request(
    secret: bytes, header: str | None, method: str, path: str, body: bytes, now: float | None = None
) -> str | None:
    """Return the request's nonce when its MAC, timestamp and body digest are good, else None."""
    auth = check_request_headers(secret, header, method, path, len(body), now)
    if auth is None or not hmac.compare_digest(hashlib.sha256(body).hexdigest(), auth.digest):
        return None
    return auth.nonce


def _response_mac(secret: bytes, nonce: str, length: int, digest: str) -> str:
    return _mac(secret, b"response", nonce.encode(), str(length).encode(), digest.encode())


def sign_response(secret: bytes, nonce: str, body: bytes) -> str:
    """The auth header of the answer ``body`` to the request of ``nonce``: ``DIGEST:MAC``."""
    digest = hashlib.sha256(body).hexdigest()
    return f"{digest}:{_response_mac(secret, nonce, len(body), digest)}"


def check_response_headers(secret: bytes, nonce: str, header: str | None, length: int) -> str | None:
    """The SHA-256 (hex) the body must have, when the answer's auth header is signed for the request
    of ``nonce`` and a body of ``length`` bytes; else None. Decided before any body byte is read."""
    match = _RESPONSE_AUTH.fullmatch(header) if header and len(header) < 200 else None
    if match is None:
        return None
    digest, mac = match.groups()
    return digest if hmac.compare_digest(_response_mac(secret, nonce, length, digest), mac) else None


def check_response(secret: bytes, nonce: str, body: bytes, header: str | None) -> bool:
    """True when ``body`` is the answer the client signed for the request of ``nonce``."""
    digest = check_response_headers(secret, nonce, header, len(body))
    return digest is not None and hmac.compare_digest(hashlib.sha256(body).hexdigest(), digest)


# -- what /work carries, by name (pickled as plain tuples: a worker and its client agree on the order)
class Item(NamedTuple):
    """A call handed to a worker, which runs ``functions[fn_key](*args, **kwargs)`` with the
    ``(args, kwargs)`` pickled in ``payload`` (a map's chunk is a call of ``worker.run_chunk``)."""

    id: int
    attempt: int
    fn_key: str
    payload: bytes

    def wire(self) -> WireItem:
        """The plain tuple sent (a NamedTuple would pickle its class's name); the hot path builds
        it in place (``CallQueue.take_locked``) and the worker unpacks it in this order."""
        return (self.id, self.attempt, self.fn_key, self.payload)


#: An ``Item`` as sent: (id, attempt, fn_key, payload).
WireItem = tuple[int, int, str, bytes]


class Result(NamedTuple):
    """A worker's answer for one ``Item``."""

    item: int
    attempt: int
    ok: bool
    #: The pickled value, or the pickled ``Error`` when the call raised; empty when sent in parts
    #: (a bytearray once the endpoint joined them).
    data: bytes | bytearray
    stdout: str
    seconds: float = 0.0
    stderr: str = ""
    #: The pickled size when ``data`` went to /part in pieces (joined by the endpoint), else 0.
    parted: int = 0

    def wire(self) -> tuple[Any, ...]:
        """The plain tuple sent: without ``parted`` unless it was sent in parts."""
        return tuple(self) if self.parted else self[:7]


def new_result(fields: tuple[int, int, bool, bytes, str, float, str, int]) -> Result:
    """``Result(*fields)`` without the Python-level ``__new__`` a NamedTuple runs: once per call on
    both sides of the hot path."""
    return _tuple_new(Result, fields)


_tuple_new: Any = tuple.__new__


class Error(NamedTuple):
    """A call's exception as the worker sends it: the text travels beside the pickle, so an exception
    the client cannot rebuild (a class whose ``__init__`` takes other arguments than ``args``, a
    module missing there) keeps its message."""

    pickled: bytes | None
    traceback: str
    type_name: str
    message: str


#: What a newer worker may add after a result's known fields.
_SCALARS = (int, float, str, bytes, bool, type(None))


def parse_result(raw: Any) -> Result | None:
    """A result as a worker sent it (a tuple or list: item id, attempt, ok, data, stdout, then
    optionally seconds, stderr, parted size and scalars a newer worker adds), or None if malformed."""
    # written out rather than with all()/zip(): it runs once per call on the hot path
    if type(raw) not in (tuple, list) or len(raw) < 5:
        return None
    if not (type(raw[0]) is int and type(raw[1]) is int and type(raw[2]) is bool):
        return None
    if not (type(raw[3]) is bytes and type(raw[4]) is str):
        return None
    for extra in raw[5:]:
        if type(extra) not in _SCALARS:
            return None
    # an optional field of another type counts as absent (a newer worker may mean something else)
    n = len(raw)
    seconds = raw[5] if n > 5 and type(raw[5]) in (int, float) else 0.0
    stderr = raw[6] if n > 6 and type(raw[6]) is str else ""
    parted = raw[7] if n > 7 and type(raw[7]) is int and raw[7] > 0 else 0
    return new_result((raw[0], raw[1], raw[2], raw[3], raw[4], seconds, stderr, parted))


def dumps(obj: Any) -> bytes:
    """Serialise a protocol message (plain dicts, lists, bytes, str, numbers)."""
    return pickle.dumps(obj, protocol=PICKLE_PROTOCOL)


def loads(data: bytes | bytearray) -> Any:
    """Load a protocol message; only ever called on an authenticated body."""
    return pickle.loads(data)
