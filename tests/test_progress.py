"""Progress bars: tqdm's and the one-line fallback, on a fake terminal; off when not a terminal; and
``executor.map(progress=...)`` on the cell."""

from __future__ import annotations

import io
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import pytest

from sheepdog_executor import GridEngineExecutor
from sheepdog_executor.progress import LineBar, interactive, progress


class FakeTTY(io.StringIO):
    """A terminal as far as the bar can tell."""

    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


@pytest.fixture(params=["tqdm", "fallback"])
def bar_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test twice: with tqdm, and with tqdm made unimportable."""
    if request.param == "tqdm":
        pytest.importorskip("tqdm")
    else:
        monkeypatch.setitem(sys.modules, "tqdm", None)
    return str(request.param)


def test_a_bar_on_a_terminal(bar_kind: str) -> None:
    tty = FakeTTY()
    assert list(progress(range(250), desc="squares", file=tty)) == list(range(250))
    out = tty.getvalue()
    assert "squares" in out and "250/250" in out and "100%" in out
    assert out.endswith("\n") and out.count("\n") == 1  # one line, redrawn with \r
    assert "\r" in out


def test_no_bar_when_not_a_terminal_unless_asked(bar_kind: str) -> None:
    plain = io.StringIO()
    items = iter(range(5))
    assert progress(items, file=plain) is items  # passed through untouched: no cost at all
    assert plain.getvalue() == ""
    assert list(progress(range(5), disable=False, file=plain)) == list(range(5))
    assert "5/5" in plain.getvalue()
    tty = FakeTTY()
    assert list(progress(range(5), disable=True, file=tty)) == list(range(5)) and tty.getvalue() == ""


def test_unknown_total_counts(bar_kind: str) -> None:
    tty = FakeTTY()
    assert sum(progress((x for x in range(7)), desc="gen", file=tty)) == 21
    assert "gen" in tty.getvalue() and "7" in tty.getvalue().rsplit("\r", 1)[-1]


def test_futures_come_as_they_complete(bar_kind: str) -> None:
    futures: list[Future[int]] = [Future() for _ in range(3)]

    def resolve() -> None:
        for index in (2, 0, 1):
            time.sleep(0.05)
            futures[index].set_result(index)

    threading.Thread(target=resolve).start()
    tty = FakeTTY()
    order = [future.result() for future in progress(futures, file=tty)]
    assert order == [2, 0, 1]
    assert "3/3" in tty.getvalue()
    # a dict of futures (future -> argument) works the same
    done = {Future(): "a", Future(): "b"}
    for future in done:
        future.set_result(done[future])
    assert sorted(done[f] for f in progress(done, disable=True)) == ["a", "b"]


def test_delay_holds_the_bar_back(bar_kind: str) -> None:
    tty = FakeTTY()
    assert list(progress(range(50), file=tty, delay=60)) == list(range(50))
    assert tty.getvalue() == ""


def test_leaving_early_closes_the_bar_and_the_source(bar_kind: str) -> None:
    closed = []

    def source() -> Iterator[int]:
        try:
            yield from range(100)
        finally:
            closed.append(True)

    tty = FakeTTY()
    bar = progress(source(), total=100, file=tty)
    for x in bar:
        if x == 3:
            break
    bar.close()  # type: ignore[attr-defined]
    assert closed == [True]
    assert tty.getvalue().endswith("\n")


def test_line_bar_fits_the_width() -> None:
    bar = LineBar(1000, "map(f)", io.StringIO())
    bar.n = 250
    line = bar.render(10.0, columns=60)
    assert len(line) == 59 and line.startswith("map(f):  25%|") and "250/1000 [00:10<00:30, 25.0/s]" in line
    assert len(bar.render(10.0, columns=20)) <= 19  # too narrow for a bar: figures only, cut
    unknown = LineBar(None, None, io.StringIO())
    unknown.n = 3
    assert unknown.render(2.0) == "3 [00:02, 1.5/s]"


def test_overhead_per_item_is_small(bar_kind: str) -> None:
    items = list(range(200_000))
    start = time.perf_counter()
    for _ in progress(items, file=FakeTTY()):
        pass
    per_item = (time.perf_counter() - start) / len(items)
    assert per_item < 5e-6, f"{per_item * 1e6:.2f} µs per item"


def test_interactive() -> None:
    assert interactive(FakeTTY()) and not interactive(io.StringIO()) and not interactive(object())
    with open(__file__) as stream:
        pass
    assert not interactive(stream)  # a closed stream's isatty() raises ValueError


def square(x: int) -> int:
    return x * x


@pytest.mark.cluster
def test_map_shows_a_bar(
    make_executor: Callable[..., GridEngineExecutor], capsys: pytest.CaptureFixture[str]
) -> None:
    shown = make_executor(progress=True)
    assert list(shown.map(square, range(150), timeout=120)) == [x * x for x in range(150)]
    assert list(shown.map(square, range(30), chunksize=7, timeout=120)) == [x * x for x in range(30)]
    err = capsys.readouterr().err
    assert "map(square)" in err and "150/150" in err and "30/30" in err
    # auto: stderr is not a terminal under pytest, so no bar
    auto = make_executor()
    assert list(auto.map(square, range(150), timeout=120)) == [x * x for x in range(150)]
    assert "150/150" not in capsys.readouterr().err
