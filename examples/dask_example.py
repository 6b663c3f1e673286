"""dask with the executor as its scheduler: a delayed graph and a dask.array reduction on the cluster.

    python examples/dask_example.py [HOST] [SETUP-LINE]

dask's scheduler sends its own task-running function to the workers, so the nodes need dask (and
numpy for dask.array) at the client's versions: give the set-up line that provides them, e.g.
``"module load dask"`` or ``"source ~/envs/dask/bin/activate"`` (the test suite passes a PYTHONPATH).
"""

from __future__ import annotations

import sys

import dask
import dask.array as da
import numpy as np

from sheepdog_executor import GridEngineExecutor


def load(part: int) -> list[int]:
    return list(range(part * 100, part * 100 + 100))


def total(values: list[int]) -> int:
    return sum(values)


def main(host: str, setup: list[str]) -> None:
    with GridEngineExecutor(host=host, max_workers=4, setup=setup) as executor:
        parts = [dask.delayed(total)(dask.delayed(load)(i)) for i in range(10)]
        (grand_total,) = dask.compute(dask.delayed(sum)(parts), scheduler=executor)
        print(f"delayed graph: sum of 0..999 = {grand_total}")

        x = da.arange(1_000_000, chunks=100_000, dtype=np.float64)
        mean, norm = dask.compute(x.mean(), da.sqrt((x**2).sum()), scheduler=executor)
        expected = np.sqrt((np.arange(1e6) ** 2).sum())
        print(f"dask.array: mean = {mean:.1f}, norm = {norm:.6e} (numpy: {expected:.6e})")
        print(f"jobs: {executor.job_ids}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fear", sys.argv[2:3])
