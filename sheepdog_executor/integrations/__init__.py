"""Glue to tools users already run: joblib (``joblib_backend``).

dask needs no glue: it takes any ``concurrent.futures.Executor`` as its scheduler,
``dask.compute(x, scheduler=executor)``; its nodes need dask (and numpy for arrays).

Importing this package makes joblib's backends (one per registered scheduler: ``"gridengine"``,
``"slurm"``, ...) available without importing joblib (which costs about half a second, numpy
included): at once when joblib is already imported, else right after ``joblib.parallel`` first loads.
``import sheepdog_executor`` imports this package only when joblib is loaded already (no import hook
of its own). ``joblib_backend`` itself loads on a backend's first use.
Inside a worker (a call on a node) the names mean joblib's loky on that node (``remote.nested``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from sheepdog_executor import registry
from sheepdog_executor.remote import nested

log = logging.getLogger("sheepdog_executor")

#: The names to give joblib: ``joblib.parallel_config(backend="gridengine", host=...)``, and
#: ``"slurm"`` for ``SlurmExecutor``.
JOBLIB_BACKEND, SLURM_JOBLIB_BACKEND = nested.CLUSTER_BACKENDS


def _backend(key: str, **options: Any) -> Any:
    """joblib's factory for a backend: loads ``joblib_backend`` only when the backend is used."""
    from sheepdog_executor.integrations.joblib_backend import backend_class

    return backend_class(key)(**options)


def _register_with_joblib() -> None:
    """A backend for each registered scheduler, named by its registry key."""
    try:
        from joblib.parallel import register_parallel_backend

        for key in registry.entries():
            register_parallel_backend(key, functools.partial(_backend, key))
    except Exception as exc:  # noqa: BLE001 - never break the user's import of joblib
        log.warning("could not register the joblib backends %s: %s", list(registry.entries()), exc)


def _register_joblib_backend_lazily() -> None:
    if nested.in_worker():  # a call on a node (the package is installed there): no jobs from jobs
        nested.install()
    else:
        nested.when_imported("joblib.parallel", _register_with_joblib)


_register_joblib_backend_lazily()
