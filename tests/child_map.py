"""A client process for the fault tests: starts a map of slow calls on the cell, then misbehaves.

Usage: python child_map.py MODE HOST. Prints one JSON line with the job ids once the tasks run.
MODE: "ctrl-c" (waits for SIGINT inside the with block), "raise" (exception in the with body),
"exit" (interpreter exits with the executor open), "gc" (executor dropped and collected; the
process stays alive until killed).
"""

from __future__ import annotations

import gc
import json
import sys
import time

from sheepdog_executor import ClusterExecutor, GridEngineExecutor, SlurmExecutor

EXECUTORS: dict[str, type[ClusterExecutor]] = {"gridengine": GridEngineExecutor, "slurm": SlurmExecutor}
Executor = EXECUTORS[sys.argv[3] if len(sys.argv) > 3 else "gridengine"]


def slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def start(host: str) -> tuple[ClusterExecutor, object]:
    executor = Executor(host=host, max_workers=3, poll_interval=0.5)
    results = executor.map(slow, [120.0] * 6)
    while len(executor._session.dispatcher.workers) < 3:  # every task runs a call
        time.sleep(0.2)
    print(json.dumps({"jobs": executor.job_ids}), flush=True)
    sys.stdin.readline()  # the test has seen the jobs on the cell
    return executor, results


def main(mode: str, host: str) -> None:
    if mode in ("ctrl-c", "raise"):
        with Executor(host=host, max_workers=3, poll_interval=0.5) as executor:
            results = executor.map(slow, [120.0] * 6)
            while len(executor._session.dispatcher.workers) < 3:
                time.sleep(0.2)
            print(json.dumps({"jobs": executor.job_ids}), flush=True)
            sys.stdin.readline()  # the test has seen the jobs on the cell
            if mode == "raise":
                raise RuntimeError("boom in the with body")
            list(results)  # Ctrl-C arrives here
    elif mode == "exit":
        start(host)
        sys.exit(0)  # executor still open
    elif mode == "gc":
        executor, results = start(host)
        del executor, results
        gc.collect()
        print(json.dumps({"collected": True}), flush=True)
        time.sleep(600)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
