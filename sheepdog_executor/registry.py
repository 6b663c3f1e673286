"""The schedulers the library knows, by the key users write (``--scheduler``, ``scheduler = ...`` in a
host's table, joblib's backend name): the built-in rows below, the ``sheepdog_executor.schedulers``
entry points of installed packages, and ``register()`` at run time.

A row names its scheduler class as ``"module:Class"``, loaded on first use: this module imports
nothing of the package but ``errors``, so ``config`` can read it. The executor classes are made
from the rows in ``executor.executor_class``.
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from sheepdog_executor.errors import ConfigurationError

log = logging.getLogger("sheepdog_executor")

#: Installed packages add schedulers here: ``[project.entry-points."sheepdog_executor.schedulers"]``
#: ``pbs = "sheepdog_pbs:PBSScheduler"``.
ENTRY_POINT_GROUP = "sheepdog_executor.schedulers"


@dataclass(frozen=True)
class SchedulerEntry:
    """One registry row: the key users write and where the scheduler class is."""

    key: str
    #: ``"module:Class"`` of a ``Scheduler`` subclass, or the class itself.
    target: Any
    #: The public executor class's name (made from the scheduler when the library has none).
    executor: str = ""

    def load(self) -> Any:
        """The scheduler class (imported on first use)."""
        if not isinstance(self.target, str):
            return self.target
        module, _, name = self.target.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ConfigurationError(
                f"the scheduler {self.key!r} cannot be loaded from {self.target!r}: {exc}; install the "
                f"package that provides it, or uninstall the one whose {ENTRY_POINT_GROUP!r} entry point "
                "names it"
            ) from exc


BUILTIN = (
    SchedulerEntry(
        "gridengine", "sheepdog_executor.scheduler.gridengine:GridEngineScheduler", "GridEngineExecutor"
    ),
    SchedulerEntry("slurm", "sheepdog_executor.scheduler.slurm:SlurmScheduler", "SlurmExecutor"),
)

_lock = threading.Lock()
_added: dict[str, SchedulerEntry] = {}
_from_entry_points: dict[str, SchedulerEntry] | None = None
_warned: set[str] = set()


def register(key: str, scheduler: Any, executor: str = "") -> SchedulerEntry:
    """Add (or replace) the scheduler known as ``key``: a ``Scheduler`` subclass or ``"module:Class"``."""
    entry = SchedulerEntry(key, scheduler, executor or f"{key.title().replace('_', '')}Executor")
    with _lock:
        _added[key] = entry
    return entry


def unregister(key: str) -> None:
    """Forget a scheduler added with ``register`` (tests)."""
    with _lock:
        _added.pop(key, None)


def entries() -> dict[str, SchedulerEntry]:
    """Every known scheduler by key, the built-in ones first (Grid Engine wins autodetection)."""
    global _from_entry_points
    with _lock:
        if _from_entry_points is None:
            _from_entry_points = {
                point.name: SchedulerEntry(point.name, point.value, f"{point.name.title()}Executor")
                for point in entry_points(group=ENTRY_POINT_GROUP)
            }
        return {**{e.key: e for e in BUILTIN}, **_from_entry_points, **_added}


def entry(key: str) -> SchedulerEntry:
    """The row of ``key``; KeyError naming the known keys."""
    known = entries()
    if key not in known:
        raise KeyError(f"no scheduler {key!r}; known: {', '.join(known)}")
    return known[key]


def scheduler_classes() -> dict[str, Any]:
    """Every known scheduler class by key (each imported); one that cannot be loaded is left out
    with a warning, so that a broken plug-in does not stop the other schedulers."""
    found = {}
    for key, row in entries().items():
        try:
            found[key] = row.load()
        except ConfigurationError as exc:
            if key not in _warned:
                _warned.add(key)
                log.warning("%s", exc)
    return found
