"""dask on the real cell, with the executor as dask's scheduler: ``dask.compute(..., scheduler=executor)``.

dask's local scheduler submits ``dask.local.batch_execute_tasks`` with the graph's tasks as arguments, so
the nodes need dask (and numpy for arrays) at the client's versions: the ``node_packages`` fixture
installs them once per version into a directory on the cell, put on the workers' PYTHONPATH.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest

from sheepdog_executor import GridEngineExecutor, RemoteTraceback

pytestmark = pytest.mark.cluster


@pytest.fixture
def executor(make_executor: Callable[..., GridEngineExecutor], node_packages: str) -> GridEngineExecutor:
    return make_executor(max_workers=4, setup=[node_packages])


def test_delayed_graph(executor: GridEngineExecutor) -> None:
    def load(part: int) -> list[int]:
        return list(range(part * 10, part * 10 + 10))

    def total(values: list[int]) -> int:
        return sum(values)

    def job_id() -> str:
        return os.environ.get("SHEEPDOG_JOB_ID", "")

    parts = [dask.delayed(load)(part) for part in range(8)]
    grand = dask.delayed(sum)([dask.delayed(total)(part) for part in parts])
    result, job = dask.compute(grand, dask.delayed(job_id)(), scheduler=executor)
    assert result == sum(range(80))
    assert job in executor.job_ids  # computed by one of this executor's Grid Engine jobs


def test_array_sum_and_mean_match_numpy(executor: GridEngineExecutor) -> None:
    x = np.random.default_rng(7).random((400, 300))
    a = da.from_array(x, chunks=(100, 75))  # 16 chunks
    total, mean, columns = dask.compute(a.sum(), a.mean(), a.sum(axis=0), scheduler=executor)
    np.testing.assert_allclose(total, x.sum(), rtol=1e-12)
    np.testing.assert_allclose(mean, x.mean(), rtol=1e-12)
    np.testing.assert_allclose(columns, x.sum(axis=0), rtol=1e-12)
    integers = np.arange(1_000_000, dtype=np.int64).reshape(1000, 1000)
    with dask.config.set(scheduler=executor):
        assert da.from_array(integers, chunks=250).sum().compute() == integers.sum()
    assert executor.job_ids


def test_a_failing_task_raises_its_own_exception(executor: GridEngineExecutor) -> None:
    def quotient(a: float, b: float) -> float:
        return a / b

    with pytest.raises(ZeroDivisionError) as info:
        dask.compute(dask.delayed(quotient)(1, 0), scheduler=executor)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "in quotient" in info.value.__cause__.tb


def test_a_remote_frame_is_not_given_another_modules_source(executor: GridEngineExecutor) -> None:
    def divide(a: float, b: float) -> float:
        return a / b

    with pytest.raises(ZeroDivisionError) as info:
        executor.submit(divide, 1, 0).result(timeout=60)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    frame = re.search(r'File "([^"]+)", line \d+, in divide$', info.value.__cause__.tb, re.MULTILINE)
    assert frame is not None
    assert frame.group(1) in ("<dynamic-code>", __file__)


def test_functions_of_a_user_module_in_a_graph(
    executor: GridEngineExecutor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"user_tasks_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text("def inc(x):\n    return x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    assert dask.compute(dask.delayed(module.inc)(1), scheduler=executor) == (2,)
