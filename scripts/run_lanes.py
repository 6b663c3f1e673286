#!/usr/bin/env python3
"""Run the test suite as parallel lanes: one pytest process per lane, each over its own files.

Most of a cell test's time is spent waiting (for the scheduler, for a poll, for a node), so two
lanes on a two-core machine take far less than one. Files are dealt to lanes longest first, from
the seconds each took last time (``tests/durations.json``; ``--record`` rewrites it from this
run's JUnit reports). Files that use the multi-host cell stay in one lane: some of its tests need
all of its slots, or change one of its settings for a while.

Each lane's output is streamed with its name in front; the exit status is the first failing
lane's. Every lane has a deadline (``--deadline`` minutes), after which it is killed and fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DURATIONS = ROOT / "tests" / "durations.json"
UNKNOWN_SECONDS = 30.0  # a file not timed yet
SUMMARY = re.compile(r"\d+ (passed|failed|errors?)\b.* in [\d.]+s")
SHARED_CELL = re.compile(r"fear-multi|mark\.multihost|\bmultihost\b")


def test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py"))


def units(files: list[str]) -> list[list[str]]:
    """The files to deal out: those that use the multi-host cell as one unit, each other alone."""
    shared = [f for f in files if SHARED_CELL.search((ROOT / f).read_text())]
    return ([shared] if shared else []) + [[f] for f in files if f not in shared]


def deal(files: list[str], lanes: int, seconds: dict[str, float]) -> list[list[str]]:
    """Longest first, each unit to the lane with the least work so far."""
    cost = lambda unit: sum(seconds.get(f, UNKNOWN_SECONDS) for f in unit)  # noqa: E731
    dealt: list[list[str]] = [[] for _ in range(lanes)]
    loads = [0.0] * lanes
    for unit in sorted(units(files), key=cost, reverse=True):
        lane = loads.index(min(loads))
        dealt[lane] += unit
        loads[lane] += cost(unit)
    return [sorted(lane) for lane in dealt if lane]


class Lane:
    """One pytest process over some files, its output streamed with a prefix."""

    def __init__(self, name: str, files: list[str], pytest_args: list[str], report: Path) -> None:
        self.name, self.files, self.report = name, files, report
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={report}"]
        self.process = subprocess.Popen(
            [*command, *pytest_args, *files],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # killed as a group at the deadline or on Ctrl-C
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.started = time.monotonic()
        self.summary = ""
        self.reader = threading.Thread(target=self._stream, daemon=True)
        self.reader.start()

    def _stream(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if SUMMARY.search(line):
                self.summary = line.strip(" =\n")
            sys.stdout.write(f"[{self.name}] {line}")
            sys.stdout.flush()

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, until: float) -> int:
        try:
            code = self.process.wait(timeout=max(0.0, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            self.process.wait(timeout=30)
            self.summary = f"killed at the deadline, after {time.monotonic() - self.started:.0f} s"
            code = 1
        self.reader.join(timeout=30)
        return code


def file_seconds(reports: list[Path]) -> dict[str, float]:
    """Seconds per test file, summed from JUnit reports (reruns included)."""
    seconds: dict[str, float] = {}
    for report in reports:
        if not report.exists():
            continue
        for case in ElementTree.parse(report).iter("testcase"):
            module = case.get("classname", "").split(".")
            name = "/".join(module[: module.index(next(m for m in module if m.startswith("test_"))) + 1])
            path = f"{name}.py"
            seconds[path] = seconds.get(path, 0.0) + float(case.get("time", 0.0))
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lanes", type=int, default=int(os.environ.get("SHEEPDOG_TEST_LANES", "2")))
    parser.add_argument("--deadline", type=float, default=45.0, help="minutes per lane")
    parser.add_argument("--record", action="store_true", help="rewrite tests/durations.json")
    parser.add_argument("pytest_args", nargs="*", help="given to every lane's pytest (after --)")
    args = parser.parse_args()
    seconds = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    plan = deal(test_files(), max(1, args.lanes), seconds)
    reports = [Path(f"/tmp/sheepdog-lane-{os.getpid()}-{i}.xml") for i in range(len(plan))]
    for i, files in enumerate(plan):
        expected = sum(seconds.get(f, UNKNOWN_SECONDS) for f in files)
        names = " ".join(files)
        print(f"lane {i + 1}: {len(files)} files, about {expected / 60:.0f} min: {names}", flush=True)
    started = time.monotonic()
    lanes = [Lane(f"lane{i + 1}", files, args.pytest_args, reports[i]) for i, files in enumerate(plan)]
    deadline = started + args.deadline * 60
    try:
        codes = [lane.wait(deadline) for lane in lanes]
    except KeyboardInterrupt:
        for lane in lanes:
            lane.kill()
        raise
    print(f"== lanes done in {time.monotonic() - started:.0f} s", flush=True)
    for lane, code in zip(lanes, codes, strict=True):
        print(f"== {lane.name} (exit {code}): {lane.summary or 'no summary'}", flush=True)
    timed = file_seconds(reports)
    slowest = sorted(timed.items(), key=lambda row: -row[1])
    shown = ", ".join(f"{name[6:]} {seconds:.0f}" for name, seconds in slowest)
    print(f"== seconds per file, slowest first (for tests/durations.json): {shown}", flush=True)
    if args.record:
        DURATIONS.write_text(json.dumps({f: round(s) for f, s in sorted(timed.items())}, indent=1) + "\n")
    for report in reports:
        report.unlink(missing_ok=True)
    return next((code for code in codes if code), 0)


if __name__ == "__main__":
    sys.exit(main())
