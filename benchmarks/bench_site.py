"""How politely an executor treats a shared cluster: scheduler commands per minute during a sweep,
and how long a shutdown with hundreds of tasks on the books takes.

1. ``--sweep SECONDS`` (default 120): a map of calls that keeps ``--workers`` workers busy for about
   that long; every command the executor sends to the head node (``Scheduler.run``: polls, submits,
   removals, accounting) is counted by wrapping that one method, so the figure is comparable across
   versions; prints commands in total and per minute.
2. ``--tasks N`` (default 300): an executor with ``max_workers=N`` runs a small map of N short calls
   (the cell has few slots: most tasks are still queued when it ends), then ``shutdown()`` is timed,
   and the scheduler's listing is checked for the executor's jobs afterwards.

Run: ``python benchmarks/bench_site.py [--scheduler gridengine|slurm] [--host fear] [--only sweep,shutdown]
[--commands-per-minute 12]``
"""

from __future__ import annotations

import argparse
import subprocess
import threading
import time
from typing import Any

from sheepdog_executor import ClusterExecutor, GridEngineExecutor, SlurmExecutor
from sheepdog_executor.scheduler.base import Scheduler

EXECUTORS: dict[str, type[ClusterExecutor]] = {"gridengine": GridEngineExecutor, "slurm": SlurmExecutor}
HOSTS = {"gridengine": "fear", "slurm": "fear-slurm"}
LISTING = {"gridengine": 'qstat -u "$(id -un)"', "slurm": 'squeue -h -u "$(id -un)" -o %F'}

commands: list[tuple[float, str]] = []
_lock = threading.Lock()
_run = Scheduler.run


def _counted_run(self: Scheduler, command: str, **kwargs: Any) -> Any:
    with _lock:
        commands.append((time.monotonic(), command.split()[0] if command.split() else ""))
    return _run(self, command, **kwargs)


Scheduler.run = _counted_run  # type: ignore[method-assign]


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def sweep(
    executor_class: type[ClusterExecutor], host: str, seconds: float, workers: int, **options: Any
) -> None:
    calls, each = int(seconds / 5) * workers, 5.0
    with executor_class(host=host, max_workers=workers, job_name="bench-site-sweep", **options) as executor:
        start = time.monotonic()
        commands.clear()
        list(executor.map(nap, [each] * calls))
        elapsed = time.monotonic() - start
        counted = list(commands)
        status = executor.status()
    kinds: dict[str, int] = {}
    for _, kind in counted:
        kinds[kind] = kinds.get(kind, 0) + 1
    print(f"sweep: {calls} calls of {each:.0f} s on {workers} workers in {elapsed:.0f} s")
    print(f"  commands: {len(counted)} = {len(counted) / elapsed * 60:.1f} per minute; by program: {kinds}")
    if "scheduler_commands" in status:
        print(f"  status(): {status['scheduler_commands']}")


def shutdown(executor_class: type[ClusterExecutor], host: str, tasks: int, scheduler: str) -> None:
    executor = executor_class(host=host, max_workers=tasks, job_name="bench-site-shutdown")
    list(executor.map(nap, [0.2] * tasks))
    jobs = list(executor.job_ids)
    commands.clear()
    start = time.monotonic()
    executor.shutdown(wait=True)
    took = time.monotonic() - start
    listing = subprocess.run(
        ["ssh", host, LISTING[scheduler]], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    left = [job for job in jobs if job in listing]
    print(
        f"shutdown with {tasks} tasks ({len(jobs)} job(s)): {took:.1f} s, {len(commands)} command(s); "
        f"still listed just after: {left or 'none'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheduler", choices=sorted(EXECUTORS), default="gridengine")
    parser.add_argument("--host")
    parser.add_argument("--sweep", type=float, default=120.0)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--only", default="sweep,shutdown")
    parser.add_argument(
        "--commands-per-minute", type=float, help="the executor's ceiling (its default if not given)"
    )
    args = parser.parse_args()
    host = args.host or HOSTS[args.scheduler]
    executor_class = EXECUTORS[args.scheduler]
    only = args.only.split(",")
    if "sweep" in only:
        ceiling = {"commands_per_minute": args.commands_per_minute} if args.commands_per_minute else {}
        sweep(executor_class, host, args.sweep, args.workers, **ceiling)
    if "shutdown" in only:
        shutdown(executor_class, host, args.tasks, args.scheduler)


if __name__ == "__main__":
    main()
