"""A client process for the sweep tests: maps ``mark`` over ``range(N)`` in a sweep on a cell.

Usage: python child_sweep.py SCHEDULER HOST SWEEP N MARKS SECONDS WHEN. Each call sleeps SECONDS,
leaves a file ``MARKS/X.PID.NS`` on the cluster (one per run of call X) and returns ``X * X``.
Prints one JSON line with the jobs (the test may SIGKILL it then): WHEN "quarter" once a quarter of
the results came back, "running" once 8 workers run calls; then a last line with what the sweep
served and sent and how many results were right. WHEN "detach": detaches once the first result came
and says how many calls it handed over; "attach": attaches and says how many of the results of the
last calls of the map (as many as were handed over) are right.
"""

from __future__ import annotations

import json
import os
import sys
import time

from sheepdog_executor import ClusterExecutor, GridEngineExecutor, LocalExecutor, SlurmExecutor

EXECUTORS: dict[str, type[ClusterExecutor]] = {
    "gridengine": GridEngineExecutor,
    "slurm": SlurmExecutor,
    "local": LocalExecutor,
}
SCHEDULER, HOST, SWEEP, N, MARKS, SECONDS, WHEN = sys.argv[1:8]


def mark(x: int) -> int:
    """One call: its run leaves a file of its own in MARKS."""
    time.sleep(float(SECONDS))
    with open(os.path.join(os.path.expanduser(MARKS), f"{x}.{os.getpid()}.{time.time_ns()}"), "w"):
        pass
    return x * x


def main() -> None:
    options: dict[str, str] = {}
    if SCHEDULER != "local":
        options = {"host": HOST, "python": os.environ.get("NODE_PYTHON", "python3")}
    count = int(N)
    with EXECUTORS[SCHEDULER](max_workers=8, poll_interval=0.5, sweep=SWEEP, progress=False, **options) as ex:
        if WHEN == "detach":  # once the first result came, hand the rest over and exit
            results = ex.map(mark, range(count))
            assert next(results) == 0
            handed = ex.detach()
            print(json.dumps({"handed": handed, "jobs": ex.job_ids}), flush=True)
            return
        if WHEN == "attach":
            futures = ex.attach()
            values = [future.result(timeout=300) for future in futures]
            right = sum(v == x * x for v, x in zip(values, range(count - len(values), count), strict=True))
            assert ex.sweep is not None
            print(json.dumps({"right": right, "served": ex.sweep.served, "jobs": ex.job_ids}), flush=True)
            return
        results = ex.map(mark, range(count))
        if WHEN == "running":
            while sum(bool(w["holding"]) for w in ex.status()["workers"]) < min(8, count):
                time.sleep(0.2)
            print(json.dumps({"jobs": ex.job_ids, "session": ex.session_dir}), flush=True)
        right = 0
        for x, value in enumerate(results):
            right += value == x * x
            if WHEN == "quarter" and x + 1 == count // 4:
                print(json.dumps({"jobs": ex.job_ids, "session": ex.session_dir}), flush=True)
        sweep = ex.sweep
        assert sweep is not None
        print(json.dumps({"right": right, "served": sweep.served, "sent": sweep.sent, "jobs": ex.job_ids}))


if __name__ == "__main__":
    main()
