"""A scheduler is one module plus one registry row: ``ToyScheduler``, defined only in this test module
(its tasks are local processes), gets a working executor, a config table, a ``--scheduler`` choice
and a joblib backend, with no edit to the library: a row added with ``registry.register`` here, as
an installed package's ``sheepdog_executor.schedulers`` entry point adds it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import joblib
import pytest

from sheepdog_executor import ConfigurationError, registry
from sheepdog_executor.cli.main import _parser
from sheepdog_executor.config import CONFIG_ENV, OPTIONS, configured_scheduler, env_name, resolve_options
from sheepdog_executor.errors import OptionOfAnotherScheduler
from sheepdog_executor.executor import executor_class
from sheepdog_executor.jobscript import WorkerLaunch, task_body
from sheepdog_executor.options import option
from sheepdog_executor.scheduler.base import JobStates, Scheduler, TaskState


# -- the whole scheduler: its options and its class -------------------------------------------------
@dataclass(frozen=True)
class ToyOptions:
    """The toy's own options."""

    label: str = option("toy", "a word each task finds in $TOY_LABEL", str)


class ToyScheduler(Scheduler[ToyOptions]):
    """Each job is a group of local processes, one per task."""

    name = "Toy"
    Options = ToyOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._jobs: dict[str, dict[int, subprocess.Popen[bytes]]] = {}
        self._lock = threading.Lock()

    def submit(self, launch: WorkerLaunch, tasks: int) -> str:
        job = f"toy-{uuid.uuid4().hex[:8]}"
        started = {}
        for task in range(1, tasks + 1):
            env = dict(os.environ, SHEEPDOG_JOB_ID=job, SHEEPDOG_TASK_ID=str(task), TOY_LABEL=self.site.label)
            path = os.path.expanduser(launch.output_path(job, task, "err"))
            with open(path, "wb") as err:
                started[task] = subprocess.Popen(
                    ["/bin/sh", "-c", task_body(self.options, launch)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    env=env,
                    start_new_session=True,
                )
        with self._lock:
            self._jobs[job] = started
        return job

    def poll(self, job_ids: Collection[str]) -> JobStates:
        with self._lock:
            return {
                job: {task: TaskState.RUNNING for task, p in self._jobs[job].items() if p.poll() is None}
                for job in job_ids
                if job in self._jobs and any(p.poll() is None for p in self._jobs[job].values())
            }

    def cancel(self, job_ids: Collection[str]) -> None:
        with self._lock:
            for job in job_ids:
                for process in self._jobs.get(job, {}).values():
                    if process.poll() is None:
                        os.killpg(process.pid, signal.SIGKILL)
                        process.wait()


# -- the proof ------------------------------------------------------------------------------------
LOCAL = {"python": sys.executable, "callback_address": "127.0.0.1", "poll_interval": 0.5, "progress": False}


@pytest.fixture(autouse=True)
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The toy's registry row, and a config file of our own (no SHEEPDOG_* option leaks in)."""
    path = tmp_path / "config.toml"
    path.write_text("")
    monkeypatch.setenv(CONFIG_ENV, str(path))
    monkeypatch.delenv("SHEEPDOG_HOST", raising=False)
    for name in OPTIONS:
        monkeypatch.delenv(env_name(name), raising=False)
    registry.register("toy", ToyScheduler)
    yield path
    registry.unregister("toy")


def test_the_toy_gets_an_executor_that_runs_a_map() -> None:
    ToyExecutor = executor_class("toy")
    assert ToyExecutor.__name__ == "ToyExecutor" and "label" in str(ToyExecutor.__init__.__signature__)
    with ToyExecutor(max_workers=2, label="woof", **LOCAL) as executor:
        assert list(executor.map(lambda x: (x * x, os.environ["TOY_LABEL"]), range(4))) == [
            (x * x, "woof") for x in range(4)
        ]


def test_the_toy_gets_a_config_table_and_a_cli_choice(toy: Path) -> None:
    toy.write_text('[hosts."toybox"]\nlabel = "from-file"\n')
    assert resolve_options("toybox", {}) == {"label": "from-file"}
    assert configured_scheduler("toybox") == ("toy", f'Toy\'s options in [hosts."toybox"] in {toy}')
    toy.write_text('[hosts."toybox"]\nlabel = 3\n')
    with pytest.raises(ConfigurationError, match="label in .* must be a string, not 3"):
        resolve_options("toybox", {})
    toy.write_text('[hosts."toybox"]\nscheduler = "toy"\n')
    assert configured_scheduler("toybox") == ("toy", f"scheduler = 'toy' in [hosts.\"toybox\"] in {toy}")
    assert _parser().parse_args(["cleanup", "toybox", "--scheduler", "toy"]).scheduler == "toy"
    with pytest.raises(
        OptionOfAnotherScheduler, match=r"queue= is an option of GridEngineExecutor .* label="
    ):
        executor_class("toy")(queue="all.q", **LOCAL)


def test_the_toy_gets_a_joblib_backend() -> None:
    from sheepdog_executor.integrations import joblib_backend

    joblib_backend.register()  # as at its import, for a row that exists then (an entry point)
    with joblib.parallel_config(backend="toy", max_workers=2, label="jl", reuse=False, **LOCAL):
        out = joblib.Parallel()(joblib.delayed(os.getenv)("TOY_LABEL") for _ in range(3))
    assert out == ["jl"] * 3


def test_an_entry_point_adds_a_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    registry.unregister("toy")
    point = EntryPoint("toy", f"{__name__}:ToyScheduler", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [point] if group == point.group else [])
    monkeypatch.setattr(registry, "_from_entry_points", None)
    assert registry.entries()["toy"].load() is ToyScheduler
    assert executor_class("toy").scheduler_class is ToyScheduler


def test_a_broken_row_leaves_the_others_working(caplog: pytest.LogCaptureFixture) -> None:
    registry.register("broken", "no_such_plugin:Scheduler")
    try:
        assert "label" in OPTIONS and "queue" in OPTIONS
        assert "cannot be loaded from 'no_such_plugin:Scheduler'" in caplog.text
        with pytest.raises(ConfigurationError, match="install the package that provides it"):
            executor_class("broken")
    finally:
        registry.unregister("broken")
