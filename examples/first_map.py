"""Your first map, on Grid Engine and on Slurm: the same code, another class.

    python examples/first_map.py [GRID_ENGINE_HOST] [SLURM_HOST]

Each host is a host name or an alias of ``~/.ssh/config``; by default ``fear`` and ``fear-slurm``,
the local test clusters of ``scripts/test-cell.sh --slurm``. The README shows the code between the
two ``---`` comments.
"""

from __future__ import annotations

import sys

# ---
from sheepdog_executor import GridEngineExecutor, SlurmExecutor


def area(width: int, height: int) -> int:
    return width * height


def main(grid_engine_host: str = "fear", slurm_host: str = "fear-slurm") -> None:
    widths, heights = range(1, 101), range(101, 201)

    with GridEngineExecutor(host=grid_engine_host) as ex:  # one qsub -t array job
        on_grid_engine = list(ex.map(area, widths, heights))

    with SlurmExecutor(host=slurm_host) as ex:  # one sbatch --array job
        on_slurm = list(ex.map(area, widths, heights))

    print(f"Grid Engine: {len(on_grid_engine)} areas, the largest {max(on_grid_engine)}")
    print(f"Slurm: {len(on_slurm)} areas, the same: {on_slurm == on_grid_engine}")


# ---


if __name__ == "__main__":
    main(*sys.argv[1:3])
