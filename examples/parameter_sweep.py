"""A parameter sweep: one simulation per point of a numpy grid, the results back in a numpy array.

    python examples/parameter_sweep.py [HOST]

Each call integrates a damped, driven oscillator ``x'' + 2 g x' + x = cos(w t)`` until it settles
and returns its amplitude; the grid spans the damping ``g`` and the driving frequency ``w``. The
results are checked against the exact answer ``1 / sqrt((1 - w^2)^2 + (2 g w)^2)``.

numpy is needed here on the client only: the grid goes out as Python floats (``tolist()``), so
the nodes need nothing but Python. A function that uses numpy itself needs numpy on the nodes
too (``setup="module load ..."`` or ``python="/path/to/env/bin/python"``).
"""

from __future__ import annotations

import math
import sys

import numpy as np

from sheepdog_executor import GridEngineExecutor


def amplitude(damping: float, frequency: float, dt: float = 0.005) -> float:
    """Integrate (semi-implicit Euler) until the transient has died out; the largest |x| over the
    last two periods is the steady-state amplitude."""
    settle = 12.0 / damping  # the transient decays like exp(-damping * t)
    period = 2 * math.pi / frequency
    steps, measured = int((settle + 2 * period) / dt), int(2 * period / dt)
    x = v = peak = 0.0
    for step in range(steps):
        v += dt * (math.cos(frequency * step * dt) - 2 * damping * v - x)
        x += dt * v
        if step >= steps - measured:
            peak = max(peak, abs(x))
    return peak


def main(host: str) -> None:
    dampings = np.linspace(0.05, 0.5, 10)
    frequencies = np.linspace(0.5, 1.5, 41)
    g, w = np.meshgrid(dampings, frequencies, indexing="ij")
    with GridEngineExecutor(host=host) as executor:
        # chunksize: 10 grid points per message, fewer round trips for short calls
        flat = executor.map(amplitude, g.ravel().tolist(), w.ravel().tolist(), chunksize=10)
        result = np.fromiter(flat, dtype=float, count=g.size).reshape(g.shape)
        print(f"{g.size} simulations in job(s) {', '.join(executor.job_ids)}")

    exact = 1 / np.sqrt((1 - w**2) ** 2 + (2 * g * w) ** 2)
    error = np.max(np.abs(result - exact) / exact)
    print(f"largest relative error against the exact amplitude: {error:.2%}")
    print("damping  resonance at  (exact)  peak amplitude")
    for row, damping in enumerate(dampings):
        best = int(np.argmax(result[row]))
        exact_peak = math.sqrt(1 - 2 * damping**2)
        print(f"{damping:7.2f}  {frequencies[best]:12.3f}  {exact_peak:7.3f}  {result[row, best]:14.3f}")
    if error > 0.05:
        raise SystemExit("the simulations disagree with the exact answer")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fear")
