"""README claims that no other test checks, each in the unit tier (no cell): its config file example
loads as written, a sweep's detached results are served to a rerun of the same script, and every
exception is importable from the package."""

from __future__ import annotations

import os
import re
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import wait_until

import sheepdog_executor
from sheepdog_executor import ConfigurationError, LocalExecutor, SweepDetached, errors
from sheepdog_executor.config import CONFIG_ENV, OPTIONS, env_name, resolve_options
from sheepdog_executor.jobscript import JobOptions
from sheepdog_executor.options import ExecutorOptions
from sheepdog_executor.resources import Resources
from sheepdog_executor.scheduler.gridengine import GridEngineScheduler
from sheepdog_executor.scheduler.slurm import SlurmScheduler
from sheepdog_executor.shell import LocalShell

README = Path(__file__).resolve().parent.parent / "README.rst"


def section(title: str) -> str:
    """The README's text under a top-level ``title``, up to the next top-level title."""
    text = README.read_text()
    start = text.index(f"\n{title}\n{'=' * len(title)}\n")
    following = re.search(r"\n\n\n[^\n]+\n=+\n", text[start + len(title) + 2 :])
    return text[start : start + len(title) + 2 + following.start()] if following else text[start:]


def test_the_config_file_example_loads_with_the_shared_resource_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    block = re.search(r"::\n\n((?: {4}.*\n|\n)+)", section("Configuration file and environment"))
    assert block, "the section has no code block"
    example = textwrap.dedent(block.group(1))
    path = tmp_path / "config.toml"
    path.write_text(example)
    monkeypatch.setenv(CONFIG_ENV, str(path))
    for name in OPTIONS:
        monkeypatch.delenv(env_name(name), raising=False)
    assert "SHEEPDOG_MEM=8G" in example  # the variable the example shows wins over the host's table
    monkeypatch.setenv("SHEEPDOG_MEM", "8G")
    resolved = resolve_options("fear", {})
    assert (resolved["mem"], resolved["escalate"], resolved["max_workers"]) == ("8G", {"mem": 2}, 64)
    ExecutorOptions.pick(resolved)  # every value passes the options' own checks


MARKS = Path(os.environ.get("TMPDIR", "/tmp")) / f"sheepdog-readme-marks-{os.getpid()}"


def slow_square(x: int) -> int:
    """A call whose every run leaves a file in MARKS."""
    time.sleep(0.2)
    (MARKS / f"{x}.{time.time_ns()}").touch()
    return x * x


def _runs() -> dict[int, int]:
    counts: dict[int, int] = {}
    for name in os.listdir(MARKS):
        counts[int(name.split(".")[0])] = counts.get(int(name.split(".")[0]), 0) + 1
    return counts


@pytest.fixture
def marks() -> Iterator[None]:
    MARKS.mkdir(exist_ok=True)
    for name in os.listdir(MARKS):
        os.unlink(MARKS / name)
    yield
    for name in os.listdir(MARKS):
        os.unlink(MARKS / name)
    MARKS.rmdir()


def test_a_rerun_after_detach_serves_the_detached_calls_results(tmp_path: Path, marks: None) -> None:
    """Detach and attach: the handed-over calls' Futures end with ``SweepDetached``, and "a rerun of
    the same script serves their results as it serves any kept one" (no job, nothing run twice)."""
    options: dict[str, Any] = {
        "session_root": str(tmp_path / "root"),
        "sweep": "overnight",
        "max_workers": 2,
        "progress": False,
        "status_page": False,
    }
    executor = LocalExecutor(**options)
    futures = [executor.submit(slow_square, x) for x in range(12)]
    handed = executor.detach()
    ended = [future.exception(timeout=0) for future in futures]  # all ended when detach returns
    assert 0 < handed == sum(isinstance(error, SweepDetached) for error in ended), ended
    wait_until(lambda: len(_runs()) == 12, 60, "every call run by the detached workers")
    with LocalExecutor(**options) as rerun:
        assert list(rerun.map(slow_square, range(12))) == [x * x for x in range(12)]
        assert rerun.job_ids == []
        assert rerun.sweep is not None and rerun.sweep.served == 12
    assert _runs() == {x: 1 for x in range(12)}


def test_every_exception_is_importable_from_the_package() -> None:
    """Never hang: "Every exception is importable from ``sheepdog_executor`` (``errors.py``)"."""
    classes = [
        name
        for name, value in vars(errors).items()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__module__ == "sheepdog_executor.errors"
    ]
    assert [name for name in classes if name not in sheepdog_executor.__all__] == []
    assert all(getattr(sheepdog_executor, name) is getattr(errors, name) for name in classes)


def test_a_view_takes_only_the_resource_words() -> None:
    """Calls with different needs: with_resources takes time=, mem=, cpus=, gpus=; "another name is
    a ``ConfigurationError``"."""
    with LocalExecutor(max_workers=1, status_page=False, progress=False) as executor:
        with pytest.raises(ConfigurationError, match="partition: not a resource; the resources are cpus"):
            executor.with_resources(partition="long")
        assert executor.with_resources(mem="16G", time="4:00:00") is not None


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_max_workers_counts_per_resource_set() -> None:
    """Options: ``max_workers`` is "per resource set": with one worker each, a call of the executor
    and one of its view run at the same time."""
    with LocalExecutor(max_workers=1, status_page=False, progress=False) as executor:
        view = executor.with_resources(mem="1G")
        own, other = executor.submit(nap, 3), view.submit(nap, 3)
        wait_until(lambda: own.running() and other.running(), 30, "both calls to run at once")
        assert (own.result(timeout=30), other.result(timeout=30)) == (3, 3)


def test_every_resource_set_counts_against_one_commands_per_minute() -> None:
    """Calls with different needs: each set polls on its own, "all within one
    ``commands_per_minute``": a set's scheduler shares the executor's meter."""
    for scheduler_class in (GridEngineScheduler, SlurmScheduler):
        scheduler = scheduler_class(LocalShell(), JobOptions())
        assert scheduler.with_needs(Resources.parse({"mem": "16G"})).meter is scheduler.meter


def test_every_python_example_in_the_readme_compiles() -> None:
    """The README's Python blocks (those that use an executor; not a shell session) are valid
    Python as shown."""
    blocks = re.findall(r"::\n\n((?: {4}.*\n|\n)+)", README.read_text())
    python = [
        textwrap.dedent(b)
        for b in blocks
        if re.search(r"Executor\(|import sheepdog_executor", b) and not b.lstrip().startswith("$")
    ]
    assert len(python) >= 8, len(python)
    for block in python:
        compile(block, "README.rst", "exec")


def test_a_memory_errors_note_names_the_option_that_asked_for_the_memory() -> None:
    """Never hang: the note of a ``MemoryError`` under ``h_vmem`` says "raise h_vmem in
    resources=", and "ask for more mem=" when ``mem=`` asked for it (the task's advice)."""
    asked = {"": "raise h_vmem in resources=", "1G": "ask for more mem="}
    for mem, advice in asked.items():
        needs = Resources.parse({"mem": mem or None})
        scheduler = GridEngineScheduler(LocalShell(), JobOptions(needs=needs))
        assert scheduler.advice_for_memory() == advice
