"""Every script in examples/ runs as a user would run it (a subprocess, on the cell) and says what it
should; the quickstart also falls back to LocalExecutor when its host cannot be reached."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def start_example(name: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=EXAMPLES.parent,
        # this checkout's package, not whichever one is installed
        env={**os.environ, "PYTHONPATH": str(EXAMPLES.parent)},
    )


def run_example(name: str, *args: str, timeout: float = 240) -> str:
    done = start_example(name, *args, timeout=timeout)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.cluster
def test_quickstart(cell: str) -> None:
    out = run_example("quickstart.py", cell)
    assert f"connected to {cell}" in out
    assert "1000 squares, from 0 to 998001; their sum is 332833500" in out
    assert re.search(r"/status/[0-9a-f]+/\?token=", out) and "1000 calls done on" in out


def test_quickstart_without_the_cluster() -> None:
    done = start_example("quickstart.py", "no-such-host.invalid", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "cannot reach 'no-such-host.invalid'" in done.stderr and "LocalExecutor instead" in done.stderr
    assert "their sum is 332833500" in done.stdout


@pytest.mark.cluster
def test_first_map_on_both_schedulers(cell: str, slurm_cell: str) -> None:
    out = run_example("first_map.py", cell, slurm_cell)
    assert "Grid Engine: 100 areas, the largest 20000" in out
    assert "Slurm: 100 areas, the same: True" in out


def test_the_readme_shows_the_first_map_as_the_example_runs_it() -> None:
    """The README's first map is the code between the example's two ``# ---`` lines, verbatim."""
    example = (EXAMPLES / "first_map.py").read_text().split("# ---\n")[1].strip()
    readme = (EXAMPLES.parent / "README.rst").read_text()
    section = readme.split("\nYour first map\n==============\n", 1)[1]
    block = re.search(r"::\n\n((?:(?: {4}.*)?\n)+)", section)
    assert block, "the section has no code block"
    assert textwrap.dedent(block.group(1)).strip() == example


@pytest.mark.cluster
def test_parameter_sweep(cell: str) -> None:
    pytest.importorskip("numpy")
    out = run_example("parameter_sweep.py", cell)
    assert "410 simulations in job(s)" in out
    error = float(out.split("exact amplitude: ")[1].split("%")[0])
    assert error < 1.0
    # lightly damped: the resonance sits at w = 1 with amplitude 1 / (2 g) = 10
    assert "   0.05         1.000    0.997          10.000" in out


@pytest.mark.cluster
def test_error_handling(cell: str) -> None:
    out = run_example("error_handling.py", cell)
    assert "caught ValueError: no real square root of -4" in out
    assert "| ValueError: no real square root of -4" in out  # the remote traceback,
    assert 'raise ValueError(f"no real square root of {x}")' in out  # with the script's source line
    assert "map: root(4) = 2.0" in out and "map stopped: no real square root of -1" in out
    assert "submit: root(-1) = failed" in out and "submit: root(16) = 4.0" in out
    assert "caught WorkerLost" in out and "exit status 137" in out
    assert "the retry succeeded on" in out and "retried calls: 1" in out


@pytest.mark.cluster
def test_resources(cell: str) -> None:
    out = run_example("resources.py", cell)
    assert "slots: 2" in out and "parallel environment: smp" in out
    assert "memory limit: 2.0 GiB" in out  # h_vmem is per slot
    assert "a call used 2 threads" in out
    assert "raised MemoryError on the node" in out and out.count("allocated 0.5 GiB") == 2
    assert "WorkerLost: Grid Engine ended task" in out  # over h_rt


@pytest.mark.cluster
def test_joblib_example(cell: str) -> None:
    pytest.importorskip("joblib")
    out = run_example("joblib_example.py", cell)
    assert f"2000 numbers on {cell}; the longest run starts at 1161: 181 steps" in out
    assert "27 takes 111 steps" in out


@pytest.mark.cluster
def test_dask_example(cell: str, node_packages: str) -> None:
    pytest.importorskip("dask")
    out = run_example("dask_example.py", cell, node_packages)
    assert "delayed graph: sum of 0..999 = 499500" in out
    norm = out.split("norm = ")[1].split(" ")[0]
    assert "mean = 499999.5" in out and f"(numpy: {norm})" in out
