"""The test helpers that keep the suite from hanging: clients take Ctrl-C, reads have deadlines."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from support import read_line, require_up, spawn

pytestmark = pytest.mark.pythons

SAY_SIGINT = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True)"


def test_a_client_takes_ctrl_c_when_the_suite_ignores_it() -> None:
    """As in a suite started as a background job of a non-interactive shell."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        inherited = subprocess.run([sys.executable, "-c", SAY_SIGINT], capture_output=True, text=True)
        child = spawn([sys.executable, "-c", SAY_SIGINT], stdout=subprocess.PIPE, text=True)
        said = read_line(child, 30, "the child's SIGINT handler")
        child.wait(timeout=30)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert inherited.stdout.strip() == "False"  # what a plain Popen gives: Ctrl-C would be ignored
    assert said.strip() == "True"


def test_read_line_gives_up_on_a_silent_client_and_kills_it() -> None:
    child = spawn(
        [sys.executable, "-c", "import sys, time; sys.stderr.write('stuck here'); time.sleep(60)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)the report: no line within 1 s.*stuck here"):
        read_line(child, 1, "the report")
    assert time.monotonic() - started < 30
    assert child.poll() is not None


def test_read_line_says_when_a_client_ended_without_a_line() -> None:
    child = spawn(
        [sys.executable, "-c", "raise SystemExit('gone early')"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    with pytest.raises(AssertionError, match=r"(?s)it ended without one.*gone early"):
        read_line(child, 30, "the report")


def test_the_unit_tier_fails_a_test_that_asks_for_a_cell(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under SHEEPDOG_TEST_NO_CELL=1 (scripts/run-unit-tests.sh) a cell fixture fails the test, so
    that a test missing its ``cluster`` mark cannot pass the unit tier by skipping."""
    monkeypatch.setenv("SHEEPDOG_TEST_NO_CELL", "1")
    with pytest.raises(pytest.fail.Exception, match="not marked cluster or multihost"):
        require_up("fear", "echo up", bool, "test cell", "scripts/test-cell.sh")
