"""Quickstart: the squares of 1000 numbers, computed on a Grid Engine cluster.

    python examples/quickstart.py [HOST]

HOST is a host name or an alias of ``~/.ssh/config``; by default ``fear``, the local test cell of
``scripts/test-cell.sh``. When it cannot be reached, the same code runs on this machine with
``LocalExecutor`` instead, so the example works anywhere.
"""

from __future__ import annotations

import sys

from sheepdog_executor import ClusterExecutor, ConnectionFailed, GridEngineExecutor, LocalExecutor


def square(x: int) -> int:
    return x * x


def main(host: str) -> None:
    executor: ClusterExecutor
    try:
        executor = GridEngineExecutor(host=host)
        print(f"connected to {host}")
    except ConnectionFailed as error:
        print(f"cannot reach {host!r}: {error}", file=sys.stderr)
        print("running on this machine with LocalExecutor instead", file=sys.stderr)
        executor = LocalExecutor()
    with executor:
        print(f"watch it live at {executor.status_url}")
        squares = list(executor.map(square, range(1000)))
        batch = executor.status()["batches"][-1]
        print(f"jobs: {', '.join(executor.job_ids)}")
    print(f"{len(squares)} squares, from {squares[0]} to {squares[-1]}; their sum is {sum(squares)}")
    print(f"{batch['done']} calls done on {', '.join(sorted(batch['hosts']))}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fear")
