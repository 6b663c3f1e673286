"""What crosses the wire between client and workers: signed requests and responses, pickled bodies.

Every request carries ``X-Sheepdog-Auth: TS:NONCE:MAC`` where MAC is an HMAC-SHA256, keyed by the
executor's secret, over the method, path, timestamp, nonce and body digest. Every response carries a MAC
over the request's nonce and the response body, so a worker never unpickles a body the client did not
sign either. Bodies are pickles and are only ever loaded after their MAC checked out.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import time
from typing import Any

AUTH_HEADER = "X-Sheepdog-Auth"
PICKLE_PROTOCOL = 5
#: How far a request's timestamp may be from the client's clock (clock skew between nodes and laptop).
MAX_SKEW_SECONDS = 600


def _mac(secret: bytes, *parts: bytes) -> str:
    return hmac.new(secret, b"\x00".join(parts), hashlib.sha256).hexdigest()


def sign_request(secret: bytes, method: str, path: str, body: bytes) -> tuple[str, str]:
    """Return (header value, nonce) for a request."""
    ts = str(int(time.time()))
    nonce = os.urandom(16).hex()
    digest = hashlib.sha256(body).hexdigest()
    mac = _mac(secret, method.encode(), path.encode(), ts.encode(), nonce.encode(), digest.encode())
    return f"{ts}:{nonce}:{mac}", nonce


def check_request(
    secret: bytes, header: str | None, method: str, path: str, body: bytes, now: float | None = None
) -> str | None:
    """Return the request's nonce when its MAC and timestamp are good, else None."""
    if not header:
        return None
    parts = header.split(":")
    if len(parts) != 3:
        return None
    ts, nonce, mac = parts
    if not ts.isdigit() or len(nonce) != 32 or len(mac) != 64:
        return None
    if abs((time.time() if now is None else now) - int(ts)) > MAX_SKEW_SECONDS:
        return None
    digest = hashlib.sha256(body).hexdigest()
    expected = _mac(secret, method.encode(), path.encode(), ts.encode(), nonce.encode(), digest.encode())
    return nonce if hmac.compare_digest(expected, mac) else None


def sign_response(secret: bytes, nonce: str, body: bytes) -> str:
    return _mac(secret, b"response", nonce.encode(), hashlib.sha256(body).digest())


def check_response(secret: bytes, nonce: str, body: bytes, mac: str | None) -> bool:
    return bool(mac) and hmac.compare_digest(sign_response(secret, nonce, body), mac or "")


def dumps(obj: Any) -> bytes:
    """Serialise a protocol message (plain dicts, lists, bytes, str, numbers)."""
    return pickle.dumps(obj, protocol=PICKLE_PROTOCOL)


def loads(data: bytes) -> Any:
    """Load a protocol message; only ever called on an authenticated body."""
    return pickle.loads(data)
