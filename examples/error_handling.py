"""When things go wrong: a call's own exception, a map that fails part way, a worker that dies.

    python examples/error_handling.py [HOST]

* An exception raised by your function comes back from ``result()`` as itself, with the traceback
  from the node as its ``__cause__``.
* ``map`` raises at the failing call's position; to keep the other results, ``submit`` each call
  and look at each Future.
* A worker that dies (killed, out of memory, node gone) fails its call with ``WorkerLost``, which
  says what the scheduler knows; with ``retries=N`` the call runs again in another task instead,
  unless the scheduler killed it over a limit (``time=``, ``mem=``): that would kill it again
  (``escalate=`` runs it again with more instead).
"""

from __future__ import annotations

import math
import os
import signal
import socket
import sys

from sheepdog_executor import GridEngineExecutor, RemoteTraceback, WorkerLost


def root(x: float) -> float:
    if x < 0:
        raise ValueError(f"no real square root of {x}")
    return math.sqrt(x)


def killed() -> None:
    """Dies the way an out-of-memory kill does: no exception, no result."""
    os.kill(os.getpid(), signal.SIGKILL)


def killed_once(marker: str) -> str:
    """Dies the first time; ``marker`` (in the shared session directory) remembers that it did."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        killed()
    return socket.gethostname()


def main(host: str) -> None:
    with GridEngineExecutor(host=host, max_workers=4) as executor:
        print("1. an exception raised on the node")
        try:
            executor.submit(root, -4).result()
        except ValueError as error:
            assert isinstance(error.__cause__, RemoteTraceback)
            print(f"   caught {type(error).__name__}: {error}")
            print("   remote traceback:")
            print("".join(f"   | {line}\n" for line in str(error.__cause__).strip().splitlines()))

        print("2. a map raises at the first failing call; submit keeps every result")
        values = [9, 4, -1, 16]
        results = executor.map(root, values)
        try:
            for x in values:
                print(f"   map: root({x}) = {next(results)}")
        except ValueError as error:
            print(f"   map stopped: {error}")
        futures = {executor.submit(root, x): x for x in values}
        for future, x in futures.items():
            failure = future.exception()
            print(f"   submit: root({x}) = " + (f"failed: {failure}" if failure else f"{future.result()}"))

        print("3. a worker killed in the middle of a call, without retries")
        try:
            executor.submit(killed).result()
        except WorkerLost as error:  # its message says what the scheduler knows (qacct)
            print("   caught WorkerLost:")
            print("".join(f"   | {line}\n" for line in str(error).splitlines()), end="")
            print(f"   job {error.job_id}, exit status {error.accounting.get('exit_status', '?').split()[0]}")

    print("4. the same with retries=1: the call runs again in another task")
    with GridEngineExecutor(host=host, max_workers=2, retries=1) as executor:
        where = executor.submit(killed_once, f"{executor.session_dir}/killed-once").result()
        print(f"   the first run was killed; the retry succeeded on {where}")
        print(f"   retried calls: {executor.status()['batches'][-1]['retried']}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fear")
