"""The executor in a real Jupyter kernel (nbclient + ipykernel), on the real cell: how it shows itself
(its ``_repr_html_`` card, as headless Chromium renders it, and its ``repr``), ``map``'s progress bar
(tqdm's notebook widget when ipywidgets is installed, else a text bar), and the notebook's stop button
(a kernel interrupt) during a map: its jobs leave the cell and the kernel goes on. And Ctrl-C in a map
without a ``with`` block, in this process, with local workers."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat import NotebookNode
from support import CELL_ALIAS, NODE_PYTHON, our_jobs, ssh, wait_until

from sheepdog_executor import LocalExecutor
from sheepdog_executor.testing import internals

ROOT = Path(__file__).resolve().parent.parent
#: Where the card's screenshot goes (kept after the run, to look at).
SCREENSHOT = Path(
    os.environ.get("SHEEPDOG_NOTEBOOK_SCREENSHOT", tempfile.gettempdir() + "/sheepdog-card.png")
)
WIDGET = "application/vnd.jupyter.widget-view+json"

#: The first cell of every notebook here: this checkout's package, and functions defined in the
#: notebook (they travel by value, as a user's would).
SETUP = f"""
import json, sys, time
sys.path.insert(0, {str(ROOT)!r})
from sheepdog_executor import GridEngineExecutor, LocalExecutor

def square(x):
    return x * x

def slow(seconds):
    time.sleep(seconds)
    return seconds
"""
GRID = f"GridEngineExecutor(host={CELL_ALIAS!r}, python={NODE_PYTHON!r}, max_workers=2, poll_interval=0.5"


def notebook(*cells: str, raises: int | None = None) -> NotebookNode:
    """A notebook of these code cells; cell ``raises`` may end in an exception (the stop button)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent(source).strip()) for source in cells]
    if raises is not None:
        nb.cells[raises].metadata["tags"] = ["raises-exception"]
    return nb


def client(nb: NotebookNode, where: str) -> NotebookClient:
    return NotebookClient(
        nb, timeout=120, startup_timeout=60, kernel_name="python3", resources={"metadata": {"path": where}}
    )


def bundles(cell: NotebookNode) -> list[dict[str, Any]]:
    """The mime bundles a cell displayed or returned."""
    return [o["data"] for o in cell.outputs if o["output_type"] in ("display_data", "execute_result")]


def progress_bars(nb: NotebookNode, cell: NotebookNode) -> list[dict[str, Any]]:
    """The state at the end of the run of each tqdm widget (a box holding a FloatProgress) that
    ``cell`` displayed, from the widget state nbclient recorded."""
    models = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    bars = []
    for bundle in bundles(cell):
        if WIDGET in bundle:
            children = models[bundle[WIDGET]["model_id"]]["state"]["children"]
            for child in (models[c.removeprefix("IPY_MODEL_")] for c in children):
                if child["model_name"] == "FloatProgressModel":
                    bars.append(child["state"])
    return bars


def printed(cell: NotebookNode, name: str = "stdout") -> str:
    return "".join(o["text"] for o in cell.outputs if o["output_type"] == "stream" and o["name"] == name)


@pytest.mark.cluster
def test_the_executor_in_a_notebook(cell: str, tmp_path: Path, chromium: Callable[..., str]) -> None:
    nb = notebook(
        SETUP,
        "local = LocalExecutor(max_workers=2, progress=True)\nlocal",
        "assert list(local.map(square, range(20))) == [x * x for x in range(20)]",
        f"grid = {GRID}, progress=True)\ngrid",
        """
        assert list(grid.map(square, range(30))) == [x * x for x in range(30)]
        print(json.dumps(grid.job_ids))
        """,
        """
        deadline = time.monotonic() + 10  # the counts follow the results by a moment
        while grid.status()["batches"][-1]["done"] < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        grid
        """,
        "grid.shutdown(); local.shutdown()\ngrid",
    )
    client(nb, str(tmp_path)).execute()
    cells = nb.cells

    local_card = bundles(cells[1])[0]
    assert local_card["text/plain"].startswith("<LocalExecutor: local processes on this machine, open;")
    assert "local processes" in local_card["text/html"]
    assert re.search(r"/status/[0-9a-f]+/\?token=", local_card["text/html"]), local_card["text/html"]

    card = bundles(cells[3])[0]
    html, text = card["text/html"], card["text/plain"]
    assert text.startswith(f"<GridEngineExecutor: Grid Engine on {CELL_ALIAS} (") and "), open; " in text
    assert "token" not in text  # the status link (a secret) is in the card only
    assert "<th" in html and ">Grid Engine<" in html and f">{CELL_ALIAS} (" in html
    link = re.search(r'<a href="(http://[^"]+/status/[0-9a-f]+/\?token=[^"]+)"', html)
    assert link is not None, html

    # map's progress bar: tqdm's notebook widget with ipywidgets, else tqdm's text bar on stderr
    for index, total in ((2, 20), (4, 30)):
        if importlib.util.find_spec("ipywidgets") is not None:
            bars = progress_bars(nb, cells[index])
            assert [(b["value"], b["max"], b["bar_style"]) for b in bars] == [(total, total, "success")]
        else:
            assert f"{total}/{total}" in printed(cells[index], "stderr")

    jobs = json.loads(printed(cells[4]))
    after = bundles(cells[5])[0]["text/html"]
    assert "30 done, 0 running, 0 queued" in after and jobs[0] in after
    assert "shut down" in bundles(cells[6])[0]["text/html"]
    assert not our_jobs(set(jobs))

    # the card as a browser renders it: the table, the link, the calls bar
    page = tmp_path / "card.html"
    page.write_text(f'<!doctype html><meta charset="utf-8"><title>card</title><body>{after}</body>')
    dom = chromium(page.as_uri(), "--dump-dom")
    rows = re.findall(r"<tr><th[^>]*>([^<]+)</th>", dom)
    assert rows == ["Scheduler", "Host", "State", "Workers", "Jobs", "Calls", "Status page", "Session"]
    assert 'class="done"' in dom and 'target="_blank"' in dom
    SCREENSHOT.unlink(missing_ok=True)
    chromium(page.as_uri(), f"--screenshot={SCREENSHOT}", "--window-size=820,300")
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.cluster
def test_the_stop_button_during_a_map(cell: str, tmp_path: Path) -> None:
    """The kernel is interrupted (SIGINT, as the stop button sends it) while a cell waits in a map of
    long calls, with the executor made in an earlier cell (no ``with`` block to leave): the map's
    calls end and its jobs leave the cell, the kernel goes on, and the executor still works."""
    mark = tmp_path / "jobs"
    nb = notebook(
        SETUP + 'sys.modules["ipywidgets"] = None  # as if not installed: tqdm draws a text bar',
        f"grid = {GRID}, progress=True)",
        f"""
        results = grid.map(slow, [120.0] * 6)
        while sum(w["holding"] for w in grid.status()["workers"]) < 2:  # both tasks run a call
            time.sleep(0.2)
        open({str(mark)!r}, "w").write(json.dumps(grid.job_ids))
        list(results)  # the stop button lands here
        """,
        'print([(b["label"], b["done"], b["cancelled"]) for b in grid.status()["batches"]])',
        "print(list(grid.map(square, range(4))))",
        "grid.shutdown()",
        raises=2,
    )
    run = client(nb, str(tmp_path))
    jobs: list[str] = []

    async def interrupt_when_running() -> None:
        waiting = asyncio.ensure_future(run.async_execute_cell(nb.cells[2], 2))
        for _ in range(600):
            if mark.exists() and mark.read_text() or waiting.done():
                break
            await asyncio.sleep(0.1)
        assert not waiting.done(), nb.cells[2].outputs
        jobs.extend(json.loads(mark.read_text()))
        assert our_jobs(set(jobs)), "the map's tasks should be on the cell"
        await run.km.interrupt_kernel()
        await asyncio.wait_for(waiting, 60)

    async def main() -> None:
        async with run.async_setup_kernel():
            for index in (0, 1):
                await run.async_execute_cell(nb.cells[index], index)
            await interrupt_when_running()
            wait_until(lambda: not our_jobs(set(jobs)), 30, f"the interrupted map's jobs {jobs} to go")
            for index in (3, 4, 5):
                await run.async_execute_cell(nb.cells[index], index)

    try:
        asyncio.run(main())
    finally:
        if jobs:
            ssh("qdel " + " ".join(jobs) + " >/dev/null 2>&1")
    error = next(o for o in nb.cells[2].outputs if o["output_type"] == "error")
    assert error["ename"] == "KeyboardInterrupt"
    assert printed(nb.cells[3]) == "[('map(slow)', 0, 6)]\n"  # 4 cancelled queued, 2 stopped running
    assert printed(nb.cells[4]) == "[0, 1, 4, 9]\n"
    assert "map(square): 100%" in printed(nb.cells[4], "stderr") and "4/4" in printed(nb.cells[4], "stderr")


def slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def both_hold_a_call(executor: LocalExecutor) -> bool:
    """Each of the 2 workers holds a call (a worker that holds none is left to idle out)."""
    workers = executor.status()["workers"]
    return len(workers) == 2 and all(worker["holding"] for worker in workers)


def test_ctrl_c_in_a_map_stops_its_running_calls() -> None:
    """SIGINT while the main thread waits in a map (no ``with`` block): its queued calls are
    cancelled, its running ones stopped (their processes killed), and the executor still works."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a suite may run with it ignored
    executor = LocalExecutor(max_workers=2)
    try:
        results = executor.map(slow, [60.0] * 5)

        def interrupt_when_running() -> None:
            wait_until(lambda: both_hold_a_call(executor), 30, "both workers to run a call")
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C sends it

        threading.Thread(target=interrupt_when_running, daemon=True).start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            list(results)
        assert time.monotonic() - started < 30
        scheduler = internals(executor).scheduler
        wait_until(lambda: not scheduler.poll(executor.job_ids), 4, "the map's worker processes to end")
        batch = executor.status()["batches"][0]
        assert (batch["done"], batch["cancelled"], batch["running"], batch["queued"]) == (0, 5, 0, 0)
        assert list(executor.map(abs, [-1, -2])) == [1, 2]
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        signal.signal(signal.SIGINT, previous)


def test_the_card_escapes_what_it_shows() -> None:
    with LocalExecutor(max_workers=1) as executor:
        internals(executor).shell.description = "<script>alert(1)</script> & co"
        assert executor.status()["host"] == "<script>alert(1)</script> & co"  # the head node, as shown
        html = executor._repr_html_()
        assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in html and "<script>" not in html
    half_made = LocalExecutor.__new__(LocalExecutor)  # its __init__ failed: still a repr, no error
    assert repr(half_made) == "<LocalExecutor (not started)>"
    assert half_made._repr_html_() == "&lt;LocalExecutor (not started)&gt;"


@pytest.mark.parametrize("chunksize", [1, 2])
def test_ctrl_c_while_the_bar_counts_a_result(monkeypatch: pytest.MonkeyPatch, chunksize: int) -> None:
    """The interrupt lands in the progress bar's update, outside the map's wait: the bar closes the
    map's iterator meanwhile, and that stops the running calls just the same."""
    from sheepdog_executor import progress

    executor = LocalExecutor(max_workers=2, progress=True)

    class InterruptedBar:
        def update(self, n: int = 1) -> None:
            wait_until(lambda: both_hold_a_call(executor), 30, "both workers to hold a long call")
            raise KeyboardInterrupt

        def close(self) -> None:
            pass

    monkeypatch.setattr(progress, "make_bar", lambda *args, **kwargs: InterruptedBar())
    try:
        with pytest.raises(KeyboardInterrupt):
            list(executor.map(slow, [0.0, 0.0, 60.0, 60.0, 60.0, 60.0], chunksize=chunksize))
        scheduler = internals(executor).scheduler
        wait_until(lambda: not scheduler.poll(executor.job_ids), 4, "the map's worker processes to end")
        batch = executor.status()["batches"][0]
        assert batch["running"] == batch["queued"] == 0
        assert batch["done"] + batch["cancelled"] == 6 // chunksize and batch["cancelled"] >= 4 // chunksize
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def test_ctrl_c_while_shutdown_waits_stops_everything() -> None:
    """Ctrl-C (a notebook's stop button) while ``shutdown(wait=True)`` waits for running calls: the
    executor stops at once, as when the KeyboardInterrupt leaves a ``with`` block."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    executor = LocalExecutor(max_workers=2)
    try:
        futures = [executor.submit(slow, 60.0) for _ in range(3)]

        def interrupt_when_running() -> None:
            wait_until(lambda: both_hold_a_call(executor), 30, "both workers to run a call")
            os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=interrupt_when_running, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            executor.shutdown(wait=True)
        scheduler = internals(executor).scheduler
        wait_until(lambda: not scheduler.poll(executor.job_ids), 4, "the worker processes to end")
        assert all(future.done() for future in futures)
        assert "shut down" in repr(executor)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        signal.signal(signal.SIGINT, previous)
