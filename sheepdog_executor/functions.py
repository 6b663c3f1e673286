"""The pickled functions of the calls outstanding: each pickled once, dropped with its last call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class FunctionCache:
    """Functions by key (their pickle's digest) and by identity, with how many calls use each.

    Not locked: its owner (the dispatcher) calls it under its own lock, but for ``known``, a lock-free
    look-up on the submitting thread (a dict read)."""

    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}
        self._users: dict[str, int] = {}
        #: id(fn) -> (fn, key, pickle) while calls of fn are outstanding: fn is pickled once.
        self._by_identity: dict[int, tuple[Any, str, bytes]] = {}

    def known(self, fn: Callable[..., Any]) -> tuple[str, bytes] | None:
        """(key, pickle) of ``fn`` if it was pickled already."""
        known = self._by_identity.get(id(fn))
        return (known[1], known[2]) if known is not None and known[0] is fn else None

    def remember(self, fn: Callable[..., Any], key: str, blob: bytes) -> None:
        self._by_identity.setdefault(id(fn), (fn, key, blob))

    def use(self, fn: Callable[..., Any], key: str, blob: bytes, calls: int) -> None:
        """``calls`` more calls of ``fn`` are outstanding."""
        self._blobs.setdefault(key, blob)
        self._by_identity.setdefault(id(fn), (fn, key, blob))
        self._users[key] = self._users.get(key, 0) + calls

    def blob(self, key: str) -> bytes:
        return self._blobs[key]

    def release(self, key: str, calls: int = 1) -> None:
        """``calls`` calls of the function ``key`` ended; the last one drops it."""
        users = self._users[key] - calls
        if users:
            self._users[key] = users
            return
        del self._users[key]
        self._blobs.pop(key, None)
        for fn_id in [i for i, known in self._by_identity.items() if known[1] == key]:
            del self._by_identity[fn_id]
