"""How a worker keeps reaching its client: the routes it may take, and how long it may go without.

The client writes its routes to ``routes`` in the session directory (mode 0600, one ``LABEL URL`` a
line, best first: e.g. ``direct`` then ``tunnel``) and writes it again when a route moves (a relay
re-made on another port after an SSH drop). A worker tries the routes in order and sticks with the
first that answers with a signed reply; when its connection fails it moves on, and re-reads the file
once it has tried them all. It also looks at the file before each request (at most once per
``ROUTES_CHECK_SECONDS``): when its route is no longer listed there, it leaves it for the listed ones,
even though the old address still answers (another user of the head node may hold the relay's old
port and pass the traffic on to the new one).

It also counts the time since it last reached the client. Past the client's
``disconnect_tolerance`` (told in the reply to hello; before that, ``FIRST_CONTACT_SECONDS``) it
gives up: the ``Watchdog`` ends the process, call and all, so that nothing of a client that died or
went away for good stays running on the cluster. Stdlib only: this runs on the nodes.
"""

from __future__ import annotations

import os
import sys
import threading
import time

ROUTES_FILE = "routes"
#: A worker that never reached its client gives up after this long (at most the tolerance), so that
#: a task which starts after its client died exits within seconds.
FIRST_CONTACT_SECONDS = 15.0
#: Exit status of a worker that gave up on its client (not 99 or 100: Grid Engine re-queues on 99
#: and holds the job in an error state on 100).
EXIT_CLIENT_UNREACHABLE = 75
#: Longest pause between two rounds of attempts on every route.
MAX_BACKOFF_SECONDS = 10.0
#: How often a worker looks whether the routes file changed (one ``stat``).
ROUTES_CHECK_SECONDS = 1.0


def parse_routes(text: str) -> list[tuple[str, str]]:
    """``LABEL URL`` lines -> [(label, url)]; anything else is skipped."""
    routes = []
    for line in text.splitlines():
        words = line.split()
        if len(words) == 2 and words[1].startswith(("http://", "https://")):
            routes.append((words[0], words[1]))
    return routes


class Reach:
    """The routes to the client, the one in use, and the time since the client last answered."""

    def __init__(self, url: str, routes_file: str | None = None) -> None:
        self._file = routes_file
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.routes = self._read() or [("given", url)]
        self._index = 0
        self._checked = time.monotonic()
        self.tolerance = FIRST_CONTACT_SECONDS
        self.reached = False
        self.last_contact = time.monotonic()
        self.last_error = ""

    def _read(self) -> list[tuple[str, str]]:
        if not self._file:
            return []
        try:
            with open(self._file, encoding="utf-8") as handle:
                return parse_routes(handle.read())
        except OSError:
            return []

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            info = os.stat(self._file) if self._file else None
        except OSError:
            return None
        return (info.st_ino, info.st_size, info.st_mtime_ns) if info else None

    def follow(self, url: str) -> bool:
        """Whether the route ``url`` (the one a connection is open to) is still listed, after
        re-reading the routes file if it changed (looked at once per ``ROUTES_CHECK_SECONDS``).
        When it is not, the routes are the file's and the first of them is the one to take."""
        now = time.monotonic()
        if now - self._checked < ROUTES_CHECK_SECONDS:
            return True
        with self._lock:
            self._checked = now
            stamp = self._stat()
            if stamp != self._stamp:
                self._stamp = stamp
                routes = self._read()
                if routes and routes != self.routes:
                    current = self.routes[self._index]
                    self.routes = routes
                    self._index = routes.index(current) if current in routes else 0
            return any(route[1] == url for route in self.routes)

    @property
    def current(self) -> tuple[str, str]:
        """(label, url) of the route in use."""
        with self._lock:
            return self.routes[self._index]

    def contacted(self) -> None:
        """The client answered (signed): the clock of silence starts again."""
        self.last_contact = time.monotonic()
        self.reached = True

    def set_tolerance(self, seconds: float) -> None:
        self.tolerance = max(float(seconds), 1.0)

    def silent_for(self) -> float:
        return time.monotonic() - self.last_contact

    def gave_up(self) -> bool:
        limit = self.tolerance if self.reached else min(self.tolerance, FIRST_CONTACT_SECONDS)
        return self.silent_for() > limit

    def move_on(self, failed_url: str) -> bool:
        """The route ``failed_url`` failed: take the next one; True when every route was tried
        since the last success (time to pause), and then the file is read again."""
        with self._lock:
            if self.routes[self._index][1] != failed_url:
                return False  # another thread moved on already
            self._index += 1
            if self._index < len(self.routes):
                return False
            self.routes = self._read() or self.routes
            self._index = 0
            return True


class Watchdog(threading.Thread):
    """Ends the worker once the client has been out of reach for longer than the tolerance."""

    def __init__(self, reach: Reach) -> None:
        super().__init__(name="sheepdog-watchdog", daemon=True)  # it only ever ends the process
        self._reach = reach

    def run(self) -> None:
        while True:
            time.sleep(1.0)
            if self._reach.gave_up():
                label, url = self._reach.current
                sys.stderr.write(
                    f"sheepdog worker: the client was unreachable for {self._reach.silent_for():.0f} s "
                    f"(last tried {label} {url}: {self._reach.last_error or 'no answer'}; "
                    f"disconnect_tolerance {self._reach.tolerance:.0f} s): "
                    "giving up, ending the current call and exiting\n"
                )
                sys.stderr.flush()
                os._exit(EXIT_CLIENT_UNREACHABLE)
