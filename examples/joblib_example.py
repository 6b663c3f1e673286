"""joblib on the cluster: the "gridengine" backend that importing sheepdog_executor registers.

    python examples/joblib_example.py [HOST]

Code written for joblib (``Parallel``/``delayed``) runs on Grid Engine by changing its backend only.
The nodes need neither joblib nor this file: each call's function travels by value.
"""

from __future__ import annotations

import sys

import joblib

import sheepdog_executor  # noqa: F401 - registers joblib's "gridengine" backend


def collatz_steps(n: int) -> int:
    """How many steps the Collatz map takes from n to 1."""
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def main(host: str) -> None:
    numbers = range(1, 2001)
    with joblib.parallel_config(backend="gridengine", host=host, n_jobs=8):
        steps = joblib.Parallel()(joblib.delayed(collatz_steps)(n) for n in numbers)
        # return_as="generator": results as they come, in order, while later ones still run
        first = next(
            iter(joblib.Parallel(return_as="generator")(joblib.delayed(collatz_steps)(n) for n in [27]))
        )
    longest = max(numbers, key=lambda n: steps[n - 1])
    print(f"{len(steps)} numbers on {host}; the longest run starts at {longest}: {max(steps)} steps")
    print(f"27 takes {first} steps")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fear")
