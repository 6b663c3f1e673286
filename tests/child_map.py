"""A client process for the fault tests: starts a map of slow calls on the cell, then misbehaves.

Usage: python child_map.py MODE HOST. Prints one JSON line with the job ids once the tasks run.
MODE: "ctrl-c" (waits for SIGINT inside the with block), "raise" (exception in the with body),
"exit" (interpreter exits with the executor open and calls of 10 s running: it waits for them and
prints "done" for each), "gc" (executor dropped and collected once its calls are done, its workers
still alive; the process stays alive until killed).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from concurrent.futures import Future, wait
from typing import Any

from sheepdog_executor import ClusterExecutor, GridEngineExecutor, SlurmExecutor

EXECUTORS: dict[str, type[ClusterExecutor]] = {"gridengine": GridEngineExecutor, "slurm": SlurmExecutor}
Executor = EXECUTORS[sys.argv[3] if len(sys.argv) > 3 else "gridengine"]


def slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def report(future: Future[Any]) -> None:
    print("done" if future.exception() is None else future.exception(), flush=True)


def start(host: str, seconds: float, idle_timeout: float = 5.0) -> tuple[ClusterExecutor, list[Future[Any]]]:
    """Six calls of ``seconds`` on three workers; their jobs printed once each worker runs."""
    executor = Executor(host=host, max_workers=3, poll_interval=0.5, idle_timeout=idle_timeout)
    futures = [executor.submit(slow, seconds) for _ in range(6)]
    while len(executor.status()["workers"]) < 3:  # every task runs (or ran) a call
        time.sleep(0.2)
    print(json.dumps({"jobs": executor.job_ids}), flush=True)
    sys.stdin.readline()  # the test has seen the jobs on the cell
    return executor, futures


def main(mode: str, host: str) -> None:
    if mode in ("ctrl-c", "raise"):
        with Executor(host=host, max_workers=3, poll_interval=0.5) as executor:
            results = executor.map(slow, [120.0] * 6)
            while len(executor.status()["workers"]) < 3:
                time.sleep(0.2)
            print(json.dumps({"jobs": executor.job_ids}), flush=True)
            sys.stdin.readline()  # the test has seen the jobs on the cell
            if mode == "raise":
                raise RuntimeError("boom in the with body")
            list(results)  # Ctrl-C arrives here
    elif mode == "exit":
        for future in start(host, 10.0)[1]:
            future.add_done_callback(report)
        sys.exit(0)  # executor still open, calls outstanding
    elif mode == "gc":
        executor, futures = start(host, 0.1, idle_timeout=600)
        wait(futures, timeout=120)
        del executor, futures
        gc.collect()
        print(json.dumps({"collected": True}), flush=True)
        time.sleep(600)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
