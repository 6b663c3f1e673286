"""Progress bars for futures and result iterators: tqdm's when it is installed, else one stderr line.

``for future in progress(futures): ...`` yields Futures as they complete (like ``as_completed``);
``for result in progress(executor.map(f, xs), total=len(xs)): ...`` yields the results in their order.
By default (``disable=None``) a bar is drawn only on a terminal (or a Jupyter kernel's stderr), so logs
and CI output stay clean. ``pip install sheepdog-executor[progress]`` brings tqdm. In a Jupyter kernel
the bar is tqdm's notebook widget when ipywidgets is installed (tqdm's auto mode), else a text bar.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Collection, Iterable, Iterator
from concurrent.futures import Future, as_completed
from typing import Any, Protocol, TextIO, TypeVar, cast

T = TypeVar("T")

#: The fallback bar redraws at most this often (seconds).
REDRAW_SECONDS = 0.1


class Bar(Protocol):
    """What both bars offer: tqdm's ``update`` and ``close``."""

    def update(self, n: int = 1) -> Any: ...

    def close(self) -> None: ...


def progress(
    futures_or_iterator: Iterable[T],
    total: int | None = None,
    desc: str | None = None,
    disable: bool | None = None,
    *,
    file: TextIO | None = None,
    delay: float = 0.0,
) -> Iterator[T]:
    """Iterate with a progress bar on ``file`` (stderr).

    A collection of Futures is yielded as they complete; anything else in its own order. ``total``
    defaults to ``len()`` when there is one. ``disable=None`` shows the bar only when ``file`` is
    interactive; ``delay`` holds the bar back until that many seconds have passed.
    """
    stream = file if file is not None else sys.stderr
    if _all_futures(futures_or_iterator):
        futures = cast(Collection[Future[Any]], futures_or_iterator)
        items: Iterable[T] = cast(Iterator[T], as_completed(futures))
        total = len(futures) if total is None else total
    else:
        items = futures_or_iterator
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
    if disable is None:
        disable = not interactive(stream)
    if disable:
        return iter(items)
    return _counted(items, make_bar(total, desc, stream, delay))


def interactive(stream: Any) -> bool:
    """A terminal, or the stream of a Jupyter kernel (which renders ``\\r`` as a redraw)."""
    if in_kernel(stream):
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def in_kernel(stream: Any) -> bool:
    """``stream`` is a Jupyter kernel's stdout or stderr (what a notebook cell prints to)."""
    return type(stream).__module__.split(".")[0] == "ipykernel"


def make_bar(total: int | None, desc: str | None, file: TextIO, delay: float = 0.0) -> Bar:
    """tqdm's bar if tqdm is installed (on a kernel's stream, tqdm's auto mode: a notebook widget
    with ipywidgets, a text bar without), else ``LineBar``."""
    try:
        if in_kernel(file):
            with warnings.catch_warnings():  # without ipywidgets, tqdm warns once and draws text
                warnings.simplefilter("ignore")
                from tqdm.auto import tqdm
        else:
            from tqdm import tqdm
    except ImportError:
        return LineBar(total, desc, file, delay)
    return cast(Bar, tqdm(total=total, desc=desc, file=file, delay=delay, dynamic_ncols=True))


def _all_futures(items: Iterable[Any]) -> bool:
    if not isinstance(items, Collection) or isinstance(items, (str, bytes)) or not items:
        return False
    return all(isinstance(item, Future) for item in items)


def _counted(items: Iterable[T], bar: Bar) -> Iterator[T]:
    """Yield ``items``, counting each as it arrives; close the bar (and ``items``) however it ends.
    Keeps no reference to an item it yielded (a map's big result is freed once the caller drops it)."""
    iterator = iter(items)
    try:
        while True:
            try:
                box = [next(iterator)]
            except StopIteration:
                return
            bar.update(1)
            yield box.pop()
    finally:
        bar.close()
        close = getattr(items, "close", None)
        if close is not None:  # e.g. a map's results: cancels the calls not yet consumed
            close()


class LineBar:
    """A one-line bar redrawn in place (``\\r``), at most every ``REDRAW_SECONDS``."""

    def __init__(self, total: int | None, desc: str | None, file: TextIO, delay: float = 0.0) -> None:
        self.total, self.desc, self.file = total, desc, file
        self.n = 0
        self.start = time.monotonic()
        self._next_draw = self.start + delay
        self._width = 0  # of the line drawn last, to blank what a shorter one leaves
        self._closed = False
        encoding = (getattr(file, "encoding", None) or "").lower().replace("-", "")
        self._fill = "\u2588" if encoding == "utf8" else "#"
        if delay <= 0:
            self._draw(self.start)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now >= self._next_draw:
            self._draw(now)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._width:  # drawn at least once: show the final count and end the line
            self._draw(time.monotonic())
            self._write("\n")

    def _draw(self, now: float) -> None:
        self._next_draw = now + REDRAW_SECONDS
        line = self.render(now - self.start, _columns(self.file))
        self._write("\r" + line + " " * max(0, self._width - len(line)))
        self._width = len(line)

    def _write(self, text: str) -> None:
        try:
            self.file.write(text)
            self.file.flush()
        except (OSError, ValueError):  # a closed or broken stream must not break the iteration
            pass

    def render(self, elapsed: float, columns: int = 80) -> str:
        """``desc: 42%|####      | 42/100 [00:03<00:04, 12.3/s]``, fitted to ``columns``."""
        rate = self.n / elapsed if elapsed > 0 else 0.0
        prefix = f"{self.desc}: " if self.desc else ""
        if not self.total:
            return f"{prefix}{self.n} [{_clock(elapsed)}, {rate:.1f}/s]"[: columns - 1]
        fraction = min(1.0, self.n / self.total)
        eta = (self.total - self.n) / rate if rate > 0 else None
        left = f"{prefix}{fraction * 100:3.0f}%|"
        right = f"| {self.n}/{self.total} [{_clock(elapsed)}<{_clock(eta)}, {rate:.1f}/s]"
        width = columns - 1 - len(left) - len(right)
        if width < 5:
            return (left[:-1] + right[1:])[: columns - 1]
        filled = int(fraction * width)
        return left + self._fill * filled + " " * (width - filled) + right


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def _columns(file: TextIO) -> int:
    try:
        return os.get_terminal_size(file.fileno()).columns or 80  # 0: a pty nobody sized
    except (AttributeError, OSError, ValueError):
        return 80
