"""Client processes for the tests: Ctrl-C works in them and nothing waits on them without a deadline.

A suite started as a background job of a non-interactive shell inherits SIGINT ignored, and so
would every client it starts: a test that sends SIGINT would then wait on a client that never
stops. And a ``readline()`` on a client that hangs blocks for ever; ``read_line`` gives up.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from typing import Any


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Python then turns it into KeyboardInterrupt


def spawn(args: list[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(args, ...)`` whose child takes SIGINT as Python's default (a
    ``KeyboardInterrupt``) even when this process ignores it."""
    return subprocess.Popen(args, preexec_fn=_default_sigint, **popen_kwargs)


def read_line(child: subprocess.Popen[Any], within: float, what: str) -> str:
    """The child's next line of stdout. A child that writes none within ``within`` seconds is
    killed, and the test fails naming ``what`` and the end of what the child wrote to stderr."""
    assert child.stdout is not None
    line: list[Any] = []
    reader = threading.Thread(target=lambda: line.append(child.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(within)
    if reader.is_alive() or not line or not line[0]:
        reason = f"no line within {within:.0f} s" if reader.is_alive() else "it ended without one"
        child.kill()
        reader.join(10)
        try:
            _, stderr = child.communicate(timeout=10)
        except (subprocess.TimeoutExpired, ValueError):
            stderr = ""
        stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr or ""
        raise AssertionError(f"{what}: {reason}; the client's stderr ends:\n{stderr[-3000:]}")
    return line[0].decode() if isinstance(line[0], bytes) else str(line[0])
