"""What crosses the wire between client and workers: signed requests and responses, pickled bodies.

Every request carries ``X-Sheepdog-Auth: TS:NONCE:DIGEST:MAC`` where DIGEST is the body's SHA-256 and
MAC an HMAC-SHA256, keyed by the executor's secret, over the method, path, timestamp, nonce, body length
and DIGEST: the endpoint checks it from the headers alone, before it reads a body. Every response
carries a MAC over the request's nonce and the response body, so a worker never unpickles a body the
client did not sign either. Bodies are pickles and are only ever loaded after their MAC checked out.
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
#: How far a request's timestamp may be from the client's clock (clock skew between nodes and laptop).
MAX_SKEW_SECONDS = 600


def _mac(secret: bytes, *parts: bytes) -> str:
    return hmac.new(secret, b"\x00".join(parts), hashlib.sha256).hexdigest()


#: ``TS:NONCE:DIGEST:MAC``, ASCII only: decimal seconds, 16 random bytes, the body's SHA-256 and the
#: HMAC, in lowercase hex. Explicit ``[0-9]``, not ``\d`` or ``str.isdigit``: those take ``²`` and ``٣``.
_AUTH = re.compile(r"([0-9]{1,12}):([0-9a-f]{32}):([0-9a-f]{64}):([0-9a-f]{64})")
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


def sign_response(secret: bytes, nonce: str, body: bytes) -> str:
    return _mac(secret, b"response", nonce.encode(), hashlib.sha256(body).digest())


def check_response(secret: bytes, nonce: str, body: bytes, mac: str | None) -> bool:
    if not mac or not mac.isascii():  # compare_digest raises TypeError on non-ASCII text
        return False
    return hmac.compare_digest(sign_response(secret, nonce, body), mac)


def dumps(obj: Any) -> bytes:
    """Serialise a protocol message (plain dicts, lists, bytes, str, numbers)."""
    return pickle.dumps(obj, protocol=PICKLE_PROTOCOL)


def loads(data: bytes) -> Any:
    """Load a protocol message; only ever called on an authenticated body."""
    return pickle.loads(data)
