"""``setup=`` lines on the real cell: run by a login bash, in order, the first failing one stops the task."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from support import ssh

from sheepdog_executor import GridEngineExecutor, LocalExecutor, WorkerStartFailed


def prefix() -> str:
    return sys.prefix


@pytest.mark.cluster
def test_source_a_venv_made_on_the_cell(make_executor: Callable[..., GridEngineExecutor]) -> None:
    venv = f"/home/sdtest/.cache/sheepdog-tests/setup-venv-{os.getpid()}"
    made = ssh(f"python3 -m venv --without-pip {venv}")
    assert made.returncode == 0, made.stderr
    try:
        # the README's example: the venv's python3 is the one on PATH after `source`
        executor = make_executor(max_workers=1, setup=[f"source {venv}/bin/activate"])
        assert executor.submit(prefix).result(timeout=60) == venv
    finally:
        ssh(f"rm -rf {venv}")


@pytest.mark.cluster
def test_module_load_puts_a_python_on_path(make_executor: Callable[..., GridEngineExecutor]) -> None:
    # scripts/test-cell.sh installs Environment Modules and a module "sheepdog-python"
    executor = make_executor(max_workers=1, setup=["module load sheepdog-python"])
    assert executor.submit(prefix).result(timeout=60) == "/opt/sheepdog-test-python"


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("setup", "number", "status", "stderr"),
    [
        (["echo first", "false", "echo never"], 2, 1, ""),
        (["no-such-command --flag"], 1, 127, "no-such-command: command not found"),
    ],
)
def test_a_failing_line_fails_the_calls_quoting_it(
    make_executor: Callable[..., GridEngineExecutor], setup: list[str], number: int, status: int, stderr: str
) -> None:
    executor = make_executor(max_workers=2, retries=2, setup=setup)
    error = executor.submit(abs, -1).exception(timeout=90)
    assert isinstance(error, WorkerStartFailed)
    assert str(error).startswith(
        f"set-up line {number} failed with exit status {status}: {setup[number - 1]}\n"
    )
    assert stderr in error.stderr_tail
    assert len(executor.job_ids) == 1  # never retried
    out = ssh(f"cat {executor.session_dir}/task-{executor.job_ids[0]}-*.out").stdout
    assert "never" not in out


@pytest.mark.pythons
def test_local_executor_runs_setup_lines_the_same_way(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    made = os.system(f"{sys.executable} -m venv --without-pip {venv}")
    assert made == 0
    with LocalExecutor(max_workers=1, python="python3", setup=[f"source {venv}/bin/activate"]) as executor:
        assert executor.submit(prefix).result(timeout=60) == str(venv)
    with LocalExecutor(max_workers=1, setup=["true", "exit 3"]) as executor:
        error = executor.submit(abs, -1).exception(timeout=60)
    assert isinstance(error, WorkerStartFailed)
    assert str(error).startswith("set-up line 2 failed with exit status 3: exit 3\n")
