"""The options are declared once (``options.py``, each scheduler's ``Options``): the executors'
signatures, written out for users and IDEs, say the same names and defaults."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

from sheepdog_executor import ConfigurationError, GridEngineExecutor, SlurmExecutor
from sheepdog_executor.config import OPTIONS
from sheepdog_executor.executor import ClusterExecutor
from sheepdog_executor.options import ExecutorOptions, declared, defaults

NOT_OPTIONS = {"self", "initializer", "initargs", "scheduler_options", "options"}


def _keywords(function: object) -> dict[str, object]:
    parameters = inspect.signature(function).parameters.values()  # type: ignore[arg-type]
    return {p.name: p.default for p in parameters if p.name not in NOT_OPTIONS}


def test_the_executor_signature_is_the_shared_declaration() -> None:
    assert _keywords(ClusterExecutor.__init__) == defaults(ExecutorOptions)


@pytest.mark.parametrize("executor", [GridEngineExecutor, SlurmExecutor])
def test_each_executor_signature_is_its_scheduler_declaration(executor: type[ClusterExecutor]) -> None:
    own = {n: d for n, d in _keywords(executor.__init__).items() if n != "max_workers"}
    declared_defaults = defaults(executor.scheduler_class.Options)
    assert own.keys() == declared_defaults.keys()
    for name, default in own.items():  # None stands for a mutable default made by the declaration
        assert default == declared_defaults[name] or (default is None and declared_defaults[name] == {})


def test_every_option_is_documented_once() -> None:
    assert all(option.doc for option in OPTIONS.values())
    assert set(declared(ExecutorOptions)) - set(OPTIONS) == {"host"}  # the host is a table's name


def test_the_options_object_checks_values_and_is_a_read_only_mapping() -> None:
    with pytest.raises(ConfigurationError, match="disconnect_tolerance must be at least 10"):
        ExecutorOptions(disconnect_tolerance=5)
    options = ExecutorOptions(retries=2)
    assert options["retries"] == 2 and dict(options)["job_name"] == "sheepdog"
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.retries = 3  # type: ignore[misc]


def test_the_readme_documents_every_declared_option() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.rst").read_text()
    for executor in (GridEngineExecutor, SlurmExecutor):
        names = [*declared(ExecutorOptions), *declared(executor.scheduler_class.Options)]
        assert [name for name in names if f"``{name}``" not in readme] == [], executor


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("config", {"errors", "options", "registry"}),
        ("options", {"errors", "resources"}),
        ("registry", {"errors"}),
        ("resources", {"errors"}),
    ],
)
def test_the_ground_floor_imports_nothing_above_it(module: str, allowed: set[str]) -> None:
    path = Path(__file__).resolve().parent.parent / "sheepdog_executor" / f"{module}.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sheepdog_executor"):
            names = [node.module.partition(".")[2]] if "." in node.module else [a.name for a in node.names]
            found.update(names)
    assert found <= allowed
