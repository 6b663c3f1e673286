"""Advice that fits: a missing module's note on what the client knows, an option of the other
scheduler's executor named as such."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sheepdog_executor import ConfigurationError, GridEngineExecutor, SlurmExecutor
from sheepdog_executor.remote.compat import add_note
from sheepdog_executor.tracebacks import fit_advice

NODE_NOTE = (
    "sheepdog: the call failed to import a module: module {name!r} is not importable on the nodes "
    "(host n1, Python 3.11.2 at /usr/bin/python3); install it there, use an interpreter that has it "
    '(python=, ...), or ship this client\'s packages with environment="sync"'
)


def missing(name: str) -> ModuleNotFoundError:
    error = ModuleNotFoundError(f"No module named {name!r}", name=name)
    add_note(error, NODE_NOTE.format(name=name))
    return error


@pytest.mark.parametrize("synced", [False, True])
def test_a_module_missing_here_too_is_a_typo(synced: bool) -> None:
    error = missing("numpyy.linalg")
    fit_advice(error, synced)
    assert error.__notes__ == [
        "sheepdog: the call failed to import a module: module 'numpyy.linalg' is not importable on the "
        "nodes (host n1, Python 3.11.2 at /usr/bin/python3); it is not installed here either: a typo?"
    ]


def test_a_module_installed_here_but_not_shipped_by_sync() -> None:
    error = missing("pytest")
    fit_advice(error, synced=True)
    (note,) = error.__notes__
    assert "environment=\"sync\" is on and 'pytest' is importable here (" in note
    assert "ship this client's packages" not in note


def test_without_sync_the_nodes_advice_stands() -> None:
    error = missing("pytest")
    fit_advice(error, synced=False)
    assert error.__notes__ == [NODE_NOTE.format(name="pytest")]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: GridEngineExecutor(host="h", partition="short"),
            r"^partition= is an option of SlurmExecutor \(Slurm\), not of GridEngineExecutor; on Grid "
            r"Engine the jobs are shaped by queue=, resources=, parallel_environment=, slots=, "
            r"memory_resource=, gpu_resource=, qsub_args=$",
        ),
        (
            lambda: SlurmExecutor(host="h", resources={"h_vmem": "1G"}),
            r"^resources= is an option of GridEngineExecutor \(Grid Engine\), not of SlurmExecutor; on "
            r"Slurm the jobs are shaped by partition=, .*cpus_per_task=",
        ),
    ],
)
def test_an_option_of_the_other_scheduler_names_its_executor(make: Callable[[], Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        make()  # before anything connects
    assert isinstance(caught.value, TypeError)  # as Python's "unexpected keyword argument" was


def _import_a_typo() -> None:
    import numpyy  # type: ignore[import-not-found]  # noqa: F401


@pytest.mark.cluster
def test_a_typo_in_an_import_on_the_cell_is_called_one(cell: str) -> None:
    from support import NODE_PYTHON

    with GridEngineExecutor(host=cell, max_workers=1, python=NODE_PYTHON, poll_interval=0.5) as executor:
        error = executor.submit(_import_a_typo).exception(timeout=90)
    assert isinstance(error, ModuleNotFoundError)
    (note,) = [n for n in error.__notes__ if n.startswith("sheepdog: ")]
    assert "module 'numpyy' is not importable on the nodes" in note
    assert note.endswith("; it is not installed here either: a typo?")
