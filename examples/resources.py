"""Asking for resources in the words every scheduler shares: time=, mem=, cpus= per task.

    python examples/resources.py [HOST]

Resources are per task, that is per worker, and a worker runs many calls one after another. On
Grid Engine ``time=`` becomes ``h_rt``, ``cpus=2`` the ``smp`` parallel environment with 2 slots,
and ``mem=`` ``h_vmem`` per slot (``mem="2G"`` with ``cpus=2``: 1G a slot). A worker takes no call
that would not end before its task's time does; Grid Engine enforces ``h_vmem`` as an
address-space limit, so going over it raises ``MemoryError`` in the call, and the worker lives on.
A call longer than ``time=`` by itself gets its task killed: it fails with ``WorkerLost``. The same
script runs on Slurm by changing the class (``SlurmExecutor``: ``--time``, ``--mem``,
``--cpus-per-task``).
"""

from __future__ import annotations

import os
import resource
import socket
import sys
import threading
import time

from sheepdog_executor import GridEngineExecutor, WorkerLost

GiB = 1024**3


def where_am_i() -> dict[str, str]:
    """What the task was given, as the node sees it."""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    return {
        "host": socket.gethostname(),
        "job": f"{os.environ.get('JOB_ID')}.{os.environ.get('SGE_TASK_ID')}",
        "slots": os.environ.get("NSLOTS", "?"),
        "parallel environment": os.environ.get("PE", "none"),
        "memory limit": "none" if limit == resource.RLIM_INFINITY else f"{limit / GiB:.1f} GiB",
    }


def busy_threads(seconds: float) -> int:
    """One thread per granted slot (sleeping stands in for work that releases the GIL: numpy, I/O)."""
    slots = int(os.environ.get("NSLOTS", "1"))
    threads = [threading.Thread(target=time.sleep, args=(seconds,)) for _ in range(slots)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return slots


def allocate(gigabytes: float) -> str:
    block = bytearray(int(gigabytes * GiB))
    return f"allocated {len(block) / GiB:.1f} GiB"


def main(host: str) -> None:
    with GridEngineExecutor(
        host=host,
        max_workers=2,
        time="0:10:00",
        mem="2G",
        cpus=2,
    ) as executor:
        print("with time='0:10:00', mem='2G', cpus=2:")
        for key, value in executor.submit(where_am_i).result().items():
            print(f"   {key}: {value}")
        print(f"   a call used {executor.submit(busy_threads, 0.5).result()} threads, one per slot")
        print(f"   {executor.submit(allocate, 0.5).result()}")
        try:
            executor.submit(allocate, 3).result()
        except MemoryError:
            print("   allocating 3 GiB raised MemoryError on the node (over mem=2G); the worker lives on:")
        print(f"   {executor.submit(allocate, 0.5).result()}")

    print("with time='0:00:05', a call that needs 60 s:")
    with GridEngineExecutor(host=host, max_workers=1, time="0:00:05") as executor:
        try:
            executor.submit(time.sleep, 60).result()
        except WorkerLost as error:
            reason = error.accounting.get("failed", "?")
            print(f"   WorkerLost: Grid Engine ended task {error.job_id}.{error.task_id} ({reason})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fear")
